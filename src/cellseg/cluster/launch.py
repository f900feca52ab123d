"""Submit a training job (``cellseg.cluster.jobs``) and wait for it, with bounded loops throughout.

Waiting uses a watch on the job from its ``resourceVersion``: a watch that expires (410 Gone)
or a connection that drops is re-synced with a fresh read, never fatal. A job Kueue holds
suspended is *queued*, not failed: the running timeout counts from the last admission, a job
suspended again after admission (preempted) is queued once more, and a separate queue timeout,
from the last suspension, says clearly that the job never left the queue. While the job runs,
its pods are read for failures only they show (:mod:`cellseg.cluster.pods`) and rank 0's log is
streamed (:mod:`cellseg.cluster.logs`). A retried step whose job already exists (409) adopts it
when it is the same job (same ``cellseg.kfp/job-key``) and replaces it when it failed. A job the
API server rejects, or an engine whose CRD is missing, is one line.

A job never outlives its step's reason to exist: one the operator marks Failed is deleted once
its logs are read (Trainer would rebuild a failed TrainJob's JobSet when its TTL removes it); a
queued job Kueue has made no Workload for is deleted with the reason (Kueue does not manage that
kind); SIGTERM sends the DELETE first, before anything else, since KFP's launcher does not
forward the signal and the process is killed soon after; and the step's Argo Workflow is read
every loop, so a terminated run deletes the job even where the signal never arrives.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass

from cellseg.cluster.api_calls import (
    ARGO_GROUP,
    ARGO_VERSION,
    KUEUE_CONFIG,
    KUEUE_GROUP,
    KUEUE_JOB_UID_LABEL,
    KUEUE_VERSION,
)
from cellseg.cluster.jobs import ENGINES, KEY_ANNOTATION, QUEUE_LABEL, Engine, JobSpec, build_job
from cellseg.cluster.logs import LogFollower, pod_log_stream
from cellseg.cluster.pods import DEFAULT_LIMITS, Limits, pod_failure, timestamp
from cellseg.errors import JobFailed
from cellseg.settings import PYTORCHJOB, TRAINJOB

INSTALL = {  # what a cluster without the engine's API needs
    TRAINJOB: "install Kubeflow Trainer v2.3+ and the project's TrainingRuntime "
    f"(manifests/components/trainer-v2), or use training_engine={PYTORCHJOB}",
    PYTORCHJOB: "install the Kubeflow Training Operator v1.9, or use "
    f"training_engine={TRAINJOB} (Kubeflow Trainer v2)",
}
WORKLOAD_GRACE_SECONDS = 180.0  # Kueue makes a job's Workload within seconds of its creation


@dataclass(frozen=True)
class JobStatus:
    state: str  # succeeded | failed | queued | running
    detail: str = ""  # the operator's reason and message


def job_status(engine: Engine, job: dict) -> JobStatus:
    """Where ``job`` stands, from its conditions and its suspend flag."""
    conditions = (job.get("status") or {}).get("conditions") or []
    for c in reversed([c for c in conditions if c.get("status") == "True"]):
        detail = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
        if c["type"] == engine.succeeded:
            return JobStatus("succeeded", detail)
        if c["type"] == "Failed":
            return JobStatus("failed", detail)
    spec = job.get("spec") or {}
    suspended = spec.get("suspend") or (spec.get("runPolicy") or {}).get("suspend")
    if suspended:
        return JobStatus("queued", "suspended until Kueue admits it")
    latest = conditions[-1]["type"] if conditions else "submitted"
    return JobStatus("running", latest)


def rejection(engine: Engine, job: dict, err) -> str:
    """One line from an API server's refusal (400/422), naming the field when it says which."""
    name = f"{engine.kind} {job['metadata']['namespace']}/{job['metadata']['name']}"
    try:
        body = json.loads(err.body or "{}")
    except ValueError:
        body = {}
    causes = (body.get("details") or {}).get("causes") or []
    if causes:
        c = causes[0]
        return f"{name} rejected by the API server: {c.get('field', '?')}: {c.get('message', '')}"
    message = (body.get("message") or str(err.reason)).splitlines()[0]
    return f"{name} rejected by the API server: {message}"


def missing_api(engine: Engine) -> str:
    return (
        f"{engine.kind} ({engine.group}/{engine.version} {engine.plural}) is not served by this "
        f"cluster: {INSTALL[engine.name]}"
    )


def _is_disconnect(err: Exception) -> bool:
    """A dropped or refused connection, as urllib3 (under the kubernetes client) reports it."""
    from urllib3.exceptions import MaxRetryError, ProtocolError, ReadTimeoutError

    return isinstance(err, ProtocolError | ReadTimeoutError | MaxRetryError | ConnectionError)


class JobRunner:
    """Create one kind of training job, follow its first pod's log, and wait for it."""

    def __init__(
        self,
        engine: Engine,
        api_client,
        poll_seconds: float = 10.0,
        delete_timeout: float = 300.0,
        out=sys.stdout,
        limits: Limits = DEFAULT_LIMITS,
        progress_every: float = 30.0,
        workflow: str = "",
        workload_grace: float = WORKLOAD_GRACE_SECONDS,
    ):
        from kubernetes import client

        self.engine = engine
        self.api = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.poll_seconds = poll_seconds
        self.delete_timeout = delete_timeout
        self.out = out
        self.limits = limits
        self.progress_every = progress_every  # carriage-return progress: one line this often
        self.workflow = workflow  # the step's Argo Workflow; "" = not read
        self.workload_grace = workload_grace
        self._workflow_unreadable = False
        self._follower: LogFollower | None = None
        self._follower_pod: str | None = None

    def _address(self, namespace: str) -> tuple:
        e = self.engine
        return e.group, e.version, namespace, e.plural

    def get(self, name: str, namespace: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(*self._address(namespace), name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def request_delete(self, name: str, namespace: str, custom=None) -> None:
        """Send the DELETE and return at once (gone or never created: nothing to do)."""
        from kubernetes.client.exceptions import ApiException

        try:
            (custom or self.custom).delete_namespaced_custom_object(
                *self._address(namespace), name, propagation_policy="Background",
                _request_timeout=10,
            )  # fmt: skip
        except ApiException as err:
            if err.status != 404:
                raise

    def delete(self, name: str, namespace: str) -> None:
        """Delete the job and wait, at most ``delete_timeout``, until it is gone."""
        self.request_delete(name, namespace)
        deadline = time.monotonic() + self.delete_timeout
        while self.get(name, namespace) is not None:
            if time.monotonic() > deadline:
                waited = f"{self.delete_timeout:.0f} s"
                raise JobFailed(
                    f"{self.engine.kind} {namespace}/{name}: still there {waited} after "
                    "deletion (a finalizer?); delete it by hand and retry"
                )
            time.sleep(min(self.poll_seconds, 2.0))

    def submit(self, job: dict) -> dict:
        """Create ``job``; on a name clash adopt the same job, replace a failed or finished
        different one, and refuse to touch a different one that is still running."""
        from kubernetes.client.exceptions import ApiException

        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        for _ in range(2):  # the second try follows a replacement
            try:
                return self.custom.create_namespaced_custom_object(*self._address(namespace), job)
            except ApiException as err:
                if err.status in (400, 422):
                    raise JobFailed(rejection(self.engine, job, err)) from None
                if err.status == 404 and not self.served():
                    raise JobFailed(missing_api(self.engine)) from None
                if err.status != 409:
                    raise
            existing = self.get(name, namespace)
            if existing is None:
                continue  # deleted in between: create again
            theirs = (existing["metadata"].get("annotations") or {}).get(KEY_ANNOTATION)
            same = theirs == job["metadata"]["annotations"][KEY_ANNOTATION]
            state = job_status(self.engine, existing).state
            if same and state != "failed":
                print(f"{self.engine.kind} {namespace}/{name}: already {state}, following it",
                      file=self.out)  # fmt: skip
                return self.adopt(existing, job)
            if not same and state in ("running", "queued"):
                raise JobFailed(
                    f"{self.engine.kind} {namespace}/{name} exists, is {state} and is not this "
                    "job (another image or arguments); delete it or use another pipeline run"
                )
            self.delete(name, namespace)  # failed, or finished and different: start afresh
        raise JobFailed(f"{self.engine.kind} {namespace}/{name}: could not be created")

    def served(self) -> bool:
        """Whether the API server serves the engine's resource (its CRD is installed)."""
        from kubernetes.client.exceptions import ApiException

        e = self.engine
        try:
            found = self.api.call_api(
                f"/apis/{e.group}/{e.version}", "GET", response_type="object",
                auth_settings=["BearerToken"], _return_http_data_only=True,
            )  # fmt: skip
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return any(r.get("name") == e.plural for r in (found or {}).get("resources", []))

    def adopt(self, existing: dict, job: dict) -> dict:
        """``existing`` made this step's: owned by this step's pod (the garbage collector then
        deletes it with this pod, not with the pod of the attempt that created it)."""
        owners = job["metadata"].get("ownerReferences")
        if not owners or existing["metadata"].get("ownerReferences") == owners:
            return existing
        name, namespace = existing["metadata"]["name"], existing["metadata"]["namespace"]
        patch = {"metadata": {"ownerReferences": owners}}
        return self.custom.patch_namespaced_custom_object(*self._address(namespace), name, patch)

    def _pod_log(self, pod: str, namespace: str, tail: int = 0, previous=False) -> list[str]:
        from kubernetes.client.exceptions import ApiException

        extra = {"tail_lines": tail} if tail else {}
        try:
            text = self.core.read_namespaced_pod_log(
                pod, namespace, container=self.engine.container, previous=previous, **extra
            )
        except ApiException:
            return []  # not started yet, or no previous container
        return text.splitlines()

    def _pods(self, name: str, namespace: str) -> list:
        selector = f"{self.engine.pod_label}={name}"
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return sorted(pods, key=lambda p: p.metadata.name)

    def last_lines(self, name: str, namespace: str, n: int = 20) -> str:
        parts = []
        for pod in self._pods(name, namespace):
            lines = self._pod_log(pod.metadata.name, namespace, tail=n)
            parts.append(f"--- {pod.metadata.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def stuck_pod(self, pods: list, namespace: str) -> str | None:
        """The first pod stuck for good (:mod:`cellseg.cluster.pods`) as one line, followed by
        the crashed container's last log lines; None while every pod may still make progress."""
        if not pods:
            return None
        events = self.core.list_namespaced_event(
            namespace, field_selector="involvedObject.kind=Pod"
        ).items
        by_pod: dict[str, list[dict]] = {}
        for event in events:
            by_pod.setdefault(event.involved_object.name, []).append(
                self.api.sanitize_for_serialization(event)
            )
        now = time.time()
        for pod in pods:
            as_dict = self.api.sanitize_for_serialization(pod)
            failure = pod_failure(as_dict, by_pod.get(pod.metadata.name, []), now, self.limits)
            if failure is None:
                continue
            report = failure.line()
            if failure.wants_log:
                name = pod.metadata.name
                lines = self._pod_log(name, namespace, 20, previous=True) or self._pod_log(
                    name, namespace, 20
                )
                report += "".join(f"\n  {line}" for line in lines)
            return report
        return None

    def follow_rank0(self, pods: list, namespace: str) -> None:
        """Stream the first pod's (rank 0's) log; a new rank-0 pod gets a new stream."""
        rank0 = pods[0].metadata.name if pods else None
        if rank0 is None or (self._follower and self._follower_pod == rank0):
            return
        self.stop_following()
        stream = pod_log_stream(self.core, namespace, rank0, self.engine.container)
        emit = lambda line: print(line, file=self.out, flush=True)  # noqa: E731
        self._follower = LogFollower(stream, emit, self.progress_every).start()
        self._follower_pod = rank0

    def stop_following(self, seconds: float = 3.0) -> None:
        if self._follower is not None:
            self._follower.stop(seconds)
        self._follower, self._follower_pod = None, None

    def workloads(self, job: dict) -> list[dict]:
        """The Kueue Workloads of ``job`` (Kueue labels each with its job's uid)."""
        return self.custom.list_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, job["metadata"]["namespace"], "workloads",
            label_selector=f"{KUEUE_JOB_UID_LABEL}={job['metadata'].get('uid')}",
        )["items"]  # fmt: skip

    def eviction(self, job: dict) -> str:
        """Why Kueue suspended an admitted job: its Workload's Evicted/Preempted condition."""
        try:
            workloads = self.workloads(job)
        except Exception:  # no Kueue, no rights: the reason is unknown, not fatal
            return ""
        reasons = []
        for workload in workloads:
            for c in (workload.get("status") or {}).get("conditions") or []:
                if c.get("type") in ("Evicted", "Preempted") and c.get("status") == "True":
                    reasons.append(
                        ": ".join(x for x in (c["type"], c.get("reason"), c.get("message")) if x)
                    )
        return "; ".join(reasons)

    def require_workload(self, job: dict, waited: float) -> None:
        """Return when Kueue made a Workload for the queued ``job`` (or it cannot be asked: no
        rights); else delete the job, which nothing would ever admit, and raise
        :class:`JobFailed` saying why."""
        from kubernetes.client.exceptions import ApiException

        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        what = f"{self.engine.kind} {namespace}/{name}"
        try:
            if self.workloads(job):
                return
            why = (
                f"{what}: no Kueue Workload {waited:.0f} s after creation, so nothing will admit "
                f"it: add {self.engine.kueue_framework} to integrations.frameworks in ConfigMap "
                f"{KUEUE_CONFIG[0]}/{KUEUE_CONFIG[1]} and restart Kueue, or run without "
                "queue_name; deleted"
            )
        except ApiException as err:
            if err.status != 404:
                return
            why = (
                f"{what}: Kueue's Workload API ({KUEUE_GROUP}/{KUEUE_VERSION}) is not served, so "
                "nothing will admit it: install Kueue v0.16+ or run without queue_name; deleted"
            )
        self.delete(name, namespace)
        raise JobFailed(why)

    def run_terminated(self, namespace: str) -> str:
        """Why the step's pipeline run is being terminated; "" while it is not (or the Workflow
        cannot be read). KFP terminates a run by setting its Workflow's
        ``spec.activeDeadlineSeconds`` to 0, Argo's own stop and terminate set ``spec.shutdown``."""
        from kubernetes.client.exceptions import ApiException

        if not self.workflow or self._workflow_unreadable:
            return ""
        where = f"Workflow {namespace}/{self.workflow}"
        try:
            workflow = self.custom.get_namespaced_custom_object(
                ARGO_GROUP, ARGO_VERSION, namespace, "workflows", self.workflow
            )
        except ApiException as err:
            if err.status == 404:
                return f"{where} was deleted"
            if err.status == 403:  # no rights: SIGTERM and the owner reference stay
                self._workflow_unreadable = True
                print(f"{where}: may not read it (403); a terminated run is seen by its SIGTERM "
                      "only", file=self.out, flush=True)  # fmt: skip
            return ""  # a passing error (429, 5xx, an expiring token): read again next loop
        except Exception as err:
            if _is_disconnect(err):
                return ""
            raise
        spec = workflow.get("spec") or {}
        if spec.get("shutdown"):
            return f"{where} has shutdown={spec['shutdown']}"
        if spec.get("activeDeadlineSeconds") == 0:
            return f"{where} has activeDeadlineSeconds=0 (terminated)"
        if workflow["metadata"].get("deletionTimestamp"):
            return f"{where} is being deleted"
        return ""

    def next_version(self, job: dict, seconds: float) -> dict | None:
        """The job after its next change, or as it is after ``seconds`` without one; None once
        deleted. An expired watch (410) or a dropped connection re-reads the job instead."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        stream = watch.Watch().stream(
            self.custom.list_namespaced_custom_object,
            *self._address(namespace),
            field_selector=f"metadata.name={name}",
            resource_version=job["metadata"]["resourceVersion"],
            timeout_seconds=max(1, int(seconds)),
        )
        try:
            for event in stream:
                if event["type"] == "DELETED":
                    return None
                if event["type"] in ("ADDED", "MODIFIED"):
                    return event["object"]
            return job  # no change within `seconds`
        except ApiException as err:
            if err.status != 410:
                raise
        except Exception as err:
            if not _is_disconnect(err):
                raise
            time.sleep(min(self.poll_seconds, 2.0))  # let a restarting server come back
        return self._reread(name, namespace, job)

    def _reread(self, name: str, namespace: str, job: dict) -> dict | None:
        try:
            return self.get(name, namespace)
        except Exception as err:
            if not _is_disconnect(err):
                raise
            return job  # still unreachable: the caller's deadlines bound the retries

    def wait(self, job: dict, timeout_seconds: float, queue_timeout_seconds: float) -> None:
        """Until the job succeeds; raises :class:`JobFailed` when it fails, is deleted, stays
        queued longer than ``queue_timeout_seconds`` (counted from its last suspension), runs
        longer than ``timeout_seconds`` after its last admission, or a pod is stuck for good
        (then it is deleted too). A job Kueue suspends again after admission (preemption) waits
        in the queue once more; its running deadline restarts when it is admitted again."""
        try:
            self._wait(job, timeout_seconds, queue_timeout_seconds)
        finally:
            self.stop_following()

    def _wait(self, job: dict, timeout_seconds: float, queue_timeout_seconds: float) -> None:
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        what = f"{self.engine.kind} {namespace}/{name}"
        queue = (job["metadata"].get("labels") or {}).get(QUEUE_LABEL, "")
        suspended_since, admitted, ever_admitted = time.monotonic(), None, False
        created = timestamp(job["metadata"].get("creationTimestamp")) or time.time()
        kueue_took = not queue  # without a queue, nothing to check
        current: dict | None = job
        while True:
            if current is None:
                raise JobFailed(f"{what} was deleted before it finished")
            status = job_status(self.engine, current)
            now = time.monotonic()
            if status.state == "succeeded":
                return
            terminated = self.run_terminated(namespace)
            if terminated:
                self.delete(name, namespace)
                raise JobFailed(f"{what}: the pipeline run is terminated ({terminated}); deleted")
            if status.state == "failed":
                tails = self.last_lines(name, namespace)  # before the pods go with the job
                self.delete(name, namespace)
                raise JobFailed(f"{what} failed: {status.detail}; deleted\n{tails}".rstrip())
            if status.state != "queued":
                kueue_took = True  # admitted (or never suspended): Kueue took it
            elif not kueue_took and time.time() - created >= self.workload_grace:
                self.require_workload(current, time.time() - created)  # or deleted, raised
                kueue_took = True
            if status.state == "queued":
                if admitted is not None:  # suspended again after admission: preempted
                    self.stop_following()
                    why = self.eviction(current) or "no Workload condition says why"
                    print(f"{what}: suspended again after admission ({why}); waiting in "
                          f"{queue or 'the queue'}", file=self.out, flush=True)  # fmt: skip
                    admitted, suspended_since = None, now
                left = suspended_since + queue_timeout_seconds - now
                if left <= 0:
                    self.delete(name, namespace)
                    never = "not re-admitted" if ever_admitted else "never admitted, nothing ran"
                    raise JobFailed(
                        f"{what} expired while queued in {queue or 'Kueue'} after "
                        f"{queue_timeout_seconds:.0f} s: {never}; deleted"
                    )
            else:
                if admitted is None:
                    if ever_admitted:
                        print(f"{what}: admitted again; its running deadline restarts",
                              file=self.out, flush=True)  # fmt: skip
                    admitted, ever_admitted = now, True
                left = admitted + timeout_seconds - now
                if left <= 0:
                    self.delete(name, namespace)
                    raise JobFailed(
                        f"{what} not finished {timeout_seconds:.0f} s after admission; deleted"
                    )
                pods = self._pods(name, namespace)
                stuck = self.stuck_pod(pods, namespace)
                if stuck is not None:
                    self.delete(name, namespace)
                    first, _, tail = stuck.partition("\n")
                    raise JobFailed(f"{what}: {first}; deleted\n{tail}".rstrip())
                self.follow_rank0(pods, namespace)
            if not kueue_took:  # wake in time to look for its Workload
                left = min(left, max(1.0, created + self.workload_grace - time.time()))
            current = self.next_version(current, min(self.poll_seconds, left))


class Cancelled(BaseException):
    """SIGTERM (a terminated pipeline run): not an ``Exception``, so no retry loop swallows it."""


@contextlib.contextmanager
def deleted_on_sigterm(runner: JobRunner, name: str, namespace: str):
    """Delete the job when the step is terminated. The DELETE is sent from the signal handler,
    before anything else: KFP's launcher, this process's parent, handles no signal and exits on
    the same SIGTERM (Argo's emissary signals the whole process group), and the container ends
    with it, so this process may be killed any moment after, not after the grace period."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread only
        return
    from kubernetes import client

    # its own connection pool: the handler may interrupt a request holding the runner's
    sigterm_api = client.CustomObjectsApi(client.ApiClient(runner.api.configuration))

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the delete
        with contextlib.suppress(Exception):  # tried again below, with the wait
            runner.request_delete(name, namespace, sigterm_api)
        raise Cancelled

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except Cancelled:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        runner.delete_timeout = min(runner.delete_timeout, 20.0)
        runner.delete(name, namespace)
        runner.stop_following(0.5)
        print(f"{runner.engine.kind} {namespace}/{name}: deleted (SIGTERM)", file=runner.out,
              flush=True)  # fmt: skip
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_job(spec: JobSpec, api_client=None) -> None:
    """Submit ``spec`` as a job of its engine and wait (credentials: :func:`api_client`); on
    SIGTERM the job is deleted."""
    from cellseg.cluster.client import api_client as default_client

    job = spec.job
    runner = JobRunner(
        ENGINES[job.training_engine],
        api_client or default_client(),
        limits=Limits(pending_timeout_seconds=job.pending_timeout_minutes * 60),
        workflow=spec.workflow,
    )
    with deleted_on_sigterm(runner, spec.name, spec.namespace):
        created = runner.submit(build_job(spec))
        runner.wait(created, spec.timeout_seconds, job.queue_timeout_hours * 3600)
