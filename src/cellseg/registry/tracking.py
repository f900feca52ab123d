"""MLflow tracking: one parent run per pipeline run, one nested run per step.

The tracking URI comes from ``MLFLOW_TRACKING_URI``; without it, the embedded store in the project
directory: ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts/``. MLflow is
imported only here, at call time, so the training image needs it only when tracking is on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


def configure(uri: str | None = None, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at ``uri`` and make sure ``experiment`` exists; returns its id."""
    import mlflow

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
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


def parent_run_id(experiment_id: str, pipeline_run_id: str, tags: dict) -> str:
    """The pipeline run's parent MLflow run, created by the first step that asks."""
    import mlflow

    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{pipeline_run_id}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline {pipeline_run_id}",
        tags={
            PIPELINE_RUN_TAG: pipeline_run_id,
            PARENT_TAG: pipeline_run_id,
            **{k: str(v) for k, v in tags.items()},
        },
    )
    return run.info.run_id


@contextlib.contextmanager
def step_run(
    step: str,
    pipeline_run_id: str,
    tags: dict | None = None,
    uri: str | None = None,
    experiment: str = EXPERIMENT,
) -> Iterator[Tracker]:
    """A nested run for one pipeline step under the pipeline's parent run.

    Tags (git commit, data md5, image tag, profile, ...) go on both, so each row is filterable.
    """
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    experiment_id = configure(uri, experiment)
    tags = {k: str(v) for k, v in (tags or {}).items() if v not in (None, "")}
    parent = parent_run_id(experiment_id, pipeline_run_id, tags)
    client = mlflow.MlflowClient()
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


def finish_parent(
    pipeline_run_id: str, uri: str | None = None, experiment: str = EXPERIMENT
) -> None:
    import mlflow

    experiment_id = configure(uri, experiment)
    client = mlflow.MlflowClient()
    client.set_terminated(parent_run_id(experiment_id, pipeline_run_id, {}), "FINISHED")


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
