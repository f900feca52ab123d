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
from tests.cluster.test_launcher import Operator, spec

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sigterm_deletes_the_job_within_seconds(installed, tmp_path, engine):
    name = f"sigterm-{engine}"
    config = tmp_path / "kubeconfig"  # the pipeline's account, as in a step's pod
    config.write_text(yaml.safe_dump(kubeconfig(installed.url, installed.tokens[PIPELINE_SA])))
    env = {**os.environ, "KUBECONFIG": str(config), "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "cellseg.cli", "launch", "--training-engine", engine, "--name", name,
         "--namespace", NAMESPACE, "--image", "reg.example/cellseg:abc"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
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
