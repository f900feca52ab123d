"""MLflow tracking: one parent run per pipeline run, one nested run per step.

The tracking URI comes from ``MLFLOW_TRACKING_URI``; without it, the embedded store in the project
directory: ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts/``. MLflow is
imported only here, at call time, so the training image needs it only when tracking is on.

Where KFP's own MLflow integration is on (KFP >= 2.17, ``plugins.mlflow`` with
``injectUserEnvVars``), the backend has already created a parent run for the pipeline run and a
nested run for each task, and it ends them. It passes the task's run as ``MLFLOW_RUN_ID`` and
the experiment as ``MLFLOW_EXPERIMENT_ID``. A step then logs into that run instead of creating a
second tree beside it (``backend/src/v2/common/plugins/mlflow/handler.go``, tag 2.17.0).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cellseg.errors import CheckpointError

EXPERIMENT = "cellseg"
PIPELINE_RUN_TAG = "cellseg.pipeline_run_id"
PARENT_TAG = "cellseg.pipeline_parent"  # only on the parent run
STEP_TAG = "cellseg.step"
MAX_PARAM_CHARS = 500


def default_tracking_uri(root: Path | None = None) -> str:
    root = Path(root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def use_store(uri: str | None = None) -> str:
    """Point MLflow at ``uri`` (default: :func:`tracking_uri`) for commands that only read (a
    ``models:/`` reference); returns the URI. A SQLite store that does not exist is an error
    (MLflow would create an empty one and then find nothing in it)."""
    import mlflow

    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise CheckpointError(
            f"no MLflow store at {uri} (`make pipeline-run` writes it in the project folder; "
            "run from there, or set MLFLOW_TRACKING_URI to the store that holds the model)"
        )
    mlflow.set_tracking_uri(uri)
    return uri


def kfp_task_run() -> str:
    """The nested run KFP's MLflow integration created for this task ("" when it is off)."""
    return os.environ.get("MLFLOW_RUN_ID", "")


def configure(uri: str | None = None, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at ``uri`` and make sure ``experiment`` exists; returns its id (under KFP's
    MLflow integration: the experiment KFP chose)."""
    import mlflow

    if kfp_task_run() and os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]  # the server KFP's run ids belong to
    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    if kfp_task_run() and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the embedded database
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return mlflow.create_experiment(experiment, artifact_location=location)
    except Exception:  # created concurrently by another step
        return mlflow.get_experiment_by_name(experiment).experiment_id


@dataclass
class Tracker:
    """The logging surface training and evaluation use (rank 0 only)."""

    run_id: str

    def log_params(self, params: dict) -> None:
        import mlflow

        clean = {k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items()}
        mlflow.MlflowClient().log_batch(
            self.run_id, params=[mlflow.entities.Param(k, v) for k, v in clean.items()]
        )

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        import time

        import mlflow

        now = int(time.time() * 1000)
        items = [
            mlflow.entities.Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, int | float)
        ]
        mlflow.MlflowClient().log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        if Path(path).is_dir():
            client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        for k, v in tags.items():
            client.set_tag(self.run_id, k, str(v))


def find_parent(experiment_id: str, pipeline_run_id: str):
    """The pipeline run's parent MLflow run, or None."""
    import mlflow

    found = mlflow.MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{pipeline_run_id}'",
        max_results=1,
    )
    return found[0] if found else None


def parent_run_id(experiment_id: str, pipeline_run_id: str, tags: dict) -> str:
    """The pipeline run's parent MLflow run, created if there is none yet. Only one process may
    ask at a time (two that search at once can both create one): the pipeline's ``start-run``
    step asks before any other step runs and hands the id on (:func:`start_parent`)."""
    import mlflow

    found = find_parent(experiment_id, pipeline_run_id)
    if found is not None:
        return found.info.run_id
    run = mlflow.MlflowClient().create_run(
        experiment_id,
        run_name=f"pipeline {pipeline_run_id}",
        tags={
            PIPELINE_RUN_TAG: pipeline_run_id,
            PARENT_TAG: pipeline_run_id,
            **{k: str(v) for k, v in tags.items()},
        },
    )
    return run.info.run_id


def _clean(tags: dict | None) -> dict:
    return {k: str(v) for k, v in (tags or {}).items() if v not in (None, "")}


def start_parent(
    pipeline_run_id: str, tags: dict | None = None, uri: str | None = None,
    experiment: str = EXPERIMENT,
) -> str:  # fmt: skip
    """The pipeline run's parent MLflow run, for the first step to create and hand on; under
    KFP's MLflow integration, the root of this task's run (tagged so that it is found)."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    experiment_id = configure(uri, experiment)
    tags = _clean(tags)
    if not kfp_task_run():
        return parent_run_id(experiment_id, pipeline_run_id, tags)
    client = mlflow.MlflowClient()
    root = client.get_run(kfp_task_run())
    for _ in range(8):  # pipeline run -> DAG runs -> task run (KFP nests them)
        up = root.data.tags.get(MLFLOW_PARENT_RUN_ID)
        if not up:
            break
        root = client.get_run(up)
    for key, value in {PIPELINE_RUN_TAG: pipeline_run_id, PARENT_TAG: pipeline_run_id,
                       **tags}.items():  # fmt: skip
        client.set_tag(root.info.run_id, key, value)
    return root.info.run_id


@contextlib.contextmanager
def step_run(
    step: str,
    pipeline_run_id: str,
    tags: dict | None = None,
    uri: str | None = None,
    experiment: str = EXPERIMENT,
    parent: str = "",
) -> Iterator[Tracker]:
    """A nested run for one pipeline step under the pipeline's parent run: ``parent`` as handed
    on by the first step (none: found or created here, for a step run on its own).

    Tags (git commit, data md5, image tag, profile, ...) go on both, so each row is filterable.
    """
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    experiment_id = configure(uri, experiment)
    tags = _clean(tags)
    client = mlflow.MlflowClient()
    if kfp_task_run():  # KFP's run for this task: log there; KFP ends it
        for key, value in {PIPELINE_RUN_TAG: pipeline_run_id, STEP_TAG: step, **tags}.items():
            client.set_tag(kfp_task_run(), key, value)
        yield Tracker(kfp_task_run())
        return
    parent = parent or parent_run_id(experiment_id, pipeline_run_id, tags)
    run = client.create_run(
        experiment_id,
        run_name=step,
        tags={
            MLFLOW_PARENT_RUN_ID: parent,
            PIPELINE_RUN_TAG: pipeline_run_id,
            STEP_TAG: step,
            **tags,
        },
    )
    status = "FAILED"
    try:
        yield Tracker(run.info.run_id)
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status)


@dataclass
class Ending:
    """How a pipeline run ended, as its MLflow runs record it."""

    parent: str  # "" when no parent run was ever created
    status: str  # FINISHED or FAILED
    failed_steps: list[str]


def finish_parent(
    pipeline_run_id: str,
    succeeded: bool,
    error: str = "",
    uri: str | None = None,
    experiment: str = EXPERIMENT,
) -> Ending:
    """End the pipeline run's parent run: FINISHED, or FAILED with the failed steps' names and
    ``error`` (first line) as tags. A step run still RUNNING was killed (its pod evicted, the
    run cancelled): it is marked FAILED too."""
    import mlflow

    experiment_id = configure(uri, experiment)
    client = mlflow.MlflowClient()
    steps = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'",
    )
    failed = []
    for run in steps:
        if STEP_TAG not in run.data.tags:
            continue
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")
        if run.info.status in ("RUNNING", "FAILED", "KILLED"):
            failed.append(run.data.tags[STEP_TAG])
    status = "FINISHED" if succeeded else "FAILED"
    if succeeded:
        failed = []  # an attempt a retry then made good
    parent = find_parent(experiment_id, pipeline_run_id)
    if parent is None:
        return Ending("", status, sorted(failed))
    if not succeeded:
        client.set_tag(parent.info.run_id, "cellseg.failed_steps", ",".join(sorted(failed)))
        first = error.strip().splitlines()[0] if error.strip() else ""
        client.set_tag(parent.info.run_id, "cellseg.error", first[:MAX_PARAM_CHARS])
    client.set_terminated(parent.info.run_id, status)
    return Ending(parent.info.run_id, status, sorted(failed))


# MLflow's dataset contexts for the splits
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def split_dataset(data: Path, split: str):
    """One split of a converted dataset as an MLflow dataset: named ``bccd-<split>``, its
    digest the raw data's DVC md5, its source the data repository's revision it was pulled
    from (``<repo>@<commit>``), else the folder it was read from."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from cellseg.data.manifest import read_manifest
    from cellseg.data.revision import pulled_from

    source = read_manifest(Path(data))["source"]
    revision = pulled_from(Path(source["path"]))  # repo@commit, for data pulled by revision
    with warnings.catch_warnings():  # a local path matches MLflow's local artifact source under
        warnings.simplefilter("ignore", UserWarning)  # two registrations: the same class
        location = resolve_dataset_source(revision or source["path"])
    return MetaDataset(location, name=f"bccd-{split}", digest=source.get("dvc_md5") or None)


def log_datasets(run_id: str, data: Path, splits: tuple[str, ...]) -> None:
    """``splits`` of the converted dataset at ``data`` as the run's inputs (MLflow's dataset
    page and the run's Datasets column)."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [
        DatasetInput(
            split_dataset(data, split)._to_mlflow_entity(),
            [InputTag(MLFLOW_DATASET_CONTEXT, SPLIT_CONTEXTS[split])],
        )
        for split in splits
    ]
    mlflow.MlflowClient().log_inputs(run_id, datasets=inputs)


def flat_metrics(metrics: dict) -> dict[str, float]:
    """``metrics.json`` (:func:`cellseg.evaluation.evaluate.evaluate`) as flat MLflow metric
    names: ``test_pq``, ``test_pq_RBC``, ``test_void_box_map50``, ..."""
    flat = {}
    for key in ("pq", "sq", "rq", "f1", "precision", "recall", "aji", "bpq", "mpq"):
        flat[f"test_{key}"] = metrics[key]
    for key in ("box_map50", "box_map", "mask_map50", "mask_map"):
        flat[f"test_{key}"] = metrics[key]
    for name, pc in metrics["per_class"].items():
        for key in ("pq", "f1", "box_ap50", "iou", "dice"):
            flat[f"test_{key}_{name}"] = pc[key]
    for key in ("pq", "f1", "box_map50", "mask_map50"):
        flat[f"test_void_{key}"] = metrics["void_aware"][key]
    return flat
