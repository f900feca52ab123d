"""Failures that show only on a job's pods, against a real API server: the test writes the pods,
their status and their events the way the operator, the kubelet and the scheduler would, and the
launcher must fail the step in one line naming the pod and the reason, and delete the job."""

from __future__ import annotations

import io
import time

import pytest

from cellseg.cluster.jobs import ENGINES, build_job
from cellseg.cluster.launch import JobRunner
from cellseg.cluster.pods import Limits
from cellseg.errors import JobFailed
from tests.cluster.conftest import NAMESPACE, PIPELINE_SA
from tests.cluster.kubelet import FakeKubelet, Kubelet, log_stamp
from tests.cluster.test_launcher import Operator, finish, launch_in_thread, spec

pytestmark = pytest.mark.cluster
NODE = "gpu-node-crash"


@pytest.fixture
def runner_for(installed):
    def make(engine: str, **limits) -> JobRunner:
        api = installed.client(PIPELINE_SA)
        limits = Limits(**{"image_pull_grace_seconds": 60, "pending_timeout_seconds": 600,
                           **limits})  # fmt: skip
        return JobRunner(ENGINES[engine], api, poll_seconds=1, delete_timeout=20,
                         out=io.StringIO(), limits=limits)  # fmt: skip

    return make


@pytest.fixture(scope="module")
def kubelet(installed, tmp_path_factory):
    fake = FakeKubelet(tmp_path_factory.mktemp("kubelet"))
    Kubelet(installed).node(NODE, fake.port)
    yield fake
    fake.close()


def running_job(installed, runner, engine: str, name: str, node: str = ""):
    """A job the operator has started, with its rank-0 pod; returns (thread, outcome, pod)."""
    thread, outcome = launch_in_thread(runner, build_job(spec(name, engine=engine)), timeout=120)
    operator = Operator(installed, engine)
    operator.wait_for(name)
    operator.condition(name, "Running" if engine == "pytorchjob" else "Created")
    pod = f"{name}-node-0-0"
    e = ENGINES[engine]
    Kubelet(installed).pod(pod, {e.pod_label: name}, e.container, node=node)
    return thread, outcome, pod


def failed_in_one_line(outcome: dict, runner: JobRunner, name: str) -> str:
    error = outcome.get("error")
    assert isinstance(error, JobFailed), outcome
    assert runner.get(name, NAMESPACE) is None  # deleted: no GPUs held by a stuck job
    return str(error).splitlines()[0]


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_wrong_image_fails_after_the_grace_naming_the_image(installed, runner_for, engine):
    name, image = f"pull-{engine}", "reg.example/cellseg:typo"
    runner = runner_for(engine, image_pull_grace_seconds=4)
    thread, outcome, pod = running_job(installed, runner, engine, name)
    kubelet = Kubelet(installed)
    waiting = {"waiting": {"reason": "ImagePullBackOff",
                           "message": f'Back-off pulling image "{image}"'}}  # fmt: skip
    kubelet.container(pod, ENGINES[engine].container, image, state=waiting)
    kubelet.event(pod, "Failed", f'Failed to pull image "{image}": manifest unknown')
    time.sleep(2.5)
    assert thread.is_alive(), outcome  # within the grace: a registry hiccup heals
    line = failed_in_one_line(finish(thread, outcome, 30), runner, name)
    assert f"pod {pod}: ImagePullBackOff: cannot pull image {image}" in line
    assert "manifest unknown" in line


def test_an_unschedulable_pod_fails_after_the_pending_timeout_with_the_schedulers_message(
    installed, runner_for
):
    engine, name = "trainjob", "unschedulable"
    runner = runner_for(engine, pending_timeout_seconds=4)
    thread, outcome, pod = running_job(installed, runner, engine, name)
    message = "0/5 nodes are available: 5 Insufficient nvidia.com/gpu."
    Kubelet(installed).unschedulable(pod, message)
    time.sleep(2)
    assert thread.is_alive(), outcome  # pending for a while is normal (an autoscaler may add one)
    line = failed_in_one_line(finish(thread, outcome, 30), runner, name)
    assert f"pod {pod}: Unschedulable: pending" in line and message in line


def test_a_job_queued_by_kueue_is_waiting_not_unschedulable(installed, runner_for):
    engine, name = "pytorchjob", "gated"
    runner = runner_for(engine, pending_timeout_seconds=1)
    job = build_job(spec(name, queue_name="cellseg-gpu", engine=engine))
    thread, outcome = launch_in_thread(runner, job, timeout=120, queue_timeout=120)
    Operator(installed, engine).wait_for(name)
    pod = f"{name}-master-0"
    kubelet = Kubelet(installed)
    kubelet.pod(pod, {ENGINES[engine].pod_label: name}, ENGINES[engine].container)
    kubelet.unschedulable(pod, "0/5 nodes are available: 5 Insufficient nvidia.com/gpu.")
    time.sleep(4)  # past the pending timeout, but the job is suspended: Kueue has it
    assert thread.is_alive(), outcome
    Operator(installed, engine).condition(name, "Succeeded")
    assert finish(thread, outcome).get("result") == "succeeded", outcome


def test_a_missing_secret_fails_at_once_naming_it(installed, runner_for):
    engine, name = "pytorchjob", "nosecret"
    runner = runner_for(engine)
    thread, outcome, pod = running_job(installed, runner, engine, name)
    message = "couldn't find key HF_TOKEN in Secret cellseg/cellseg-hf-token"
    waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}
    Kubelet(installed).container(pod, ENGINES[engine].container, "x:1", state=waiting)
    line = failed_in_one_line(finish(thread, outcome, 20), runner, name)
    assert line.endswith(f"pod {pod}: CreateContainerConfigError: {message}; deleted")


def test_an_oom_killed_container_fails_with_reason_and_exit_code(installed, runner_for):
    engine, name = "trainjob", "oom"
    runner = runner_for(engine)
    thread, outcome, pod = running_job(installed, runner, engine, name)
    state = {"state": {"running": {"startedAt": log_stamp()[:19] + "Z"}},
             "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
             "restartCount": 1}  # fmt: skip
    Kubelet(installed).container(pod, ENGINES[engine].container, "x:1", phase="Running", **state)
    line = failed_in_one_line(finish(thread, outcome, 20), runner, name)
    assert f"pod {pod}: OOMKilled:" in line and "exit code 137" in line
    assert "train_memory_per_node" in line  # what to change


def test_a_crash_loop_fails_with_exit_code_and_the_last_log_lines(installed, runner_for, kubelet):
    engine, name = "trainjob", "crashloop"
    runner = runner_for(engine)
    container = ENGINES[engine].container
    pod = f"{name}-node-0-0"
    stamp = log_stamp()
    kubelet.scripts[(pod, container)] = [
        [(f"{stamp} Traceback (most recent call last):\n{stamp} KeyError: 'lr'\n".encode(), 0)]
    ]
    thread, outcome, pod = running_job(installed, runner, engine, name, node=NODE)
    helper = Kubelet(installed)
    state = {"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
             "lastState": {"terminated": {"reason": "Error", "exitCode": 1}},
             "restartCount": 3}  # fmt: skip
    helper.container(pod, container, "x:1", phase="Running", **state)
    error = str(finish(thread, outcome, 20).get("error"))
    first = error.splitlines()[0]
    assert f"pod {pod}: CrashLoopBackOff: container node keeps exiting (Error, exit code 1" in first
    assert "KeyError: 'lr'" in error  # the crashed container's last lines follow
    assert runner.get(name, NAMESPACE) is None


def test_the_pipeline_account_may_read_what_the_launcher_watches(installed):
    from tests.cluster.test_manifests_and_rbac import can_i

    for verb in ("get", "list", "watch"):
        assert can_i(installed, PIPELINE_SA, verb, "events", NAMESPACE), verb
    for resource in ("trainjobs.trainer.kubeflow.org", "pytorchjobs.kubeflow.org"):
        assert can_i(installed, PIPELINE_SA, "patch", resource, NAMESPACE)  # to re-own on retry
        assert not can_i(installed, PIPELINE_SA, "patch", resource, "default")
    assert not can_i(installed, PIPELINE_SA, "create", "events", NAMESPACE)
