"""Two-phase training: Phase 1 trains the decoder (backbone frozen when pretrained), Phase 2 adds
LoRA to the backbone's ``qkv`` and fine-tunes adapters and decoder.

Runs the same under plain ``python``, ``torchrun`` and a PyTorchJob. Rank 0 alone writes
checkpoints and logs. ``latest_phase{N}.pt`` is written every epoch with everything needed to
resume; ``best_phase{N}.pt`` only when the validation loss improves. Starting again with the same
arguments resumes from ``latest``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from cellseg.checkpoint import atomic_save, load_checkpoint, load_model_state
from cellseg.config import TrainConfig, config_to_dict
from cellseg.dataset import CellDataset, worker_init
from cellseg.distributed import World, all_reduce_sum, broadcast_flag, init_world, shutdown
from cellseg.lora import add_lora, lora_scaling
from cellseg.losses import hovernet_loss
from cellseg.model import CellSegModel, create_model

PHASE2_DECODER_LR = 1e-4  # the notebook's fix: whatever the global LR, the decoder moves slowly
LOSS_TERMS = ("total", "np", "hv", "nc")


class TrainingError(RuntimeError):
    """Training cannot start as asked; the message says why and what to do."""


@dataclass
class EarlyStopping:
    """Best validation loss so far and epochs since it improved (lower is better)."""

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    bad_epochs: int = 0

    def update(self, value: float) -> bool:
        """Record one epoch's metric; True when it improved on the best."""
        if value < self.best - self.min_delta:
            self.best, self.bad_epochs = value, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


def checkpoint_paths(out: Path, phase: int) -> tuple[Path, Path]:
    return out / f"best_phase{phase}.pt", out / f"latest_phase{phase}.pt"


def find_phase1_checkpoint(init: Path | None, out: Path) -> Path:
    """Phase 1's best checkpoint, else its latest: ``init`` (file or folder), else ``out``."""
    if init is not None and init.is_file():
        return init
    folder = init if init is not None else out
    for candidate in checkpoint_paths(folder, 1):
        if candidate.is_file():
            return candidate
    raise TrainingError(
        f"Phase 2 starts from Phase 1: no best_phase1.pt or latest_phase1.pt in {folder} "
        "(run `cellseg train --phase 1` first, or pass --init CHECKPOINT)"
    )


def build_model(config: TrainConfig, phase: int) -> tuple[CellSegModel, bool]:
    """The model for ``phase`` and whether its backbone came pretrained."""
    pretrained = phase == 1 and config.weights is not None
    # Phase 2's backbone weights come from the Phase 1 checkpoint, so no download here.
    model = create_model(
        config.backbone,
        weights=config.weights if phase == 1 else None,
        decoder_width=config.decoder_width or None,
    )
    if phase == 2:
        add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout)
    elif pretrained:
        model.backbone.requires_grad_(False)
    return model, pretrained


def param_groups(model: CellSegModel, phase: int, config: TrainConfig) -> list[dict]:
    decoder = [p for p in model.decoder.parameters() if p.requires_grad]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": decoder, "lr": PHASE2_DECODER_LR if phase == 2 else config.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr})
    return groups


def lr_lambdas(phase: int, n_groups: int, total_steps: int, warmup_steps: int) -> list:
    def warmup_cosine(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    # Phase 2's decoder group (index 0) keeps its fixed LR.
    return [(lambda _: 1.0) if (phase == 2 and i == 0) else warmup_cosine for i in range(n_groups)]


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def autocast(config: TrainConfig, device: torch.device):
    use_bf16 = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_loader(dataset, world: World, config: TrainConfig, shuffle: bool, seed: int):
    sampler = DistributedSampler(
        dataset, num_replicas=world.world_size, rank=world.rank, shuffle=shuffle, seed=seed
    )
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=world.device.type == "cuda",
        persistent_workers=False,  # workers re-read the dataset's epoch each epoch
        worker_init_fn=worker_init,
    )
    return loader, sampler


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def run_epoch(
    model, loader, world: World, config: TrainConfig, optimizer=None, scheduler=None, desc=""
) -> dict[str, float]:
    """One pass; trains when ``optimizer`` is given. Returns sample-weighted mean losses."""
    training = optimizer is not None
    model.train(training)
    sums = torch.zeros(len(LOSS_TERMS) + 1, dtype=torch.float64, device=world.device)
    n_batches = len(loader)
    bar = tqdm(loader, desc=desc, disable=not world.is_main, leave=False, file=sys.stderr)
    for i, batch in enumerate(bar):
        batch = to_device(batch, world.device)
        group_start = i - i % config.grad_accum
        group_size = min(config.grad_accum, n_batches - group_start)
        last_in_group = i == group_start + group_size - 1
        sync = contextlib.nullcontext()
        if training and world.distributed and not last_in_group:
            sync = model.no_sync()  # gradients are all-reduced once per optimizer step
        with sync, torch.set_grad_enabled(training), autocast(config, world.device):
            terms = hovernet_loss(
                model(batch["image"]), batch["np"], batch["hv"], batch["nc"], batch["ignore"]
            )
            if training:
                (terms["total"] / group_size).backward()
        if training and last_in_group:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        n = batch["image"].shape[0]
        sums += torch.tensor(
            [terms[t].item() * n for t in LOSS_TERMS] + [n],
            dtype=torch.float64,
            device=world.device,
        )
        bar.set_postfix(loss=f"{terms['total'].item():.3f}")
    sums = all_reduce_sum(sums, world)
    return {t: (sums[j] / sums[-1]).item() for j, t in enumerate(LOSS_TERMS)}


def train(
    phase: int,
    data: Path,
    out: Path,
    config: TrainConfig,
    init: Path | None = None,
    tracker=None,
) -> TrainState:
    """Train one phase into ``out``; resumes from ``out/latest_phase{phase}.pt`` if present.

    Args:
        init: Phase 2 only: Phase 1's checkpoint file or folder (default: ``out``).
        tracker: optional experiment logger (``cellseg.tracking``); rank 0 only.
    """
    if phase not in (1, 2):
        raise TrainingError(f"phase must be 1 or 2, got {phase}")
    data, out = Path(data), Path(out)
    if not (data / "manifest.json").is_file():
        raise TrainingError(
            f"{data}: not a converted dataset (no manifest.json); run cellseg convert"
        )
    world = init_world(config.device)
    monitor = None
    if tracker is not None and world.is_main:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=5)
        monitor.start()
    try:
        return _train(phase, data, out, config, init, tracker, world)
    finally:
        if monitor is not None:
            monitor.finish()
        shutdown(world)


def _train(phase, data, out, config, init, tracker, world: World) -> TrainState:
    seed_everything(config.seed, config.deterministic)
    best_path, latest_path = checkpoint_paths(out, phase)
    resume = load_checkpoint(latest_path) if latest_path.is_file() else None
    model, pretrained = build_model(config, phase)
    lora = {"rank": config.lora_rank, "alpha": config.lora_alpha} if phase == 2 else None
    if resume is not None:
        load_model_state(model, resume["model"], _scaling(resume), str(latest_path))
    elif phase == 2:
        source = find_phase1_checkpoint(init, out)
        ckpt = load_checkpoint(source)
        load_model_state(model, ckpt["model"], _scaling(ckpt), str(source))
        if world.is_main:
            print(f"phase 2: starting from {source} (epoch {ckpt['epoch']})", file=sys.stderr)
    model.to(world.device)

    train_set = CellDataset(
        data, "train", config.image_size, True, config.limit_train_images, config.seed
    )
    val_set = CellDataset(
        data, "val", config.image_size, False, config.limit_val_images, config.seed
    )
    train_loader, train_sampler = make_loader(train_set, world, config, True, config.seed)
    val_loader, _ = make_loader(val_set, world, config, False, config.seed)

    groups = param_groups(model, phase, config)
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambdas(
            phase,
            len(groups),
            steps_per_epoch * config.epochs,
            steps_per_epoch * config.warmup_epochs,
        ),
    )
    patience = config.patience
    stopper = EarlyStopping(patience, config.min_delta)
    state = TrainState()
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        stopper = EarlyStopping(
            patience, config.min_delta, resume["best_metric"], resume["bad_epochs"]
        )
        state = TrainState(resume["epoch"], resume["stopped_early"], list(resume["history"]))
        set_rng_state(resume["rng"])
        if world.is_main:
            print(
                f"phase {phase}: resuming from {latest_path} after epoch {state.epoch}",
                file=sys.stderr,
            )

    train_model = DistributedDataParallel(model) if world.distributed else model
    if config.compile:
        train_model = torch.compile(train_model)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"config_phase{phase}.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
        if tracker is not None and resume is None:
            tracker.log_params({**config_to_dict(config), "phase": phase, "pretrained": pretrained})

    meta = {
        "format": "cellseg-checkpoint/1",
        "phase": phase,
        "model_name": config.backbone,
        "decoder_width": model.decoder.branches["np"].bottleneck.out_channels,
        "image_size": list(config.image_size),
        "native_size": native_size(data),
        "lora": lora,
        "config": config_to_dict(config),
    }
    while state.epoch < config.epochs and not state.stopped_early:
        epoch = state.epoch
        train_sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        start = time.perf_counter()
        train_losses = run_epoch(
            train_model,
            train_loader,
            world,
            config,
            optimizer,
            scheduler,
            f"phase {phase} epoch {epoch + 1}/{config.epochs}",
        )
        val_losses = run_epoch(model, val_loader, world, config, desc="validate")
        improved = stopper.update(val_losses["total"])
        state.epoch = epoch + 1
        state.stopped_early = broadcast_flag(stopper.should_stop, world)
        record = {
            "epoch": state.epoch,
            **{f"train_{k}": v for k, v in train_losses.items()},
            **{f"val_{k}": v for k, v in val_losses.items()},
            "lr": scheduler.get_last_lr()[-1],
            "seconds": time.perf_counter() - start,
        }
        state.history.append(record)
        if world.is_main:
            weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            common = {**meta, "model": weights, "epoch": state.epoch, "best_metric": stopper.best}
            if improved:
                atomic_save(common, best_path)
            atomic_save(
                {
                    **common,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": {},  # bf16 autocast needs no loss scaling; kept for the format
                    "bad_epochs": stopper.bad_epochs,
                    "stopped_early": state.stopped_early,
                    "history": state.history,
                    "rng": rng_state(),
                },
                latest_path,
            )
            print(
                f"phase {phase} epoch {state.epoch}: train {train_losses['total']:.4f} "
                f"val {val_losses['total']:.4f}{' (best)' if improved else ''}",
                file=sys.stderr,
            )
            if tracker is not None:
                tracker.log_metrics(
                    {k: v for k, v in record.items() if k != "epoch"}, step=state.epoch
                )
    if world.is_main and tracker is not None and best_path.is_file():
        tracker.log_artifact(best_path)
    return state


def native_size(data: Path) -> list[int]:
    """(H, W) of the dataset's frames: inference rescales other images by the same factor."""
    first = json.loads((data / "coco" / "train.json").read_text())["images"][0]
    return [first["height"], first["width"]]


def _scaling(ckpt: dict) -> float | None:
    lora = ckpt.get("lora")
    return lora_scaling(lora["rank"], lora["alpha"]) if lora else None
