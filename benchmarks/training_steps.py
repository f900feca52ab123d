"""What ``make bench`` and ``make bench-gpu`` both measure: whole training steps of the loop's
own model, optimizer and loader, and their model-FLOPs utilisation on a GPU."""

from __future__ import annotations

import time
from pathlib import Path

from cellseg.settings import CLUSTER_PROFILE

Row = tuple[str, str]

# Dense bf16 peak per chip (tensor cores, no sparsity); the H200 is an H100 with more memory.
BF16_DENSE_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_DENSE_PEAK.items() if k in name), None)


def train_step_throughput(model, optimizer, batches, config, device, steps: int) -> float:
    """Images/s of the training step (the loop's ``forward_loss``, backward, optimizer step)
    over ``batches`` (an iterator)."""
    import torch

    from cellseg.training.loop import forward_loss

    def step(batch):
        forward_loss(model, batch, config, device)["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(next(batches))  # warm-up
    images, start = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        step(batch)
        images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


def bench_setup(
    profile: str, phase: int, data: Path, overrides: list[str] = (), freeze_backbone=False
):
    """The loop's own model, optimizer and loader for ``profile`` on one process."""
    import torch

    from cellseg.runtime import configure_backends, place_model, resolve_device
    from cellseg.training.config import load_config
    from cellseg.training.distributed import World
    from cellseg.training.loop import build_data, build_optimization, model_for_phase

    config = load_config(profile, phase, overrides)
    torch.manual_seed(0)
    model, _ = model_for_phase(config, phase)
    if freeze_backbone:
        model.backbone.requires_grad_(False)
    world = World(0, 1, 0, resolve_device(config.device))
    place_model(model, world.device)
    configure_backends(world.device)
    loader, _, _ = build_data(data, config, world)  # the profile's samples (crops, focus)
    optimizer, _ = build_optimization(model, phase, config, len(loader), world.device)
    return config, model, optimizer, loader, world.device


def checkpoint_figures(model, optimizer, config, phase: int, data: Path, out: Path, epoch_s: float):
    """What the loop's checkpoints cost per epoch (each epoch here writes ``best`` and
    ``latest``, the worst case): seconds training is held (the copy to the CPU, plus any
    write still running when the next epoch ends) and seconds of writing in the background,
    the first epoch's frozen weights included."""
    from cellseg.training.loop import checkpoint_meta
    from cellseg.training.saver import CheckpointSaver

    epochs, held = 3, 0.0
    saver = CheckpointSaver(out, phase)
    meta = checkpoint_meta(model, phase, config, data)
    for epoch in range(1, epochs + 1):
        resume = {"optimizer": optimizer.state_dict(), "bad_epochs": 0}
        held += saver.save(model, meta, epoch, 1.0, improved=True, resume=resume)
        saver.wait()  # an epoch passes between two saves
    saver.close()
    write_s = saver.write_seconds / epochs
    held_s = held / epochs + max(0.0, write_s - epoch_s)
    size = {k: (out / f"{k}_phase{phase}.pt") for k in ("best", "latest", "frozen")}
    return {
        "checkpoint_held_s": held_s,
        "checkpoint_write_s": write_s,
        "checkpoint_share": held_s / (epoch_s + held_s),
        "checkpoint_mb": {k: p.stat().st_size / 1e6 if p.is_file() else 0 for k, p in size.items()},
    }


def step_figures(
    data: Path,
    phase: int,
    compiled: bool,
    overrides: list[str],
    steps: int,
    checkpoints: Path | None = None,
) -> dict:
    """One phase's whole training step: img/s, FLOPs per image, MFU, peak memory; with
    ``checkpoints`` (a scratch folder), also what checkpointing costs an epoch."""
    import itertools

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cellseg.training.loop import forward_loss

    config, model, optimizer, loader, device = bench_setup(
        CLUSTER_PROFILE, phase, data, ["weights=null", *overrides], freeze_backbone=phase == 1
    )
    batches = itertools.cycle(loader)
    with FlopCounterMode(display=False) as counter:  # counted eagerly: the same math
        forward_loss(model, next(batches), config, device)["total"].backward()
    optimizer.zero_grad(set_to_none=True)
    flops_per_image = counter.get_total_flops() / config.batch_size
    step_model = torch.compile(model) if compiled else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ips = train_step_throughput(step_model, optimizer, batches, config, device, steps)
    cached = [next(batches) for _ in range(2)]
    preloaded = train_step_throughput(
        step_model, optimizer, itertools.cycle(cached), config, device, steps
    )
    peak = peak_flops()
    epoch_s = len(loader.dataset) / ips
    costs = {}
    if checkpoints is not None:
        costs = checkpoint_figures(model, optimizer, config, phase, data, checkpoints, epoch_s)
    return {
        "phase": phase,
        "compiled": compiled,
        "image_size": list(config.image_size),
        "train_crop": config.train_crop,  # the samples' side (0: whole frames)
        "batch_size": config.batch_size,
        "img_per_s": ips,
        "preloaded_img_per_s": preloaded,
        "loader_ratio": ips / preloaded,
        "gflops_per_image": flops_per_image / 1e9,
        "mfu": flops_per_image * ips / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9
        if device.type == "cuda"
        else None,
        "epoch_s": epoch_s,
        **costs,
    }
