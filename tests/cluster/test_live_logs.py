"""Rank 0's log as a stream, through the real API server's ``pods/log`` proxy to a node's kubelet
endpoint (a fake one: :class:`tests.cluster.kubelet.FakeKubelet`). Each stream the kubelet ends
stands for a log rotation or a container restart; the follower must reconnect with
``sinceSeconds``, print nothing twice, and collapse tqdm's ``\\r`` updates."""

from __future__ import annotations

import io
import time

import pytest
from kubernetes import client

from cellseg.cluster.jobs import ENGINES, build_job
from cellseg.cluster.launch import JobRunner
from cellseg.cluster.logs import Collapser, LogFollower, pod_log_stream
from tests.cluster.conftest import NAMESPACE, PIPELINE_SA
from tests.cluster.kubelet import Kubelet, kubelet_on_node, log_stamp
from tests.cluster.test_launcher import Operator, finish, launch_in_thread, spec

pytestmark = pytest.mark.cluster
NODE = "gpu-node-logs"


@pytest.fixture(scope="module")
def kubelet(installed, tmp_path_factory):
    with kubelet_on_node(installed, tmp_path_factory.mktemp("kubelet"), NODE) as fake:
        yield fake


def lines(stamp_ago: float, *texts: str) -> bytes:
    return b"".join(f"{log_stamp(stamp_ago)} {t}\n".encode() for t in texts)


def wait_until(predicate, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.2)


def test_the_stream_survives_rotation_and_a_restart_and_prints_nothing_twice(installed, kubelet):
    pod, container = "logs-rotated", "node"
    Kubelet(installed).pod(pod, {}, container, node=NODE)
    before_rotation = lines(3, "epoch 1 loss 0.9", "epoch 2 loss 0.7")
    kubelet.scripts[(pod, container)] = [
        [(before_rotation, 0.5)],  # the stream ends: the kubelet rotated the file
        # the reconnect's `sinceSeconds` overlaps what was printed; then new lines
        [(before_rotation + lines(1, "epoch 3 loss 0.5"), 0.5)],
        # the container restarted: a new container's log
        [(lines(0, "resumed from latest_phase1.pt", "epoch 4 loss 0.4"), 30)],
    ]
    out: list[str] = []
    core = client.CoreV1Api(installed.client(PIPELINE_SA))  # RBAC: pods/log get
    follower = LogFollower(pod_log_stream(core, NAMESPACE, pod, container), out.append,
                           reconnect_seconds=0.3).start()  # fmt: skip
    try:
        wait_until(lambda: "epoch 4 loss 0.4" in out)
    finally:
        follower.stop()
    assert out == [
        "epoch 1 loss 0.9", "epoch 2 loss 0.7", "epoch 3 loss 0.5",
        "resumed from latest_phase1.pt", "epoch 4 loss 0.4",
    ]  # fmt: skip
    requests = [q for path, q in kubelet.requests if path.endswith(f"/{pod}/{container}")]
    assert requests[0]["follow"] == ["true"] and requests[0]["timestamps"] == ["true"]
    assert "sinceSeconds" not in requests[0]
    assert all("sinceSeconds" in q for q in requests[1:3])  # reconnects start where it was


def test_carriage_return_progress_is_one_line_every_n_seconds(installed, kubelet):
    pod, container = "logs-progress", "node"
    Kubelet(installed).pod(pod, {}, container, node=NODE)
    stamp = log_stamp()
    updates = [(f"\r{i:3d}%|{'#' * (i // 10):10s}| {i}/100".encode(), 0.05) for i in range(101)]
    kubelet.scripts[(pod, container)] = [
        [(f"{stamp} training".encode(), 0), *updates, (b"\n", 0), (lines(0, "epoch done"), 30)]
    ]
    out: list[str] = []
    core = client.CoreV1Api(installed.client(PIPELINE_SA))
    stream = pod_log_stream(core, NAMESPACE, pod, container)
    follower = LogFollower(stream, out.append, progress_every=1.0).start()
    try:
        wait_until(lambda: "epoch done" in out)
    finally:
        follower.stop()
    progress = [line for line in out if "%|" in line]
    assert 3 <= len(progress) <= 9, out  # ~5 s of updates at one per second, not 101 lines
    assert progress[-1].strip().startswith("100%")  # the bar's final state, once
    assert out[-1] == "epoch done"


def test_collapser_keeps_plain_lines_and_the_latest_update_per_interval():
    clock = iter([0.0, 0.5, 1.2, 1.3]).__next__
    out: list[str] = []
    c = Collapser(out.append, every=1.0, clock=clock)
    c.feed("start\n\r 10%")
    c.feed("\r 20%\r 30%")  # t=0: prints 20% (30% may still be incomplete)
    c.feed("\r 40%")  # t=0.5: too soon
    c.feed("\r 50%")  # t=1.2: prints the latest complete one, 40%
    c.feed("\r 60%\n")  # the line ends: its final state
    assert out == ["start", " 20%", " 40%", " 60%"]


def test_the_launcher_streams_rank_0s_log_while_the_job_runs(installed, kubelet):
    engine, name = "pytorchjob", "live-logs"
    e = ENGINES[engine]
    pod = f"{name}-master-0"
    kubelet.scripts[(pod, e.container)] = [[(lines(0, "rank 0: step 1", "rank 0: step 2"), 30)]]
    out = io.StringIO()
    runner = JobRunner(e, installed.client(PIPELINE_SA), poll_seconds=1, out=out)
    thread, outcome = launch_in_thread(runner, build_job(spec(name, engine=engine)), timeout=60)
    operator = Operator(installed, engine)
    operator.wait_for(name)
    Kubelet(installed).pod(pod, {e.pod_label: name}, e.container, node=NODE)
    operator.condition(name, "Running")
    wait_until(lambda: "rank 0: step 2" in out.getvalue())
    assert thread.is_alive()  # streamed while running, not read after the end
    operator.condition(name, "Succeeded")
    assert finish(thread, outcome).get("result") == "succeeded", outcome
    assert out.getvalue().count("rank 0: step 1") == 1
