"""The launcher end to end against a real API server, for both engines, as the pipeline's
service account. There is no operator here: each test writes the job's status as the Training
Operator or Trainer v2 would, and checks what the launcher does."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time

import pytest

from cellseg.cluster.jobs import ENGINES, JobSpec, build_job
from cellseg.cluster.launch import JobRunner
from cellseg.errors import JobFailed
from cellseg.settings import TrainingJobSettings
from tests.cluster.conftest import NAMESPACE, PIPELINE_SA

pytestmark = pytest.mark.cluster
ENGINE_NAMES = sorted(ENGINES)


JOB_FIELDS = set(TrainingJobSettings.__dataclass_fields__)


def spec(name: str, engine: str = "pytorchjob", **overrides) -> JobSpec:
    """A job ``name`` of ``engine``; ``overrides`` are JobSpec or TrainingJobSettings fields."""
    job = {"image": "reg.example/cellseg:abc", "training_engine": engine}
    job |= {k: v for k, v in overrides.items() if k in JOB_FIELDS}
    values = dict(
        name=name, namespace=NAMESPACE, job=TrainingJobSettings(**job),
        train_args=("--phase", "1", "--data", "/mnt/checkpoints/r/dataset"),
    )  # fmt: skip
    return JobSpec(**values | {k: v for k, v in overrides.items() if k not in JOB_FIELDS})


class Operator:
    """Writes a job's status through the status subresource, as its controller would."""

    def __init__(self, server, engine):
        from kubernetes import client

        self.engine = ENGINES[engine]
        self.custom = client.CustomObjectsApi(server.client("admin"))

    def address(self):
        e = self.engine
        return e.group, e.version, NAMESPACE, e.plural

    def wait_for(self, name: str, seconds: float = 20) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                return self.custom.get_namespaced_custom_object(*self.address(), name)
            except Exception:
                time.sleep(0.2)
        raise AssertionError(f"{name} was never created")

    def condition(self, name: str, ctype: str, reason: str = "", message: str = "") -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        job = self.custom.get_namespaced_custom_object(*self.address(), name)
        conditions = [
            {**c, "status": "False"} for c in (job.get("status") or {}).get("conditions") or []
        ]
        conditions.append(
            {"type": ctype, "status": "True", "reason": reason or ctype,
             "message": message or ctype, "lastTransitionTime": now}
        )  # fmt: skip
        if self.engine.name == "pytorchjob":
            for c in conditions:
                c["lastUpdateTime"] = now
        body = {"status": {"conditions": conditions}}
        self.custom.patch_namespaced_custom_object_status(*self.address(), name, body)

    def admit(self, name: str) -> None:
        """What Kueue does on admission: resume the suspended job."""
        patch = {"spec": {"suspend": False}}
        if self.engine.name == "pytorchjob":
            patch = {"spec": {"runPolicy": {"suspend": False}}}
        self.custom.patch_namespaced_custom_object(*self.address(), name, patch)


def launch_in_thread(runner: JobRunner, job: dict, timeout: float, queue_timeout: float = 60):
    """Submit and wait in a thread, as the pipeline step does; returns (thread, outcome)."""
    outcome: dict = {}

    def work():
        try:
            outcome["created"] = runner.submit(job)
            runner.wait(outcome["created"], timeout, queue_timeout)
            outcome["result"] = "succeeded"
        except Exception as err:
            outcome["error"] = err

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, outcome


def finish(thread, outcome, seconds: float = 60) -> dict:
    thread.join(seconds)
    assert not thread.is_alive(), "the launcher did not return"
    return outcome


@pytest.fixture
def runner_for(installed):
    def make(engine: str, url: str | None = None, poll: float = 1.0) -> JobRunner:
        api = installed.client(PIPELINE_SA, url)
        return JobRunner(
            ENGINES[engine], api, poll_seconds=poll, delete_timeout=20, out=io.StringIO()
        )

    return make


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_created_running_succeeded_returns(installed, runner_for, engine):
    name = f"ok-{engine}"
    job = build_job(spec(name, node_selector={"pool": "h200"}, engine=engine))
    thread, outcome = launch_in_thread(runner_for(engine), job, timeout=60)
    operator = Operator(installed, engine)
    stored = operator.wait_for(name)
    assert '"pool": "h200"' in json.dumps(stored["spec"])  # the node selector reached the API
    operator.condition(name, "Created")
    time.sleep(1.5)
    assert thread.is_alive()  # created is not done
    operator.condition(name, "Running" if engine == "pytorchjob" else "Created")
    time.sleep(1.5)
    assert thread.is_alive()
    operator.condition(name, ENGINES[engine].succeeded)
    assert finish(thread, outcome).get("result") == "succeeded", outcome


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_failed_job_raises_with_the_operators_reason_and_message(installed, runner_for, engine):
    name = f"fail-{engine}"
    thread, outcome = launch_in_thread(runner_for(engine), build_job(spec(name, engine=engine)), 60)
    operator = Operator(installed, engine)
    operator.wait_for(name)
    operator.condition(name, "Failed", "BackoffLimitExceeded", "rank 0 exited with code 1")
    error = finish(thread, outcome).get("error")
    assert isinstance(error, JobFailed), outcome
    assert "BackoffLimitExceeded: rank 0 exited with code 1; deleted" in str(error)
    # deleted once its logs are read: a Failed job left behind holds its pods until a TTL, and
    # a TrainJob's would be rebuilt by Trainer when that TTL removes its JobSet
    assert runner_for(engine).get(name, NAMESPACE) is None


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_no_progress_within_the_timeout_deletes_the_job_and_raises(installed, runner_for, engine):
    name = f"slow-{engine}"
    runner = runner_for(engine)
    thread, outcome = launch_in_thread(runner, build_job(spec(name, engine=engine)), timeout=3)
    error = finish(thread, outcome, 40).get("error")
    assert isinstance(error, JobFailed) and "not finished 3 s after admission" in str(error)
    assert runner.get(name, NAMESPACE) is None  # deleted, not left to hold GPUs


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_retried_step_adopts_its_running_job_and_replaces_a_failed_one(
    installed, runner_for, engine
):
    name = f"retry-{engine}"
    runner = runner_for(engine)
    operator = Operator(installed, engine)
    first = runner.submit(build_job(spec(name, train_args=("--mlflow-run", "a"), engine=engine)))
    operator.condition(name, "Created")
    # the retry: same job but a new MLflow run id -> adopted, not recreated
    adopted = runner.submit(build_job(spec(name, train_args=("--mlflow-run", "b"), engine=engine)))
    assert adopted["metadata"]["uid"] == first["metadata"]["uid"]
    operator.condition(name, "Failed", "Evicted", "node drained")
    replaced = runner.submit(build_job(spec(name, train_args=("--mlflow-run", "c"), engine=engine)))
    assert replaced["metadata"]["uid"] != first["metadata"]["uid"]
    assert not (replaced.get("status") or {}).get("conditions")
    with pytest.raises(JobFailed, match="is not this job"):  # a different, live job: untouched
        runner.submit(build_job(spec(name, image="reg.example/other:1", engine=engine)))
    runner.delete(name, NAMESPACE)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_job_the_server_rejects_is_one_line_naming_the_field(runner_for, engine):
    job = build_job(spec("Not_A_DNS_Name", engine=engine))
    with pytest.raises(JobFailed) as err:
        runner_for(engine).submit(job)
    message = str(err.value)
    assert "\n" not in message and "rejected by the API server: metadata.name:" in message


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_queued_job_waits_and_the_timeout_counts_from_admission(installed, runner_for, engine):
    name = f"queued-{engine}"
    job = build_job(spec(name, queue_name="cellseg-gpu", engine=engine))
    thread, outcome = launch_in_thread(runner_for(engine), job, timeout=4, queue_timeout=60)
    operator = Operator(installed, engine)
    operator.wait_for(name)
    time.sleep(6)  # longer than the running timeout, but queued: not failed
    assert thread.is_alive(), outcome
    operator.admit(name)
    time.sleep(1)
    operator.condition(name, ENGINES[engine].succeeded)
    assert finish(thread, outcome).get("result") == "succeeded", outcome


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_a_job_never_admitted_says_it_expired_while_queued(installed, runner_for, engine):
    name = f"stuck-{engine}"
    runner = runner_for(engine)
    job = build_job(spec(name, queue_name="cellseg-gpu", engine=engine))
    thread, outcome = launch_in_thread(runner, job, timeout=60, queue_timeout=3)
    error = finish(thread, outcome, 40).get("error")
    assert isinstance(error, JobFailed), outcome
    assert "expired while queued in cellseg-gpu after 3 s: never admitted" in str(error)
    assert runner.get(name, NAMESPACE) is None


def test_an_expired_watch_is_resynced_not_fatal(installed, runner_for):
    """Watching from a compacted resourceVersion gets 410 Gone from the real server; the
    launcher re-reads the job and carries on."""
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    engine, name = "trainjob", "expired-watch"
    runner = runner_for(engine)
    operator = Operator(installed, engine)
    old = runner.submit(build_job(spec(name, engine=engine)))
    for ctype in ("Created", "Created", "Created"):
        operator.condition(name, ctype)  # newer revisions...
    time.sleep(5)  # ...and two compactions (every 2 s) drop the old one
    with pytest.raises(ApiException) as gone:  # the precondition: the server really says 410
        for _ in watch.Watch().stream(
            runner.custom.list_namespaced_custom_object, *operator.address(),
            field_selector=f"metadata.name={name}",
            resource_version=old["metadata"]["resourceVersion"], timeout_seconds=2,
        ):  # fmt: skip
            pass
    assert gone.value.status == 410
    fresh = runner.next_version(old, 2)
    assert int(fresh["metadata"]["resourceVersion"]) > int(old["metadata"]["resourceVersion"])
    operator.condition(name, "Complete")
    runner.wait(old, 30, 30)  # from the stale object: resyncs, sees Complete, returns
    runner.delete(name, NAMESPACE)


class Proxy:
    """A TCP forwarder to the API server whose connections the test can cut."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> int:
        with self.lock:
            cut, self.sockets = self.sockets, []
        for s in cut:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        return len(cut)

    def close(self):
        self.listener.close()
        self.cut()


def test_a_dropped_connection_while_waiting_is_survived(installed, runner_for):
    engine, name = "pytorchjob", "dropped"
    port = int(installed.url.rsplit(":", 1)[1])
    proxy = Proxy(port)
    try:
        runner = runner_for(engine, url=f"https://127.0.0.1:{proxy.port}", poll=3.0)
        thread, outcome = launch_in_thread(runner, build_job(spec(name, engine=engine)), timeout=60)
        operator = Operator(installed, engine)
        operator.wait_for(name)
        time.sleep(1)  # the launcher is inside its watch now
        assert proxy.cut() > 0  # every open connection, the watch's included, is cut
        operator.condition(name, "Running")
        operator.condition(name, "Succeeded")
        assert finish(thread, outcome).get("result") == "succeeded", outcome
    finally:
        proxy.close()
