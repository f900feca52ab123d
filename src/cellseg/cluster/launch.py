"""Submit a training job (``cellseg.cluster.jobs``) and wait for it, with bounded loops throughout.

Waiting uses a watch on the job from its ``resourceVersion``: a watch that expires (410 Gone)
or a connection that drops is re-synced with a fresh read, never fatal. A job Kueue holds
suspended is *queued*, not failed: the running timeout counts from admission, and a separate
queue timeout says clearly that the job never left the queue. A retried step whose job already
exists (409) adopts it when it is the same job (same ``cellseg.kfp/job-key``) and replaces it
when it failed. A job the API server rejects is one line naming the field.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from cellseg.cluster.jobs import ENGINES, KEY_ANNOTATION, QUEUE_LABEL, Engine, JobSpec, build_job
from cellseg.errors import JobFailed


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
    ):
        from kubernetes import client

        self.engine = engine
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.poll_seconds = poll_seconds
        self.delete_timeout = delete_timeout
        self.out = out
        self._shown: dict[str, int] = {}

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

    def delete(self, name: str, namespace: str) -> None:
        """Delete the job and wait, at most ``delete_timeout``, until it is gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                *self._address(namespace), name, propagation_policy="Background"
            )
        except ApiException as err:
            if err.status != 404:
                raise
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
                return existing
            if not same and state in ("running", "queued"):
                raise JobFailed(
                    f"{self.engine.kind} {namespace}/{name} exists, is {state} and is not this "
                    "job (another image or arguments); delete it or use another pipeline run"
                )
            self.delete(name, namespace)  # failed, or finished and different: start afresh
        raise JobFailed(f"{self.engine.kind} {namespace}/{name}: could not be created")

    def _pod_log(self, pod: str, namespace: str) -> list[str]:
        from kubernetes.client.exceptions import ApiException

        try:
            text = self.core.read_namespaced_pod_log(
                pod, namespace, container=self.engine.container
            )
        except ApiException:
            return []  # not started yet
        return text.splitlines()

    def _pods(self, name: str, namespace: str) -> list[str]:
        selector = f"{self.engine.pod_label}={name}"
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return sorted(p.metadata.name for p in pods)

    def show_new_lines(self, name: str, namespace: str) -> None:
        """The first pod's (rank 0's) log lines not shown yet."""
        pods = self._pods(name, namespace)
        if not pods:
            return
        lines = self._pod_log(pods[0], namespace)
        shown = self._shown.get(pods[0], 0)
        for line in lines[shown:]:
            print(line, file=self.out, flush=True)
        self._shown[pods[0]] = max(shown, len(lines))

    def last_lines(self, name: str, namespace: str, n: int = 20) -> str:
        parts = []
        for pod in self._pods(name, namespace):
            lines = self._pod_log(pod, namespace)[-n:]
            parts.append(f"--- {pod} ---\n" + "\n".join(lines))
        return "\n".join(parts)

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
        queued longer than ``queue_timeout_seconds`` or runs longer than ``timeout_seconds``
        after admission (then it is deleted too)."""
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        what = f"{self.engine.kind} {namespace}/{name}"
        queue = (job["metadata"].get("labels") or {}).get(QUEUE_LABEL, "")
        started, admitted = time.monotonic(), None
        current: dict | None = job
        while True:
            if current is None:
                raise JobFailed(f"{what} was deleted before it finished")
            status = job_status(self.engine, current)
            now = time.monotonic()
            if status.state == "succeeded":
                self.show_new_lines(name, namespace)
                return
            if status.state == "failed":
                tails = self.last_lines(name, namespace)
                raise JobFailed(f"{what} failed: {status.detail}\n{tails}".rstrip())
            if status.state == "queued":
                left = started + queue_timeout_seconds - now
                if left <= 0:
                    self.delete(name, namespace)
                    raise JobFailed(
                        f"{what} expired while queued in {queue or 'Kueue'} after "
                        f"{queue_timeout_seconds:.0f} s: never admitted, nothing ran; deleted"
                    )
            else:
                admitted = admitted or now
                left = admitted + timeout_seconds - now
                if left <= 0:
                    self.delete(name, namespace)
                    raise JobFailed(
                        f"{what} not finished {timeout_seconds:.0f} s after admission; deleted"
                    )
                self.show_new_lines(name, namespace)
            current = self.next_version(current, min(self.poll_seconds, left))


def run_job(
    engine: str,
    spec: JobSpec,
    api_client=None,
    queue_timeout_seconds: float = 7 * 24 * 3600,
) -> None:
    """Submit ``spec`` as a job of ``engine`` and wait (in-cluster credentials by default)."""
    if api_client is None:
        from kubernetes import client, config

        config.load_incluster_config()
        api_client = client.ApiClient()
    if engine not in ENGINES:
        raise JobFailed(f"training engine {engine!r}: expected one of {', '.join(ENGINES)}")
    runner = JobRunner(ENGINES[engine], api_client)
    created = runner.submit(build_job(engine, spec))
    runner.wait(created, spec.timeout_seconds, queue_timeout_seconds)
