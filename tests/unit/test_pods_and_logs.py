"""The pod-failure classifier and the log collapsing on hand-built inputs (no server): the
boundaries the cluster tests cannot time precisely."""

from cellseg.cluster.logs import Collapser, LogFollower
from cellseg.cluster.pods import Limits, pod_failure, timestamp

NOW = timestamp("2026-12-02T12:00:00Z")
LIMITS = Limits(image_pull_grace_seconds=180, pending_timeout_seconds=1800)


def pod(conditions=(), containers=(), created="2026-12-02T11:00:00Z") -> dict:
    return {
        "metadata": {"name": "p", "creationTimestamp": created},
        "status": {"conditions": list(conditions), "containerStatuses": list(containers)},
    }


def scheduled(at: str) -> dict:
    return {"type": "PodScheduled", "status": "True", "lastTransitionTime": at}


def pulling(reason="ImagePullBackOff") -> dict:
    return {"name": "node", "image": "reg/x:typo", "state": {"waiting": {"reason": reason}}}


def test_an_image_pull_error_waits_for_the_grace_counted_from_scheduling():
    early = pod([scheduled("2026-12-02T11:58:00Z")], [pulling()])  # 2 min ago
    assert pod_failure(early, [], NOW, LIMITS) is None
    late = pod([scheduled("2026-12-02T11:56:00Z")], [pulling("ErrImagePull")])  # 4 min ago
    failure = pod_failure(late, [], NOW, LIMITS)
    assert failure.reason == "ErrImagePull" and "reg/x:typo for 240 s" in failure.detail


def test_unschedulable_counts_from_creation_and_kueues_gate_is_waiting():
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/5 nodes are available"}  # fmt: skip
    assert (
        pod_failure(pod([unschedulable], created="2026-12-02T11:40:00Z"), [], NOW, LIMITS) is None
    )
    failure = pod_failure(pod([unschedulable]), [], NOW, LIMITS)  # an hour
    assert failure.line() == "pod p: Unschedulable: pending 60 min: 0/5 nodes are available"
    gated = {**unschedulable, "reason": "SchedulingGated"}
    assert pod_failure(pod([gated]), [], NOW, LIMITS) is None


def test_the_latest_scheduler_event_wins_over_the_condition():
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    events = [
        {"reason": "FailedScheduling", "message": "old", "lastTimestamp": "2026-12-02T11:10:00Z"},
        {"reason": "FailedScheduling", "message": "new", "lastTimestamp": "2026-12-02T11:50:00Z"},
    ]
    assert pod_failure(pod([unschedulable]), events, NOW, LIMITS).detail.endswith(": new")


def test_a_running_container_is_no_failure():
    running = {"name": "node", "image": "x", "state": {"running": {}}, "restartCount": 0}
    assert pod_failure(pod([scheduled("2026-12-02T11:00:00Z")], [running]), [], NOW) is None


def test_collapser_prints_a_finished_bar_once_and_plain_lines_as_they_are():
    out: list[str] = []
    c = Collapser(out.append, every=1e9, clock=lambda: 0.0)
    c.feed("a\n\r 1%\r 2%\r100%\nb\n")
    assert out == ["a", "100%", "b"]


def test_follower_drops_lines_it_printed_before_a_reconnect_and_keeps_partial_ones():
    out: list[str] = []
    streams = iter([
        [b"2026-12-02T10:00:01.000000001Z one\n2026-12-02T10:00:02.0", b"00000001Z tw"],
        [b"2026-12-02T10:00:01.000000001Z one\n2026-12-02T10:00:02.000000001Z two\n"],
    ])  # fmt: skip
    follower = LogFollower(lambda since: next(streams), out.append, reconnect_seconds=0)
    for _ in range(2):
        for chunk in follower.open_stream(None):
            follower._feed(chunk)
        follower._reset()
    assert out == ["one", "two"]  # the cut "tw" comes again whole, "one" only once


def test_an_image_pull_names_the_registrys_answer_not_the_kubelets_echo():
    events = [
        {"reason": "Failed", "message": 'Failed to pull image "reg/x:typo": manifest unknown',
         "lastTimestamp": "2026-12-02T11:50:00Z"},
        {"reason": "Failed", "message": "Error: ImagePullBackOff",
         "lastTimestamp": "2026-12-02T11:55:00Z"},
    ]  # fmt: skip
    stuck = pod([scheduled("2026-12-02T11:00:00Z")], [pulling()])
    assert pod_failure(stuck, events, NOW, LIMITS).detail.endswith("manifest unknown")
