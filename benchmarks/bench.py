"""``make bench``: figures and ratios for the hot paths, printed as a table.

Speed is measured here, never asserted in tests. Sections: conversion rate; input pipeline vs
model (train-step throughput with the real loader / with pre-loaded tensors); post-processing
rate on one core beside a per-instance reference; evaluation time of the test split; serving
(the KServe model server over HTTP beside `cellseg predict`, p50/p95 at concurrency 1 and 4, a
bounded load test with the server's memory); and, on a GPU, images/s and model-FLOPs
utilisation of whole Phase 1 / Phase 2 training steps.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.training_steps import Row, bench_setup, train_step_throughput
from cellseg.settings import LOCAL_PROFILE


def bench_conversion(source: Path, out: Path) -> list[Row]:
    from cellseg.data.convert import convert_dataset

    rows, timings = [], {}
    for workers in sorted({1, os.cpu_count() or 1}):
        target = out if workers == max(1, os.cpu_count() or 1) else out.with_name("convert-1")
        start = time.perf_counter()
        manifest = convert_dataset(source, target, workers=workers)
        timings[workers] = time.perf_counter() - start
        n = sum(s["images"] for s in manifest["splits"].values())
        rate = n / timings[workers]
        rows.append(
            (
                f"convert, {workers} worker(s)",
                f"{n} images in {timings[workers]:.1f} s = {rate:.1f} img/s",
            )
        )
    if len(timings) > 1:
        speedup = timings[1] / timings[max(timings)]
        rows.append(("convert speed-up, all cores vs 1", f"{speedup:.2f}x (goal: all in < 60 s)"))
    return rows


def bench_input_pipeline(data: Path, steps: int = 12) -> list[Row]:
    """The `local` profile's train step fed by the real DataLoader vs by tensors in memory."""
    import itertools

    config, model, optimizer, loader, device = bench_setup(LOCAL_PROFILE, 1, data)
    real = train_step_throughput(model, optimizer, itertools.cycle(loader), config, device, steps)
    cached = [b for b, _ in zip(loader, range(4), strict=False)]
    preloaded = train_step_throughput(
        model, optimizer, itertools.cycle(cached), config, device, steps
    )
    return [
        ("train step, real loader (local profile)", f"{real:.2f} img/s"),
        ("train step, pre-loaded tensors", f"{preloaded:.2f} img/s"),
        ("loader / pre-loaded ratio", f"{real / preloaded:.2f} (goal >= 0.9)"),
    ]


def bench_postprocess(data: Path, n: int = 20) -> list[Row]:
    """Post-processing at 480x640 on one core, from exact maps of real test images."""
    import numpy as np

    from benchmarks.reference import classify_instances_reference, plain_watershed
    from cellseg.data.arrays import load_sample
    from cellseg.data.manifest import split_files
    from cellseg.evaluation.postprocess import (
        classify_instances,
        grow_markers,
        watershed_instances,
    )
    from cellseg.model.postprocess_params import PostprocessParams
    from cellseg.runtime import set_inference_threads
    from cellseg.training.targets import hv_maps

    set_inference_threads(1)  # one core, as the goal says
    cases = []
    for stem in split_files(data, "test", n):
        s = load_sample(data, stem)
        np_prob = (s["instance"] > 0).astype(np.float32)
        # (4, H, W) contiguous, as the network's softmax arrives
        nc = np.ascontiguousarray(np.eye(4, dtype=np.float32)[s["classes"]].transpose(2, 0, 1))
        cases.append((np_prob, hv_maps(s["instance"]), nc))

    def run(grow, classify, markers: str = "sobel") -> float:
        params = PostprocessParams(markers=markers)
        start = time.perf_counter()
        for np_prob, hv, nc in cases:
            classify(watershed_instances(np_prob, hv, params, grow=grow), np_prob, nc)
        return len(cases) / (time.perf_counter() - start)

    fast = run(grow_markers, classify_instances)
    ref = run(plain_watershed, classify_instances_reference)
    slope = run(grow_markers, classify_instances, "slope")
    return [
        ("post-process 480x640, 1 core", f"{fast:.1f} img/s (goal >= 20)"),
        (
            "  plain reference (full watershed, per-instance classes)",
            f"{ref:.1f} img/s ({fast / ref:.2f}x)",
        ),
        ("  slope markers (the local profile's)", f"{slope:.1f} img/s ({slope / fast:.2f}x)"),
    ]


def random_checkpoint(data: Path, work: Path) -> Path:
    """A local-profile model with a random-init decoder: the real architecture and input size."""
    from cellseg.model.checkpoint import save_checkpoint
    from cellseg.training.config import load_config
    from cellseg.training.loop import checkpoint_meta, model_for_phase

    config = load_config(LOCAL_PROFILE, 1)
    model, _ = model_for_phase(config, 1)
    ckpt = work / "random.pt"
    if not ckpt.is_file():
        save_checkpoint(ckpt, model, checkpoint_meta(model, 1, config, data), 0, float("inf"))
    return ckpt


def bench_evaluation(data: Path, work: Path) -> list[Row]:
    """Evaluating the 72 test images with an untrained local-profile model."""
    from cellseg.evaluation.evaluate import evaluate
    from cellseg.evaluation.inference import Predictor
    from cellseg.runtime import set_inference_threads

    ckpt = random_checkpoint(data, work)
    set_inference_threads()
    start = time.perf_counter()
    metrics = evaluate(data, Predictor.from_checkpoint(ckpt), work / "eval", overlays=1)
    seconds = time.perf_counter() - start
    return [("evaluate test split", f"{metrics['images']} images in {seconds:.1f} s")]


def _v2_body(jpeg: bytes) -> bytes:
    import base64
    import json

    b64 = base64.b64encode(jpeg).decode()
    return json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}
    ).encode()


def _infer(url: str, body: bytes) -> float:
    """Seconds for one V2 request; raises unless it is answered 200."""
    import urllib.request

    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as answer:
        answer.read()
        if answer.status != 200:
            raise RuntimeError(f"HTTP {answer.status}")
    return time.perf_counter() - start


def _drive(url: str, bodies: list[bytes], clients: int, seconds: float = 0.0):
    """``clients`` threads sending ``bodies`` (each once, or round and round for ``seconds``);
    returns (latencies, failures, wall seconds)."""
    import itertools
    import threading
    from concurrent.futures import ThreadPoolExecutor

    latencies, failures, lock = [], [], threading.Lock()
    feed = itertools.cycle(bodies) if seconds else iter(bodies)
    end = time.perf_counter() + seconds

    def client():
        while not seconds or time.perf_counter() < end:
            with lock:
                body = next(feed, None)
            if body is None:
                return
            try:
                took = _infer(url, body)
            except Exception as err:  # a failed request is counted, never hidden
                with lock:
                    failures.append(f"{type(err).__name__}: {err}")
                continue
            with lock:
                latencies.append(took)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)
    return latencies, failures, time.perf_counter() - start


def _latency(seconds: list[float]) -> str:
    import numpy as np

    if not seconds:
        return "no answer"
    p50, p95 = np.percentile(seconds, [50, 95]) * 1e3
    return f"p50 {p50:.0f} ms, p95 {p95:.0f} ms"


def _start_server(ckpt: Path, work: Path):
    """`python -m cellseg.serving` on a free port of 127.0.0.1; returns (process, V2 base URL)."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = work / "kserve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "cellseg.serving", "--model_dir", str(ckpt), "--model_name",
             "cellseg", "--http_port", str(port), "--enable_grpc", "false",
             "--enable_latency_logging", "false"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v2/models/cellseg"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=2):
                return server, base
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the model server did not start:\n{log.read_text()}") from None
            time.sleep(0.5)


def bench_serving(
    source: Path,
    data: Path,
    work: Path,
    n: int = 8,
    rounds: int = 3,
    clients: int = 4,
    seconds: float = 30,
) -> list[Row]:
    """The KServe model server (`python -m cellseg.serving`) on 127.0.0.1, base64 JPEGs over
    V2 HTTP, beside `cellseg predict` on the same ``n`` BCCD images in this run; then a bounded
    load test (``clients`` clients for ``seconds``) with the server's memory before and after.

    Both run on the same cores: ``rounds`` alternating rounds (predict, served at concurrency
    1, then at ``clients``), medians reported, so a neighbour's load hits both alike."""
    import statistics

    import psutil

    from cellseg.evaluation.inference import Predictor
    from cellseg.evaluation.predict import predict
    from cellseg.runtime import set_inference_threads

    ckpt = random_checkpoint(data, work)
    paths = sorted((source / "JPEGImages").glob("*.jpg"))[:n]
    bodies = [_v2_body(p.read_bytes()) for p in paths]
    set_inference_threads()  # as `cellseg predict` and the server set them
    predictor = Predictor.from_checkpoint(ckpt)
    predict(paths[:1], predictor, work / "predict-warmup")
    server, base = _start_server(ckpt, work)
    url = f"{base}/infer"
    try:
        _drive(url, bodies[:2], 1)  # warm-up
        rates: dict[str, list[float]] = {"predict": [], 1: [], clients: []}
        latencies: dict[int, list[float]] = {1: [], clients: []}
        failures: list[str] = []
        for _ in range(rounds):
            start = time.perf_counter()
            predict(paths, predictor, work / "predict")
            rates["predict"].append(len(paths) / (time.perf_counter() - start))
            for c in (1, clients):
                lat, failed, wall = _drive(url, bodies, c)
                rates[c].append(len(lat) / wall)
                latencies[c] += lat
                failures += failed
        median = {k: statistics.median(v) for k, v in rates.items()}
        rows: list[Row] = [
            (f"cellseg predict, {n} 640x480 JPEGs (median of {rounds})",
             f"{median['predict']:.2f} img/s"),
        ]  # fmt: skip
        for c in (1, clients):
            rows.append((f"served over V2 HTTP, base64 JPEG, concurrency {c}",
                         f"{median[c]:.2f} img/s, {_latency(latencies[c])}"))  # fmt: skip
        ratio = median[clients] / median["predict"]
        rows.append((f"served (concurrency {clients}) / cellseg predict",
                     f"{ratio:.2f} (goal >= 0.8); {len(failures)} failed"))  # fmt: skip
        del predictor
        proc = psutil.Process(server.pid)
        rss_before = proc.memory_info().rss
        lat, failed, wall = _drive(url, bodies, clients, seconds)
        rss_after = proc.memory_info().rss
        figure = f"{len(lat)} requests, {len(failed)} failed, {len(lat) / wall:.2f} req/s, "
        rows.append((f"load test, {clients} clients x {seconds:.0f} s", figure + _latency(lat)))
        rss = f"{rss_before / 2**20:.0f} / {rss_after / 2**20:.0f} MiB"
        rows.append(("  server RSS before / after", rss))
        if failures or failed:
            rows.append(("  first failure", (failures + failed)[0][:200]))
        return rows
    finally:
        server.terminate()
        server.wait(timeout=30)


def bench_gpu(data: Path) -> list[Row]:
    """Whole Phase 1 / Phase 2 steps of the `uni-gpu` profile (eager); `make bench-gpu` does
    more (compiled steps, a training run, JSON)."""
    from benchmarks.training_steps import step_figures

    rows = []
    for phase in (1, 2):
        s = step_figures(data, phase, False, [], steps=10)
        mfu = f"MFU {s['mfu']:.2f}" if s["mfu"] is not None else "MFU n/a (unknown chip)"
        goal = 0.43 if phase == 1 else 0.35
        rows.append((f"GPU phase {phase} step, ViT-L 480x640 bf16",
                     f"{s['img_per_s']:.1f} img/s, {mfu} (goal >= {goal})"))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("data/BCCD"))
    parser.add_argument(
        "--only", choices=("serving",), help="one section (it converts what it needs)"
    )
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "dataset"
        if args.only == "serving":
            from cellseg.data.convert import convert_dataset

            convert_dataset(args.source, data)
            rows += bench_serving(args.source, data, Path(tmp))
            args.only = "done"
        if args.only:
            _print(rows)
            return
        rows += bench_conversion(args.source, data)
        rows += bench_input_pipeline(data)
        rows += bench_postprocess(data)
        rows += bench_evaluation(data, Path(tmp))
        rows += bench_serving(args.source, data, Path(tmp))
        import torch

        if torch.cuda.is_available():
            rows += bench_gpu(data)
        else:
            rows.append(("GPU training step (MFU)", "skipped: no CUDA device"))
    _print(rows)


def _print(rows: list[Row]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, figure in rows:
        print(f"{name:<{width}}  {figure}")


if __name__ == "__main__":
    main()
