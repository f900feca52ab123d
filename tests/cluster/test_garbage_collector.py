"""Kubernetes' own garbage collector deletes a training job when the step's pod that owns it goes:
a real ``kube-controller-manager`` running only its garbage-collector controller against the test
API server. It is built from the same Debian source as the envtest kube-apiserver by
``tests/cluster/build-controller-manager.sh`` (cached in ``$KUBEBUILDER_ASSETS``)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from cellseg.cluster.jobs import ENGINES, build_job
from tests.cluster.conftest import NAMESPACE
from tests.cluster.test_launcher import Operator, spec

pytestmark = pytest.mark.cluster
HOW_TO_BUILD = (
    "no kube-controller-manager in $KUBEBUILDER_ASSETS: build it (about 20 min, once) with "
    "`tests/cluster/build-controller-manager.sh`"
)


@pytest.fixture(scope="module")
def garbage_collector(installed):
    binary = Path(os.environ.get("KUBEBUILDER_ASSETS", "")) / "kube-controller-manager"
    if not binary.is_file():
        if os.environ.get("CI"):  # .ci/run builds it: there this test must run
            pytest.fail(HOW_TO_BUILD)
        pytest.skip(HOW_TO_BUILD)
    log = (installed.root / "controller-manager.log").open("w")
    manager = subprocess.Popen(
        [str(binary), f"--kubeconfig={installed.root / 'kubeconfig'}",
         "--controllers=garbagecollector", "--leader-elect=false",
         "--port=0", "--secure-port=0"],  # serve nothing: only the controller's loop
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        time.sleep(1)
        assert manager.poll() is None, (installed.root / "controller-manager.log").read_text()
        yield manager
    finally:
        manager.terminate()
        try:
            manager.wait(timeout=20)
        except subprocess.TimeoutExpired:
            manager.kill()
            manager.wait(timeout=10)


def gone(operator: Operator, name: str, seconds: float) -> bool:
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            operator.custom.get_namespaced_custom_object(*operator.address(), name)
        except ApiException as err:
            if err.status == 404:
                return True
            raise
        time.sleep(0.5)
    return False


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_the_job_goes_when_the_step_pod_that_owns_it_goes(installed, garbage_collector, engine):
    from kubernetes import client

    core = client.CoreV1Api(installed.client("admin"))
    operator = Operator(installed, engine)
    pods, jobs = {}, {}
    for role in ("deleted", "kept"):
        body = {"metadata": {"name": f"step-gc-{engine}-{role}"},
                "spec": {"containers": [{"name": "main", "image": "x:1"}]}}  # fmt: skip
        pods[role] = core.create_namespaced_pod(NAMESPACE, body)
        owner = (pods[role].metadata.name, pods[role].metadata.uid)
        jobs[role] = f"gc-{engine}-{role}"
        job = build_job(spec(jobs[role], owner_pod=owner, engine=engine))
        operator.custom.create_namespaced_custom_object(*operator.address(), job)
    core.delete_namespaced_pod(pods["deleted"].metadata.name, NAMESPACE, grace_period_seconds=0)
    assert gone(operator, jobs["deleted"], 60), "the garbage collector left the job"
    assert not gone(operator, jobs["kept"], 3)  # a job whose step pod lives stays
    core.delete_namespaced_pod(pods["kept"].metadata.name, NAMESPACE, grace_period_seconds=0)
    assert gone(operator, jobs["kept"], 60)
