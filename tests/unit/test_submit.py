"""Cluster submission and scheduling: cron rules, and the calls sent to the KFP API.

There is no KFP API server here, so a small recording stand-in plays the client; everything
else (compilation, parameters) is real.
"""

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines import submit
from pipelines.compile import compile_pipeline


class RecordingClient:
    def __init__(self, pipeline_id=None, recurring=()):
        self.calls = []
        self.pipeline_id = pipeline_id
        self.recurring = list(recurring)

    def _record(self, call, **kwargs):
        self.calls.append((call, kwargs))

    def get_pipeline_id(self, name):
        self._record("get_pipeline_id", name=name)
        return self.pipeline_id

    def upload_pipeline(self, path, pipeline_name):
        self._record("upload_pipeline", path=path, pipeline_name=pipeline_name)
        return SimpleNamespace(pipeline_id="p-1")

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id):
        self._record("upload_pipeline_version", name=pipeline_version_name, pipeline_id=pipeline_id)
        return SimpleNamespace(pipeline_version_id="v-1")

    def create_experiment(self, name, namespace):
        self._record("create_experiment", name=name, namespace=namespace)
        return SimpleNamespace(experiment_id="e-1")

    def run_pipeline(self, **kwargs):
        self._record("run_pipeline", **kwargs)
        return SimpleNamespace(run_id="r-1")

    def list_recurring_runs(self, experiment_id, page_size):
        self._record("list_recurring_runs", experiment_id=experiment_id)
        return SimpleNamespace(recurring_runs=self.recurring)

    def delete_recurring_run(self, recurring_run_id):
        self._record("delete_recurring_run", recurring_run_id=recurring_run_id)

    def create_recurring_run(self, **kwargs):
        self._record("create_recurring_run", **kwargs)
        return SimpleNamespace(recurring_run_id="j-2")


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("spec") / "p.yaml", "reg.example/cellseg:abc")


def test_a_five_field_cron_is_refused_with_the_fix():
    with pytest.raises(submit.ScheduleError, match=r"did you mean '0 0 3 \* \* 1'"):
        submit.check_cron("0 3 * * 1")
    assert submit.check_cron("0 0 3 * * 1") == "0 0 3 * * 1"


def test_make_schedule_refuses_a_five_field_cron(repo_root):
    result = subprocess.run(
        ["make", "-s", "schedule", "CRON=0 3 * * 1"], cwd=repo_root, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "5 fields, but KFP expects 6 with seconds first" in result.stderr


def test_run_uploads_a_version_and_starts_a_run_in_the_experiment(spec):
    client = RecordingClient(pipeline_id=None)
    params = {"data_md5": "abc.dir", "profile": "uni-gpu"}
    url = submit.submit_run(client, "https://kfp.example/pipeline/", spec, "sha-1", params, "team")
    assert url == "https://kfp.example/pipeline/#/runs/details/r-1"
    names = [c[0] for c in client.calls]
    assert names == [
        "get_pipeline_id", "upload_pipeline", "upload_pipeline_version", "create_experiment",
        "run_pipeline",
    ]  # fmt: skip
    run = dict(client.calls)["run_pipeline"]
    assert run["pipeline_id"] == "p-1" and run["version_id"] == "v-1"
    assert run["experiment_id"] == "e-1" and run["params"] == params
    assert dict(client.calls)["create_experiment"] == {"name": "cellseg", "namespace": "team"}


def test_schedule_replaces_the_existing_recurring_run_instead_of_duplicating(spec):
    old = SimpleNamespace(display_name=submit.RECURRING_RUN, recurring_run_id="j-1")
    other = SimpleNamespace(display_name="someone-else", recurring_run_id="x-9")
    client = RecordingClient(pipeline_id="p-1", recurring=[old, other])
    job = submit.schedule(client, spec, "sha-2", "0 0 3 * * 1", {"data_md5": ""}, "team")
    assert job == "j-2"
    calls = dict(client.calls)
    assert calls["delete_recurring_run"] == {"recurring_run_id": "j-1"}  # not the other one
    created = calls["create_recurring_run"]
    assert created["cron_expression"] == "0 0 3 * * 1" and created["job_name"] == "cellseg-retrain"
    assert created["max_concurrency"] == 1 and created["no_catchup"] is True
    assert created["params"] == {"data_md5": ""}  # the newest data revision at run time
    assert "upload_pipeline" not in calls  # the pipeline exists: only a new version


def test_unschedule_removes_only_the_retraining_run():
    runs = [SimpleNamespace(display_name=submit.RECURRING_RUN, recurring_run_id="j-1")]
    client = RecordingClient(recurring=runs)
    assert submit.unschedule(client, "team") == 1
    assert ("delete_recurring_run", {"recurring_run_id": "j-1"}) in client.calls


def test_the_image_reaches_every_step(spec):
    text = spec.read_text()
    assert text.count("image: reg.example/cellseg:abc") == 7 and "cellseg-kfp:0.1.0" not in text
