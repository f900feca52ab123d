"""One MLflow run tree per pipeline run, against a real `mlflow server`: the parent created once
and handed on, KFP's own MLflow runs reused where its integration is on, and an exit handler
that ends the tree however the run ended and leaves no scratch on the checkpoints volume."""

import subprocess
import sys
import textwrap
import uuid

import mlflow
import pytest

from cellseg.registry import tracking
from cellseg.steps.finish_run import finish_run_step
from pipelines.run_local import run_local
from tests.conftest import TINY, synthetic_samples, write_voc

pytestmark = pytest.mark.integration

STEP = textwrap.dedent(
    """
    import sys, time
    from cellseg.registry.tracking import step_run

    run_id, parent, step = sys.argv[1:4]
    with step_run(step, run_id, {}, parent=parent):
        time.sleep(1)
    """
)


def runs_of(pipeline_run_id: str):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    return client.search_runs(
        [experiment], filter_string=f"tags.`{tracking.PIPELINE_RUN_TAG}` = '{pipeline_run_id}'"
    )


def parents_of(pipeline_run_id: str):
    return [r for r in runs_of(pipeline_run_id) if tracking.PARENT_TAG in r.data.tags]


def test_two_steps_at_once_share_the_parent_the_first_step_handed_on(sqlite_mlflow_uri):
    """As train-phase1 and score-champion start together on a cluster."""
    pipeline_run = uuid.uuid4().hex
    parent = tracking.start_parent(pipeline_run, {"cellseg.profile": "local"})
    steps = [
        subprocess.Popen([sys.executable, "-c", STEP, pipeline_run, parent, name])
        for name in ("phase1", "score-champion")
    ]
    assert [p.wait(timeout=120) for p in steps] == [0, 0]
    assert [r.info.run_id for r in parents_of(pipeline_run)] == [parent]
    nested = [r for r in runs_of(pipeline_run) if tracking.STEP_TAG in r.data.tags]
    assert sorted(r.data.tags[tracking.STEP_TAG] for r in nested) == ["phase1", "score-champion"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in nested)
    assert tracking.start_parent(pipeline_run) == parent  # a retried start-run finds it


def test_under_kfps_mlflow_integration_steps_log_into_kfps_runs(sqlite_mlflow_uri, monkeypatch):
    """KFP >= 2.17 with ``plugins.mlflow`` creates the pipeline run's parent run (API server,
    ``apiserver/plugins/mlflow/handler.go`` OnBeforeRunCreation) and a nested run per DAG and
    task tagged ``mlflow.parentRunId`` (``backend/src/v2/common/plugins/mlflow/handler.go``
    OnTaskStart); with ``injectUserEnvVars`` the task's pod gets ``MLFLOW_RUN_ID`` (the task's
    run) and ``MLFLOW_EXPERIMENT_ID``, and the launcher ends the task's run (OnTaskEnd), all at
    tag 2.17.0. A step must then write into those runs, not a second tree beside them."""
    client = mlflow.MlflowClient()
    experiment = client.create_experiment(f"KFP-Default-{uuid.uuid4().hex[:6]}")
    root = client.create_run(experiment, run_name="run", tags={"kfp.pipeline_run_id": "r1"})
    group = client.create_run(
        experiment, run_name="exit-handler-1", tags={"mlflow.parentRunId": root.info.run_id}
    )
    task = client.create_run(
        experiment, run_name="start-run", tags={"mlflow.parentRunId": group.info.run_id}
    )
    monkeypatch.setenv("MLFLOW_RUN_ID", task.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    pipeline_run = uuid.uuid4().hex

    assert tracking.start_parent(pipeline_run, {"cellseg.profile": "uni-gpu"}) == root.info.run_id
    with tracking.step_run("phase1", pipeline_run) as tracker:
        assert tracker.run_id == task.info.run_id
        tracker.log_metrics({"val_total": 1.0}, 1)
    runs = client.search_runs([experiment])
    assert len(runs) == 3  # nothing created beside KFP's runs
    tags = client.get_run(root.info.run_id).data.tags
    assert tags[tracking.PARENT_TAG] == pipeline_run and tags["cellseg.profile"] == "uni-gpu"
    logged = client.get_run(task.info.run_id)
    assert logged.data.tags[tracking.STEP_TAG] == "phase1"
    assert logged.info.status == "RUNNING"  # KFP's launcher ends it, not the step
    assert logged.data.metrics["val_total"] == 1.0


def test_the_exit_handler_ends_the_tree_and_removes_the_runs_scratch(sqlite_mlflow_uri, tmp_path):
    """An exit handler learns only the final state: kfp.local passes ``SUCCEEDED`` or
    ``FAILED`` (``kfp/local/orchestrator/orchestrator_utils.py``, kfp 2.17.3); the backend's
    driver passes the exit-handler group's MLMD state, ``COMPLETE`` on success, and an empty
    error (``backend/src/v2/driver/resolve.go``, tag 2.17.0). The failed steps come from MLflow."""
    pipeline_run = uuid.uuid4().hex
    parent = tracking.start_parent(pipeline_run)
    with tracking.step_run("phase1", pipeline_run, parent=parent):
        pass
    killed = mlflow.MlflowClient().create_run(
        mlflow.get_experiment_by_name(tracking.EXPERIMENT).experiment_id,
        tags={tracking.PIPELINE_RUN_TAG: pipeline_run, tracking.STEP_TAG: "phase2"},
    )  # a step whose pod was killed never ended its run
    scratch = tmp_path / pipeline_run / "phase2"
    scratch.mkdir(parents=True)
    (scratch / "latest_phase2.pt").write_bytes(b"\0" * 1000)

    line = finish_run_step(pipeline_run, "FAILED", "", None, tmp_path / pipeline_run)
    assert line == (
        f"pipeline run {pipeline_run}: FAILED; failed: phase2; MLflow run {parent} FAILED; "
        f"removed {tmp_path / pipeline_run} (0.0 GB)"
    )
    assert not (tmp_path / pipeline_run).exists()
    client = mlflow.MlflowClient()
    assert client.get_run(killed.info.run_id).info.status == "FAILED"
    ended = client.get_run(parent)
    assert ended.info.status == "FAILED" and ended.data.tags["cellseg.failed_steps"] == "phase2"

    # the backend reports success as the group's MLMD state, COMPLETE (see SUCCEEDED_STATES)
    other = uuid.uuid4().hex
    finished = tracking.start_parent(other)
    assert "FINISHED" in finish_run_step(other, "COMPLETE", "", None, tmp_path / other)
    assert client.get_run(finished).info.status == "FINISHED"


def test_a_pipeline_whose_training_fails_ends_its_parent_failed(sqlite_mlflow_uri, tmp_path):
    """Under kfp.local, whose exit handler runs after a failed body as the backend's does."""
    samples = synthetic_samples(8)
    stems = sorted(samples)
    voc = write_voc(
        tmp_path / "voc", samples, {"train": stems[:4], "val": stems[4:6], "test": stems[6:]}
    )
    broken = [*TINY, "epochs=1", "lr=-1"]  # Phase 1 refuses its config and fails
    with pytest.raises(RuntimeError):
        run_local(voc, tmp_path / "kfp", "local", broken, sqlite_mlflow_uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    newest = client.search_runs(
        [experiment], filter_string=f"tags.`{tracking.PARENT_TAG}` != ''",
        order_by=["start_time DESC"], max_results=1,
    )[0]  # fmt: skip
    assert newest.info.status == "FAILED"
    assert "phase1" in newest.data.tags["cellseg.failed_steps"].split(",")
    pipeline_run = newest.data.tags[tracking.PARENT_TAG]
    assert len(parents_of(pipeline_run)) == 1
    assert all(r.info.status != "RUNNING" for r in runs_of(pipeline_run))


def test_the_scratch_goes_even_when_mlflow_cannot_be_reached(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("MLflow is down")

    monkeypatch.setattr(tracking, "finish_parent", unreachable)
    (tmp_path / "run-1" / "phase1").mkdir(parents=True)
    with pytest.raises(ConnectionError):
        finish_run_step("run-1", "FAILED", "", None, tmp_path / "run-1")
    assert not (tmp_path / "run-1").exists()
