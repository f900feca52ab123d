"""``make bench``: figures and ratios for the hot paths, printed as a table.

Speed is measured here, never asserted in tests. Sections: conversion rate; input pipeline vs
model (train-step throughput with the real loader / with pre-loaded tensors); post-processing
rate on one core beside a per-instance reference; evaluation time of the test split; and, on a
GPU, images/s and model-FLOPs utilisation of whole Phase 1 / Phase 2 training steps.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

Row = tuple[str, str]
H100_BF16_DENSE_FLOPS = 989e12


def bench_conversion(source: Path, out: Path) -> list[Row]:
    from cellseg.convert import convert_dataset

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


def _train_step_throughput(model, optimizer, batches, steps: int) -> float:
    """Images/s of forward + loss + backward + step over ``batches`` (an iterator)."""
    import torch

    from cellseg.losses import hovernet_loss

    def step(batch):
        out = model(batch["image"])
        loss = hovernet_loss(out, batch["np"], batch["hv"], batch["nc"], batch["ignore"])["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    step(next(batches))  # warm-up
    images, start = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        step(batch)
        images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


def bench_input_pipeline(data: Path, steps: int = 12) -> list[Row]:
    """The `local` profile's train step fed by the real DataLoader vs by tensors in memory."""
    import itertools

    import torch
    from torch.utils.data import DataLoader

    from cellseg.config import load_config
    from cellseg.dataset import CellDataset, worker_init
    from cellseg.train import build_model

    config = load_config("local", 1)
    torch.manual_seed(0)
    model, _ = build_model(config, 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dataset = CellDataset(data, "train", config.image_size, True, seed=0)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        worker_init_fn=worker_init,
    )
    real = _train_step_throughput(model, optimizer, itertools.cycle(loader), steps)
    cached = [b for b, _ in zip(loader, range(4), strict=False)]
    preloaded = _train_step_throughput(model, optimizer, itertools.cycle(cached), steps)
    return [
        ("train step, real loader (local profile)", f"{real:.2f} img/s"),
        ("train step, pre-loaded tensors", f"{preloaded:.2f} img/s"),
        ("loader / pre-loaded ratio", f"{real / preloaded:.2f} (goal >= 0.9)"),
    ]


def bench_postprocess(data: Path, n: int = 20) -> list[Row]:
    """Post-processing at 480x640 on one core, from exact maps of real test images."""
    import cv2
    import numpy as np
    import torch

    from cellseg.arrays import load_sample
    from cellseg.dataset import split_files
    from cellseg.postprocess import (
        classify_instances,
        classify_instances_reference,
        grow_markers,
        plain_watershed,
        watershed_instances,
    )
    from cellseg.targets import hv_maps

    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one core, as the goal says
    cases = []
    for stem in split_files(data, "test", n):
        s = load_sample(data, stem)
        np_prob = (s["instance"] > 0).astype(np.float32)
        # (4, H, W) contiguous, as the network's softmax arrives
        nc = np.ascontiguousarray(np.eye(4, dtype=np.float32)[s["classes"]].transpose(2, 0, 1))
        cases.append((np_prob, hv_maps(s["instance"]), nc))

    def run(grow, classify) -> float:
        start = time.perf_counter()
        for np_prob, hv, nc in cases:
            classify(watershed_instances(np_prob, hv, grow=grow), np_prob, nc)
        return len(cases) / (time.perf_counter() - start)

    fast = run(grow_markers, classify_instances)
    ref = run(plain_watershed, classify_instances_reference)
    return [
        ("post-process 480x640, 1 core", f"{fast:.1f} img/s (goal >= 20)"),
        (
            "  plain reference (full watershed, per-instance classes)",
            f"{ref:.1f} img/s ({fast / ref:.2f}x)",
        ),
    ]


def bench_evaluation(data: Path, work: Path) -> list[Row]:
    """Evaluating the 72 test images with a (random-init) local-profile model."""
    import torch

    from cellseg.checkpoint import atomic_save
    from cellseg.config import config_to_dict, load_config
    from cellseg.evaluate import evaluate
    from cellseg.train import build_model, native_size

    config = load_config("local", 1)
    model, _ = build_model(config, 1)
    ckpt = work / "random.pt"
    atomic_save(
        {
            "model": model.state_dict(),
            "model_name": config.backbone,
            "epoch": 0,
            "decoder_width": config.decoder_width,
            "image_size": list(config.image_size),
            "native_size": native_size(data),
            "lora": None,
            "config": config_to_dict(config),
        },
        ckpt,
    )
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    metrics = evaluate(data, str(ckpt), work / "eval", overlays=1)
    seconds = time.perf_counter() - start
    return [("evaluate test split", f"{metrics['images']} images in {seconds:.1f} s")]


def bench_gpu(data: Path, steps: int = 10) -> list[Row]:
    """Whole training steps of UNI-sized ViT-L/16 at 480x640, bf16, real loader; MFU on H100."""
    import itertools

    import torch
    from torch.utils.data import DataLoader
    from torch.utils.flop_counter import FlopCounterMode

    from cellseg.config import load_config
    from cellseg.dataset import CellDataset
    from cellseg.losses import hovernet_loss
    from cellseg.train import build_model

    rows = []
    for phase in (1, 2):
        config = load_config("uni-gpu", phase, ["weights=null"])  # random init: same FLOPs
        model, _ = build_model(config, phase)
        if phase == 1:
            model.backbone.requires_grad_(False)  # as with pretrained UNI
        model.cuda()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        dataset = CellDataset(data, "train", config.image_size, True, seed=0)
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=True,
            num_workers=8,
            pin_memory=True,
            persistent_workers=True,
        )
        batches = (
            {k: v.cuda(non_blocking=True) for k, v in b.items()} for b in itertools.cycle(loader)
        )

        def step(batch, model=model, optimizer=optimizer):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(batch["image"])
                loss = hovernet_loss(out, batch["np"], batch["hv"], batch["nc"], batch["ignore"])
            loss["total"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        first = next(batches)
        with FlopCounterMode(display=False) as counter:
            step(first)
        flops = counter.get_total_flops()
        for _ in range(3):
            step(next(batches))
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step(next(batches))
        torch.cuda.synchronize()
        per_step = (time.perf_counter() - start) / steps
        ips = config.batch_size / per_step
        mfu = flops / per_step / H100_BF16_DENSE_FLOPS
        goal = 0.43 if phase == 1 else 0.35
        rows.append(
            (
                f"GPU phase {phase} step, ViT-L 480x640 bf16",
                f"{ips:.1f} img/s, MFU {mfu:.2f} (goal >= {goal})",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("data/BCCD"))
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "dataset"
        rows += bench_conversion(args.source, data)
        rows += bench_input_pipeline(data)
        rows += bench_postprocess(data)
        rows += bench_evaluation(data, Path(tmp))
        import torch

        if torch.cuda.is_available():
            rows += bench_gpu(data)
        else:
            rows.append(("GPU training step (MFU)", "skipped: no CUDA device"))
    width = max(len(name) for name, _ in rows)
    for name, figure in rows:
        print(f"{name:<{width}}  {figure}")


if __name__ == "__main__":
    main()
