"""Kueue preemption, a cluster without the engine's API, and per-node sizes, against a real API
server. The test does what Kueue does: resume a job (admission), suspend it again with its
Workload's Evicted condition (preemption)."""

from __future__ import annotations

import dataclasses
import io
import json
import time

import pytest

from cellseg.cluster.api_calls import KUEUE_GROUP, KUEUE_VERSION
from cellseg.cluster.jobs import ENGINES, build_job
from cellseg.cluster.launch import JobRunner
from cellseg.errors import JobFailed
from tests.cluster.conftest import NAMESPACE, PIPELINE_SA
from tests.cluster.test_launcher import Operator, finish, launch_in_thread, spec
from tests.crds import crd as schema

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def kueue_workloads(installed):
    crd = schema("kueue/kueue.x-k8s.io_workloads.yaml", k8s_120=True)
    created = installed.kubectl("create", "--validate=false", "-f", str(crd), check=False)
    assert created.returncode == 0 or "AlreadyExists" in created.stderr, created.stderr
    for _ in range(60):  # `kubectl wait` fails until the server has written any condition
        established = installed.kubectl("wait", "--for=condition=Established", "--timeout=5s",
                                        "crd/workloads.kueue.x-k8s.io", check=False)  # fmt: skip
        if established.returncode == 0:
            return installed
        time.sleep(0.5)
    raise AssertionError(established.stderr)


def runner(server, engine: str) -> JobRunner:
    return JobRunner(ENGINES[engine], server.client(PIPELINE_SA), poll_seconds=0.5,
                     delete_timeout=20, out=io.StringIO())  # fmt: skip


def suspend(operator: Operator, name: str) -> None:
    """Kueue's preemption: the admitted job is suspended again."""
    patch = {"spec": {"suspend": True}}
    if operator.engine.name == "pytorchjob":
        patch = {"spec": {"runPolicy": {"suspend": True}}}
    operator.custom.patch_namespaced_custom_object(*operator.address(), name, patch)


def evicted_workload(operator: Operator, name: str) -> None:
    """The job's Workload as Kueue writes it when another workload preempts it: through
    ``v1beta2``, the storage version of kubernetes-sigs/kueue v0.19.2's
    ``config/components/crd/bases/kueue.x-k8s.io_workloads.yaml`` (v1beta1 is still served), the
    version the launcher reads."""
    address, workload = job_workload(operator, name)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    condition = {"type": "Evicted", "status": "True", "reason": "Preempted",
                 "message": "Preempted to accommodate a workload (UID: 42) in the ClusterQueue",
                 "lastTransitionTime": now}  # fmt: skip
    status = {"status": {"conditions": [condition]}}
    operator.custom.patch_namespaced_custom_object_status(
        *address, workload["metadata"]["name"], status
    )


def job_workload(operator: Operator, name: str) -> tuple[tuple, dict]:
    """The Workload Kueue makes for a job of a framework it manages, labelled with the job's
    uid; returns its address and body."""
    job = operator.wait_for(name)
    address = (KUEUE_GROUP, KUEUE_VERSION, NAMESPACE, "workloads")  # as Kueue 0.19 stores it
    workload = {
        "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}", "kind": "Workload",
        "metadata": {"name": f"{operator.engine.name}-{name}-1a2b3",
                     "labels": {"kueue.x-k8s.io/job-uid": job["metadata"]["uid"]}},
        "spec": {"queueName": "cellseg-gpu", "podSets": [{
            "name": "main", "count": 1,
            "template": {"spec": {"containers": [{"name": "c", "image": "x:1"}]}}}]},
    }  # fmt: skip
    operator.custom.create_namespaced_custom_object(*address, workload)
    return address, workload


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_preempted_job_waits_and_its_deadline_restarts_on_readmission(kueue_workloads, engine):
    name = f"preempted-{engine}"
    r = runner(kueue_workloads, engine)
    job = build_job(spec(name, queue_name="cellseg-gpu", engine=engine))
    thread, outcome = launch_in_thread(r, job, timeout=5, queue_timeout=60)
    operator = Operator(kueue_workloads, engine)
    operator.wait_for(name)
    operator.admit(name)
    time.sleep(3)
    evicted_workload(operator, name)
    suspend(operator, name)
    time.sleep(4)  # 7 s after the first admission: past the 5 s deadline, but queued again
    assert thread.is_alive(), outcome
    operator.admit(name)
    time.sleep(3)  # 3 s after re-admission: within a deadline that restarted
    assert thread.is_alive(), outcome
    operator.condition(name, ENGINES[engine].succeeded)
    assert finish(thread, outcome).get("result") == "succeeded", outcome
    log = r.out.getvalue()
    assert "suspended again after admission (Evicted: Preempted: Preempted to accommodate" in log
    assert "admitted again; its running deadline restarts" in log


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_queued_job_kueue_makes_no_workload_for_fails_naming_its_integrations(
    kueue_workloads, engine
):
    """Kueue creates a Workload only for the job kinds enabled in its configuration's
    ``integrations.frameworks``; a suspended job of another kind is never admitted, and the
    launcher used to say "queued" for a week. kubernetes-sigs/kueue v0.19.2
    config/components/manager/controller_manager_config.yaml (the ConfigMap
    ``kueue-system/kueue-manager-config``, key ``controller_manager_config.yaml``) and
    charts/kueue/values.yaml enable ``trainer.kubeflow.org/trainjob`` but leave
    ``# - "kubeflow.org/pytorchjob"`` commented out; Kueue labels each Workload it makes with
    ``kueue.x-k8s.io/job-uid`` (pkg/controller/jobframework/reconciler.go, ``JobUIDLabel``)."""
    name = f"unmanaged-{engine}"
    r = runner(kueue_workloads, engine)
    r.workload_grace = 2.0
    job = build_job(spec(name, queue_name="cellseg-gpu", engine=engine))
    thread, outcome = launch_in_thread(r, job, timeout=60, queue_timeout=600)
    error = finish(thread, outcome, 40).get("error")
    assert isinstance(error, JobFailed), outcome
    message = str(error)
    assert "\n" not in message and "no Kueue Workload" in message, message
    assert f"add {ENGINES[engine].kueue_framework} to integrations.frameworks in " in message
    assert "kueue-system/kueue-manager-config" in message
    assert r.get(name, NAMESPACE) is None


def test_a_queued_job_with_its_workload_keeps_waiting_past_the_grace(kueue_workloads):
    engine, name = "pytorchjob", "managed"
    r = runner(kueue_workloads, engine)
    r.workload_grace = 2.0
    job = build_job(spec(name, queue_name="cellseg-gpu", engine=engine))
    thread, outcome = launch_in_thread(r, job, timeout=60, queue_timeout=600)
    operator = Operator(kueue_workloads, engine)
    job_workload(operator, name)
    time.sleep(4)
    assert thread.is_alive(), outcome
    operator.admit(name)
    time.sleep(1)
    operator.condition(name, ENGINES[engine].succeeded)
    assert finish(thread, outcome).get("result") == "succeeded", outcome


def test_the_queue_timeout_counts_from_the_last_suspension(kueue_workloads):
    engine, name = "trainjob", "requeued"
    r = runner(kueue_workloads, engine)
    job = build_job(spec(name, queue_name="cellseg-gpu", engine=engine))
    thread, outcome = launch_in_thread(r, job, timeout=60, queue_timeout=5)
    operator = Operator(kueue_workloads, engine)
    operator.wait_for(name)
    time.sleep(3)
    operator.admit(name)
    time.sleep(3)
    suspend(operator, name)  # 6 s after the start: the queue timeout restarts here
    time.sleep(3)
    assert thread.is_alive(), outcome
    error = finish(thread, outcome, 30).get("error")
    assert isinstance(error, JobFailed), outcome
    assert "expired while queued in cellseg-gpu after 5 s: not re-admitted; deleted" in str(error)
    assert "no Workload condition says why" in r.out.getvalue()  # none was written this time
    assert r.get(name, NAMESPACE) is None


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_missing_crd_is_one_line_naming_the_api_and_what_to_do(installed, engine):
    # an API version the server does not serve stands for an uninstalled operator
    unserved = dataclasses.replace(ENGINES[engine], version="v9")
    r = JobRunner(unserved, installed.client(PIPELINE_SA), out=io.StringIO())
    with pytest.raises(JobFailed) as err:
        r.submit(build_job(spec(f"nocrd-{engine}", engine=engine)))
    message = str(err.value)
    assert "\n" not in message
    assert f"{unserved.kind} ({unserved.group}/v9 {unserved.plural}) is not served" in message
    other = {"trainjob": "pytorchjob", "pytorchjob": "trainjob"}[engine]
    assert f"or use training_engine={other}" in message


def test_a_request_to_a_missing_namespace_is_not_called_a_missing_crd(installed):
    r = JobRunner(ENGINES["trainjob"], installed.client("admin"), out=io.StringIO())
    with pytest.raises(Exception) as err:
        r.submit(build_job(spec("nowhere", namespace="no-such-namespace", engine="trainjob")))
    assert "is not served" not in str(err.value)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_cpu_memory_and_shm_per_node_reach_the_server(installed, engine):
    name = f"sizes-{engine}"
    r = runner(installed, engine)
    stored = r.submit(
        build_job(
            spec(
                name,
                train_cpu_per_node="30",
                train_memory_per_node="200Gi",
                train_shm_per_node="48Gi",
                engine=engine,
            )
        )
    )
    text = json.dumps(stored["spec"])
    assert '"cpu": "30"' in text and '"memory": "200Gi"' in text
    assert '"sizeLimit": "48Gi"' in text  # the TrainJob's through its runtime patch
    r.delete(name, NAMESPACE)


def test_the_pipeline_account_may_read_kueue_workloads(kueue_workloads):
    from tests.cluster.test_manifests_and_rbac import can_i

    for verb in ("get", "list"):
        assert can_i(kueue_workloads, PIPELINE_SA, verb, "workloads.kueue.x-k8s.io", NAMESPACE)
        assert not can_i(kueue_workloads, PIPELINE_SA, verb, "workloads.kueue.x-k8s.io", "default")
    assert not can_i(kueue_workloads, PIPELINE_SA, "update", "workloads.kueue.x-k8s.io", NAMESPACE)
