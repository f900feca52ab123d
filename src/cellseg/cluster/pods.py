"""Why a training job's pods cannot make progress, from what the kubelet and the scheduler write.

Most failures on a real cluster never reach the job's conditions: a wrong image, a pod no node can
take, a missing Secret, a crash loop or an OOM kill show only on the pods (their status) and their
events. :func:`pod_failure` reads one pod, as the API server returns it (a dict, camelCase keys),
with that pod's events, and says whether it is stuck for good; the launcher then fails the step in
one line and deletes the job. Pure functions: the tests build the dicts a kubelet would write.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cellseg.errors import one_line
from cellseg.settings import TRAINING_JOB

IMAGE_PULL = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")
WAITING_FOR_KUEUE = ("SchedulingGated",)  # Kueue's admission gate: queued, not unschedulable


@dataclass(frozen=True)
class Limits:
    """How long a pod may look stuck before it is a failure."""

    image_pull_grace_seconds: float = 180.0  # a registry hiccup heals within a few retries
    # room for a cluster autoscaler to add a node
    pending_timeout_seconds: float = TRAINING_JOB.pending_timeout_minutes * 60


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class PodFailure:
    pod: str
    reason: str  # the kubelet's or the scheduler's word: ImagePullBackOff, Unschedulable, ...
    detail: str
    wants_log: bool = False  # a crash: the launcher appends the container's last log lines

    def line(self) -> str:
        return f"pod {self.pod}: {self.reason}: {self.detail}"


def timestamp(value: str | None) -> float | None:
    """Seconds since the epoch from an RFC 3339 time as the API server writes it."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _condition(pod: dict, ctype: str) -> dict:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return {}


def _latest_event(events: list[dict], reasons: tuple[str, ...]) -> dict:
    matching = [e for e in events if e.get("reason") in reasons]
    key = lambda e: timestamp(e.get("lastTimestamp") or e.get("eventTime")) or 0.0  # noqa: E731
    return max(matching, key=key) if matching else {}


def _terminated(status: dict) -> tuple[dict, str]:
    """The container's termination (now or its last one) and which."""
    state, last = status.get("state") or {}, status.get("lastState") or {}
    if state.get("terminated"):
        return state["terminated"], "now"
    return last.get("terminated") or {}, "last"


def container_failure(pod: str, status: dict, events: list[dict], scheduled_at: float | None,
                      now: float, limits: Limits) -> PodFailure | None:  # fmt: skip
    """One container's status (``status.containerStatuses[i]``) read for a failure."""
    waiting = (status.get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason", "")
    image = status.get("image", "?")
    if reason in IMAGE_PULL:
        since = scheduled_at if scheduled_at is not None else now
        if now - since < limits.image_pull_grace_seconds:
            return None
        # the kubelet's "Failed to pull image ...: <registry's answer>", not its "Error: <reason>"
        pulls = [e for e in events if (e.get("message") or "").startswith("Failed to pull image")]
        pulled = _latest_event(pulls, ("Failed",)).get("message") or waiting.get("message", "")
        waited = f"{now - since:.0f} s"
        return PodFailure(pod, reason, f"cannot pull image {image} for {waited}: "
                          f"{one_line(pulled)}".rstrip(": "))  # fmt: skip
    if reason == "CreateContainerConfigError":
        # the kubelet says which: 'secret "x" not found' / "couldn't find key K in Secret ns/x"
        return PodFailure(pod, reason, one_line(waiting.get("message", "")))
    terminated, when = _terminated(status)
    if terminated.get("reason") == "OOMKilled":
        code = terminated.get("exitCode", 137)
        return PodFailure(
            pod, "OOMKilled",
            f"container {status.get('name')} ran out of memory (exit code {code}"
            f"{', restarted' if when == 'last' else ''}): raise train_memory_per_node",
            wants_log=True,
        )  # fmt: skip
    if reason == "CrashLoopBackOff":
        why = terminated.get("reason") or "Error"
        code = terminated.get("exitCode", "?")
        restarts = status.get("restartCount", 0)
        return PodFailure(
            pod, "CrashLoopBackOff",
            f"container {status.get('name')} keeps exiting ({why}, exit code {code}, "
            f"{restarts} restarts)",
            wants_log=True,
        )  # fmt: skip
    return None


def pod_failure(
    pod: dict, events: list[dict], now: float, limits: Limits = DEFAULT_LIMITS
) -> PodFailure | None:
    """Whether ``pod`` is stuck for good, and why; ``events`` are the pod's own events."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    scheduled = _condition(pod, "PodScheduled")
    if scheduled.get("status") == "False":
        if scheduled.get("reason") in WAITING_FOR_KUEUE:
            return None
        if scheduled.get("reason") == "Unschedulable":
            created = timestamp(pod["metadata"].get("creationTimestamp")) or now
            if now - created < limits.pending_timeout_seconds:
                return None
            message = _latest_event(events, ("FailedScheduling",)).get("message")
            message = one_line(message or scheduled.get("message", ""))
            waited = f"{(now - created) / 60:.0f} min"
            return PodFailure(name, "Unschedulable", f"pending {waited}: {message}")
        return None
    scheduled_at = timestamp(scheduled.get("lastTransitionTime")) if scheduled else None
    for container in (status.get("initContainerStatuses") or []) + (
        status.get("containerStatuses") or []
    ):
        failure = container_failure(name, container, events, scheduled_at, now, limits)
        if failure is not None:
            return failure
    return None
