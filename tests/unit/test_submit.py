"""Cluster submission and scheduling: cron rules, and the calls sent to the KFP API.

There is no KFP API server here, so an autospec of ``kfp.Client`` plays the client (it checks
every call against the real signatures); everything else (compilation, parameters) is real.
"""

import subprocess
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import call, create_autospec

import kfp
import pytest

from pipelines import submit
from pipelines.compile import compile_pipeline


def kfp_client(pipeline_id=None, recurring=(), multi_user=False):
    """A ``kfp.Client`` stand-in with its real signatures (a changed or misspelt argument fails
    the call), answering as the API would; there is no KFP API server here."""
    client = create_autospec(kfp.Client, instance=True)
    client.get_kfp_healthz.return_value = SimpleNamespace(multi_user=multi_user)
    found = [SimpleNamespace(pipeline_id=pipeline_id)] if pipeline_id else None
    client.list_pipelines.return_value = SimpleNamespace(pipelines=found)
    client.upload_pipeline.return_value = SimpleNamespace(pipeline_id="p-1")
    client.upload_pipeline_version.return_value = SimpleNamespace(pipeline_version_id="v-1")
    client.create_experiment.return_value = SimpleNamespace(experiment_id="e-1")
    client.run_pipeline.return_value = SimpleNamespace(run_id="r-1")
    client.list_recurring_runs.return_value = SimpleNamespace(recurring_runs=list(recurring))
    client.create_recurring_run.return_value = SimpleNamespace(recurring_run_id="j-2")
    client.get_experiment.return_value = SimpleNamespace(experiment_id="e-1")
    return client


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("spec") / "p.yaml", "reg.example/cellseg:abc")


def test_a_five_field_cron_is_refused_with_the_fix():
    with pytest.raises(submit.ScheduleError, match=r"did you mean '0 0 3 \* \* 1'"):
        submit.check_cron("0 3 * * 1")
    assert submit.check_cron("0 0 3 * * 1") == "0 0 3 * * 1"


@pytest.mark.parametrize(
    "expression", ["@weekly", "@daily", "@hourly", "@every 168h", "@every 1h30m", "@every 90s"]
)
def test_the_descriptors_kfps_scheduler_takes_are_accepted(expression):
    assert submit.check_cron(expression) == expression


@pytest.mark.parametrize(
    "expression", ["@fortnightly", "@every", "@every 7d", "@every h", "@weekly 3"]
)
def test_a_wrong_descriptor_is_refused(expression):
    with pytest.raises(submit.ScheduleError):
        submit.check_cron(expression)


def test_make_schedule_refuses_a_five_field_cron(repo_root):
    result = subprocess.run(
        ["make", "-s", "schedule", "CRON=0 3 * * 1"], cwd=repo_root, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "5 fields, but KFP expects 6 with seconds first" in result.stderr


def test_run_uploads_a_version_and_starts_a_run_in_the_experiment(spec):
    client = kfp_client(pipeline_id=None)
    params = {"data_md5": "abc.dir", "profile": "uni-gpu"}
    url = submit.submit_run(client, "https://kfp.example/pipeline/", spec, "sha-1", params, "team")
    assert url == "https://kfp.example/pipeline/#/runs/details/r-1"
    client.upload_pipeline.assert_called_once_with(
        str(spec), pipeline_name="cellseg", namespace=None
    )  # standalone: pipelines are shared, the only kind
    client.upload_pipeline_version.assert_called_once_with(
        str(spec), pipeline_version_name="sha-1", pipeline_id="p-1"
    )
    client.create_experiment.assert_called_once_with("cellseg", namespace="team")
    run = client.run_pipeline.call_args.kwargs
    assert run["pipeline_id"] == "p-1" and run["version_id"] == "v-1"
    assert run["experiment_id"] == "e-1" and run["params"] == params
    assert run["service_account"] == "cellseg-pipeline"  # the account the RBAC is written for


def test_schedule_replaces_the_existing_recurring_run_instead_of_duplicating(spec):
    old = SimpleNamespace(display_name=submit.RECURRING_RUN, recurring_run_id="j-1")
    other = SimpleNamespace(display_name="someone-else", recurring_run_id="x-9")
    client = kfp_client(pipeline_id="p-1", recurring=[old, other])
    job = submit.schedule(client, spec, "sha-2", "0 0 3 * * 1", {"data_md5": ""}, "team")
    assert job == "j-2"
    client.delete_recurring_run.assert_called_once_with("j-1")  # not the other one
    # the new run exists before the old one goes: a failed create leaves the old schedule
    names = [c[0] for c in client.mock_calls]
    assert names.index("create_recurring_run") < names.index("delete_recurring_run")
    created = client.create_recurring_run.call_args.kwargs
    assert created["cron_expression"] == "0 0 3 * * 1" and created["job_name"] == "cellseg-retrain"
    assert created["max_concurrency"] == 1 and created["no_catchup"] is True
    assert created["params"] == {"data_md5": ""}  # the newest data revision at run time
    assert created["service_account"] == "cellseg-pipeline"
    client.upload_pipeline.assert_not_called()  # the pipeline exists: only a new version


def test_a_failed_create_leaves_the_old_schedule_in_place(spec):
    old = SimpleNamespace(display_name=submit.RECURRING_RUN, recurring_run_id="j-1")
    client = kfp_client(pipeline_id="p-1", recurring=[old])
    client.create_recurring_run.side_effect = RuntimeError("API server said 500")
    with pytest.raises(RuntimeError):
        submit.schedule(client, spec, "sha-2", "@weekly", {"data_md5": ""}, "team")
    client.delete_recurring_run.assert_not_called()


def test_unschedule_removes_only_the_retraining_run():
    runs = [
        SimpleNamespace(display_name=submit.RECURRING_RUN, recurring_run_id="j-1"),
        SimpleNamespace(display_name="someone-else", recurring_run_id="x-9"),
    ]
    client = kfp_client(recurring=runs)
    assert submit.unschedule(client, "team") == 1
    assert client.delete_recurring_run.call_args_list == [call("j-1")]
    client.create_experiment.assert_not_called()


def test_unschedule_with_nothing_scheduled_creates_and_deletes_nothing():
    client = kfp_client()
    client.get_experiment.side_effect = ValueError("No experiment is found with name cellseg.")
    assert submit.unschedule(client, "team") == 0
    client.get_experiment.assert_called_once_with(experiment_name="cellseg", namespace="team")
    client.create_experiment.assert_not_called()
    client.delete_recurring_run.assert_not_called()


def test_the_image_reaches_every_step(spec):
    import yaml

    text = spec.read_text()
    executors = next(yaml.safe_load_all(text))["deploymentSpec"]["executors"]
    assert text.count("image: reg.example/cellseg:abc") == len(executors) == 11
    assert "cellseg-kfp:0.1.0" not in text


def test_cluster_runs_carry_the_same_tags_as_local_runs():
    params = submit.run_params("abc.dir", "reg.example/cellseg:abc", "uni-gpu")
    tags = params["run_tags"]
    assert tags["cellseg.profile"] == "uni-gpu" == params["profile"]
    assert tags["cellseg.data_md5"] == "abc.dir" and tags["cellseg.image"] == params["image"]
    assert set(tags) >= {"cellseg.git_commit", "cellseg.profile", "cellseg.image"}


def test_the_default_namespace_is_the_one_the_manifests_use(monkeypatch, tmp_path):
    """Without KFP_NAMESPACE, runs go where the volumes, RBAC and runtime are (cellseg)."""
    import yaml

    seen = {}

    def fake_client(host, namespace, token):
        seen["namespace"] = namespace
        return kfp_client(pipeline_id="p-1", recurring=[])

    monkeypatch.setenv("KFP_HOST", "https://kfp.example/pipeline")
    monkeypatch.delenv("KFP_NAMESPACE", raising=False)
    monkeypatch.setattr(submit, "make_client", fake_client)
    assert submit.main(["unschedule"]) == 0
    base = Path(__file__).resolve().parents[2] / "manifests" / "base" / "kustomization.yaml"
    assert seen["namespace"] == yaml.safe_load(base.read_text())["namespace"] == "cellseg"


def test_a_schedule_can_follow_a_data_repositorys_branch():
    """`make schedule DATA_REPO=... DATA_REV=main`: each run pulls the branch as it is then,
    so the schedule pins no md5; a revision without a repository is refused."""
    data = submit.data_params("https://git.example.com/lab/bccd-data.git", "main")
    params = submit.run_params("", "reg.example/cellseg:abc", "uni-gpu", data)
    assert params["data_repo"] == "https://git.example.com/lab/bccd-data.git"
    assert params["data_rev"] == "main" and params["data_md5"] == ""
    assert submit.data_params("", "") == {}
    with pytest.raises(submit.ScheduleError, match="--data-rev needs --data-repo"):
        submit.data_params("", "main")


def test_a_multi_user_backend_gets_the_pipeline_in_the_users_namespace(spec):
    """On a multi-user KFP 2.17.0 a shared pipeline (no namespace) is authorised against KFP's
    own namespace by the v2beta1 CreatePipeline (backend/src/apiserver/server/pipeline_server.go
    ``canAccessPipeline``: ``resourceAttributes.Namespace = common.GetPodNamespace()``), where a
    profile's user has no rights; the SDK's multipart upload skips the check for "" today
    (pipeline_upload_server.go ``canUploadVersionedPipeline``), and a backend with
    ``REQUIRE_NAMESPACE_FOR_PIPELINES`` refuses it outright (validation/namespace.go). In the
    runs' namespace it is the user's on every version; it is looked up there too."""
    client = kfp_client(pipeline_id=None, multi_user=True)
    submit.submit_run(client, "https://kfp.example/pipeline", spec, "sha-1", {}, "team")
    client.list_pipelines.assert_called_once()
    assert client.list_pipelines.call_args.kwargs["namespace"] == "team"
    assert '"stringValue": "cellseg"' in client.list_pipelines.call_args.kwargs["filter"]
    client.upload_pipeline.assert_called_once_with(
        str(spec), pipeline_name="cellseg", namespace="team"
    )
    existing = kfp_client(pipeline_id="p-9", multi_user=True)
    submit.schedule(existing, spec, "sha-2", "@weekly", {}, "team")
    existing.upload_pipeline.assert_not_called()
    existing.upload_pipeline_version.assert_called_once_with(
        str(spec), pipeline_version_name="sha-2", pipeline_id="p-9"
    )
