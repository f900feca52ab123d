"""A terminated pipeline run leaves no training job behind, against a real API server: the
launcher deletes its job on SIGTERM (a real ``cellseg launch`` subprocess), the job is owned by
the step's pod (the garbage collector's part is ``test_garbage_collector.py``), a retried step
takes the ownership of the job it adopts, and finished TrainJobs' JobSets carry a TTL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cellseg.cluster.jobs import ENGINES, build_job
from cellseg.steps.train import step_pod
from tests.cluster.conftest import NAMESPACE, PIPELINE_SA, REPO, kubeconfig
from tests.cluster.kubelet import Kubelet, kubelet_on_node, log_stamp
from tests.cluster.test_launcher import Operator, spec

pytestmark = pytest.mark.cluster


def start_launcher(installed, tmp_path, engine: str, name: str) -> subprocess.Popen:
    """``cellseg launch`` as a step runs it, with the pipeline's account."""
    config = tmp_path / "kubeconfig"  # the pipeline's account, as in a step's pod
    config.write_text(yaml.safe_dump(kubeconfig(installed.url, installed.tokens[PIPELINE_SA])))
    env = {**os.environ, "KUBECONFIG": str(config), "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    return subprocess.Popen(
        [sys.executable, "-m", "cellseg.cli", "launch", "--training-engine", engine, "--name", name,
         "--namespace", NAMESPACE, "--image", "reg.example/cellseg:abc"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_sigterm_then_sigkill_200_ms_later_still_deletes_the_job(installed, tmp_path):
    """KFP's launcher runs the component with a plain ``exec.Command`` and no signal handling
    (kubeflow/pipelines 2.17.0 backend/src/v2/component/launcher_v2.go ``execute``; the same in
    2.5.0); Argo's emissary signals the whole process group (argoproj/argo-workflows v4.0.5
    cmd/argoexec/commands/emissary.go) and SIGKILLs the step after its grace
    (workflow/controller/pod/queue.go). Once the Go launcher exits on SIGTERM the container
    ends, so the Python process may die any moment after SIGTERM: the DELETE must be sent
    before anything else, here while rank 0's log stream holds the follower thread."""
    engine, name = "pytorchjob", "sigkill"
    container = ENGINES[engine].container
    pod = f"{name}-master-0"
    (tmp_path / "kubelet").mkdir()
    with kubelet_on_node(installed, tmp_path / "kubelet", "gpu-node-sigkill") as kubelet:
        kubelet.scripts[(pod, container)] = [[(log_line("rank 0: step 1"), 60)]]
        launcher = start_launcher(installed, tmp_path, engine, name)
        operator = Operator(installed, engine)
        try:
            operator.wait_for(name, seconds=60)
            Kubelet(installed).pod(pod, {ENGINES[engine].pod_label: name}, container,
                                   node="gpu-node-sigkill")  # fmt: skip
            operator.condition(name, "Running")
            read_until(launcher, "rank 0: step 1")  # the follower is inside its stream now
            launcher.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            launcher.kill()
            launcher.wait(30)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait(10)
    assert launcher.returncode == -signal.SIGKILL  # it had not finished by itself
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            operator.custom.get_namespaced_custom_object(*operator.address(), name)
        except Exception as err:
            assert getattr(err, "status", None) == 404, err
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} still exists after SIGTERM and SIGKILL 0.2 s later")


def log_line(text: str) -> bytes:
    return f"{log_stamp()} {text}\n".encode()


def read_until(process: subprocess.Popen, text: str, seconds: float = 60) -> None:
    """Read ``process``'s output until a line holds ``text``."""
    deadline = time.monotonic() + seconds
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        seen.append(line)
        if text in line:
            return
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"{text!r} never printed:\n{''.join(seen)}")


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sigterm_deletes_the_job_within_seconds(installed, tmp_path, engine):
    name = f"sigterm-{engine}"
    launcher = start_launcher(installed, tmp_path, engine, name)
    operator = Operator(installed, engine)
    try:
        operator.wait_for(name, seconds=60)
        operator.condition(name, "Running" if engine == "pytorchjob" else "Created")
        time.sleep(1)  # the launcher is waiting on the running job now
        launcher.send_signal(signal.SIGTERM)
        start = time.monotonic()
        output, _ = launcher.communicate(timeout=30)
        gone_after = time.monotonic() - start
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
    assert launcher.returncode == 128 + signal.SIGTERM, output
    assert f"{name}: deleted (SIGTERM)" in output
    with pytest.raises(Exception) as missing:
        operator.custom.get_namespaced_custom_object(*operator.address(), name)
    assert getattr(missing.value, "status", None) == 404
    assert gone_after < 10, gone_after


def test_the_job_is_owned_by_the_steps_pod_and_a_retry_takes_it_over(installed, monkeypatch):
    from kubernetes import client

    from cellseg.cluster.launch import JobRunner

    engine, name = "trainjob", "owned"
    core = client.CoreV1Api(installed.client("admin"))
    pods = []
    for attempt in ("1", "2"):  # the first step's pod, then the retry's
        body = {"metadata": {"name": f"step-{name}-{attempt}"},
                "spec": {"containers": [{"name": "main", "image": "x:1"}]}}  # fmt: skip
        pods.append(core.create_namespaced_pod(NAMESPACE, body))
    runner = JobRunner(ENGINES[engine], installed.client(PIPELINE_SA), poll_seconds=1)
    owners = []
    for pod in pods:  # the downward API's POD_NAME / POD_UID, read by the step
        monkeypatch.setenv("POD_NAME", pod.metadata.name)
        monkeypatch.setenv("POD_UID", pod.metadata.uid)
        job = runner.submit(build_job(spec(name, owner_pod=step_pod(), engine=engine)))
        owners.append(job["metadata"]["ownerReferences"])
    first, second = ([(o["kind"], o["name"], o["uid"]) for o in refs] for refs in owners)
    assert first == [("Pod", pods[0].metadata.name, pods[0].metadata.uid)]
    assert second == [("Pod", pods[1].metadata.name, pods[1].metadata.uid)]  # adopted, re-owned
    stored = Operator(installed, engine).wait_for(name)
    assert stored["metadata"]["ownerReferences"] == owners[1]
    runner.delete(name, NAMESPACE)
    for pod in pods:
        core.delete_namespaced_pod(pod.metadata.name, NAMESPACE, grace_period_seconds=0)


def test_finished_trainjobs_jobsets_have_a_ttl(installed):
    ttl = installed.kubectl(
        "get", "trainingruntime", "cellseg-torch", "-n", NAMESPACE,
        "-o", "jsonpath={.spec.template.spec.ttlSecondsAfterFinished}",
    )  # fmt: skip
    assert ttl.stdout == "604800"  # a week, as PyTorchJobs' ttlSecondsAfterFinished
    pytorchjob = build_job(spec("ttl", engine="pytorchjob"))
    assert pytorchjob["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == int(ttl.stdout)


@pytest.mark.parametrize("terminate", [{"activeDeadlineSeconds": 0}, {"shutdown": "Terminate"}])
def test_a_terminated_workflow_deletes_its_steps_job(installed, terminate):
    """Where the SIGTERM never reaches the launcher, the run's Workflow still says it is over.
    KFP terminates a run with the merge patch ``{"spec": {"activeDeadlineSeconds": 0}}``
    (kubeflow/pipelines 2.17.0 backend/src/common/util/execution_spec.go ``GetTerminatePatch``,
    called by ``TerminateWorkflow`` in backend/src/apiserver/resource/resource_manager.go; the
    same in 2.5.0); ``argo terminate``/``stop`` set ``spec.shutdown``
    (argoproj/argo-workflows v4.0.5 workflow/controller/operator.go). The step's pod carries
    ``workflows.argoproj.io/workflow`` (v4.0.5 workflow/common/common.go ``LabelKeyWorkflow``,
    set in workflow/controller/workflowpod.go), which the pipeline hands to the step."""
    import io

    from kubernetes import client

    from cellseg.cluster.launch import JobRunner
    from tests.cluster.test_launcher import finish, launch_in_thread

    custom = client.CustomObjectsApi(installed.client("admin"))
    workflow = f"cellseg-run-{len(terminate)}{next(iter(terminate)).lower()[:5]}"
    body = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": workflow},
        "spec": {"entrypoint": "main", "templates": []},
    }
    custom.create_namespaced_custom_object("argoproj.io", "v1alpha1", NAMESPACE, "workflows", body)
    engine, name = "trainjob", f"wf-{workflow}"
    runner = JobRunner(ENGINES[engine], installed.client(PIPELINE_SA), poll_seconds=1,
                       delete_timeout=20, out=io.StringIO(), workflow=workflow)  # fmt: skip
    thread, outcome = launch_in_thread(runner, build_job(spec(name, engine=engine)), 120)
    operator = Operator(installed, engine)
    operator.wait_for(name)
    operator.condition(name, "Created")
    time.sleep(2)
    assert thread.is_alive(), outcome  # a running Workflow: the job runs on
    custom.patch_namespaced_custom_object(
        "argoproj.io", "v1alpha1", NAMESPACE, "workflows", workflow, {"spec": terminate}
    )
    error = finish(thread, outcome, 30).get("error")
    assert "the pipeline run is terminated" in str(error) and "; deleted" in str(error), outcome
    assert runner.get(name, NAMESPACE) is None
    custom.delete_namespaced_custom_object("argoproj.io", "v1alpha1", NAMESPACE, "workflows",
                                           workflow)  # fmt: skip
