"""Two-phase training: Phase 1 trains the decoder (backbone frozen when pretrained), Phase 2 adds
LoRA to the backbone (a ViT's ``qkv``, or its entry's ``lora_targets``) and fine-tunes adapters
and decoder.

Runs the same under plain ``python``, ``torchrun`` and a cluster job. Rank 0 alone writes
checkpoints and logs. ``latest_phase{N}.pt`` is written every epoch with everything needed to
resume (each rank's CPU and CUDA RNG state included; frozen weights once per run beside it);
``best_phase{N}.pt`` only when the validation loss improves (:mod:`cellseg.training.saver`).
Starting again with the same arguments resumes from ``latest``.

Phase 2 starts by scoring its starting point (Phase 1's model: fresh LoRA adapters change
nothing) on val; that is its first ``best``, recorded with ``chosen_phase`` 1, and Phase 2's
training replaces it only by beating it. So the better phase ships.

Each rank seeds its RNGs with ``seed + rank`` (dropout differs across ranks; augmentation is
seeded per sample, so it does not depend on the rank).

SIGTERM (a Kueue preemption, a node drain, a terminated run: the pod's grace period follows)
stops training at the end of the accumulation group in hand (under DDP, where the ranks next
agree, every ``PROGRESS_EVERY`` batches), writes ``latest`` with the epoch's place (batches
done, the ranks' running loss sums, every rank's RNG) and exits with 143; the restarted job
resumes at the next batch, and ends as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from cellseg.data.manifest import native_size, read_manifest
from cellseg.errors import CheckpointError, TrainingError
from cellseg.model.checkpoint import (
    BEST,
    LATEST,
    CheckpointMeta,
    checkpoint_path,
    find_checkpoint,
    load_checkpoint,
    load_into,
)
from cellseg.model.factory import CellSegModel, create_model, model_spec, resolve_weights
from cellseg.model.lora import add_lora
from cellseg.runtime import configure_backends, place_images, place_model
from cellseg.training.config import TrainConfig, config_to_dict
from cellseg.training.dataset import (
    CellDataset,
    EpochSampler,
    ShardSampler,
    single_threaded_opencv,
)
from cellseg.training.distributed import (
    World,
    all_reduce_sum,
    broadcast_flag,
    gather_objects,
    global_sum,
    init_world,
    shutdown,
)
from cellseg.training.losses import Total, hovernet_loss, local_total
from cellseg.training.saver import CheckpointSaver

LOSS_TERMS = ("total", "np", "hv", "nc")
PROGRESS_EVERY = 25  # batches between the progress bar's reads of the loss (a host sync each)


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
    batches_done: int = 0  # of the epoch in hand, when it was stopped in the middle
    epoch_sums: list[float] | None = None  # its running loss sums then
    epoch_rng: dict | None = None  # this rank's RNG then, set once the epoch's loader starts


class StopRequest:
    """SIGTERM's mark: training stops at the next point it can save and resume exactly."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True


class Interrupted(TrainingError):
    """Training stopped on SIGTERM with ``latest`` saved: a restart resumes it."""

    exit_code = 128 + signal.SIGTERM


@contextlib.contextmanager
def stop_on_sigterm():
    """A :class:`StopRequest` that SIGTERM sets while the block runs (main thread only)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Run:
    """Everything one phase's training holds while it runs."""

    phase: int
    config: TrainConfig
    world: World
    out: Path
    model: CellSegModel  # the bare model: what checkpoints hold
    train_model: torch.nn.Module  # what the step calls (DDP and/or compiled wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stopper: EarlyStopping
    state: TrainState
    meta: CheckpointMeta
    train_loader: DataLoader
    train_sampler: EpochSampler
    val_loader: DataLoader
    saver: CheckpointSaver | None = None  # rank 0's
    tracker: object | None = None
    stop: StopRequest | None = None

    @property
    def best_path(self) -> Path:
        return checkpoint_path(self.out, self.phase, BEST)

    @property
    def latest_path(self) -> Path:
        return checkpoint_path(self.out, self.phase, LATEST)


def find_phase1_checkpoint(init: Path | None, out: Path) -> Path:
    """Phase 1's best checkpoint, else its latest: ``init`` (file or folder), else ``out``."""
    folder = init if init is not None else out
    try:
        return find_checkpoint(folder, phases=(1,))
    except CheckpointError:
        raise TrainingError(
            f"Phase 2 starts from Phase 1: no best_phase1.pt or latest_phase1.pt in {folder} "
            "(run `cellseg train --phase 1` first, or pass --init CHECKPOINT)"
        ) from None


def model_for_phase(config: TrainConfig, phase: int) -> tuple[CellSegModel, bool]:
    """The model for ``phase`` and whether its backbone came pretrained."""
    pretrained = (
        phase == 1 and resolve_weights(model_spec(config.backbone), config.weights) is not None
    )
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
    groups = [{"params": decoder, "lr": config.decoder_lr if phase == 2 else config.lr}]
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
    """This process's RNG states: torch CPU, every visible CUDA device (LoRA dropout draws from
    it on a GPU), NumPy and Python."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda", [])  # absent in checkpoints written before it was saved
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def rank_rng_state(saved: dict | list, rank: int) -> dict | None:
    """This rank's saved RNG state: ``saved`` is one state per rank (older checkpoints: one
    state); None when the run had fewer ranks (the rank keeps its fresh ``seed + rank``)."""
    states = saved if isinstance(saved, list) else [saved]
    return states[rank] if rank < len(states) else None


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
    """Training (``shuffle``): a :class:`DistributedSampler` (ranks padded to equal length,
    as DDP needs); evaluation: each image on one rank, once."""
    if shuffle:
        shards = DistributedSampler(
            dataset, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=seed
        )
    else:
        shards = ShardSampler(len(dataset), world.world_size, world.rank)
    sampler = EpochSampler(shards)
    if config.num_workers:
        single_threaded_opencv()  # the workers do all OpenCV work of training
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=world.device.type == "cuda",
        persistent_workers=config.num_workers > 0,
    )
    return loader, sampler


def to_device(batch: dict, device: torch.device) -> dict:
    """A loader batch (:data:`~cellseg.training.dataset.SAMPLE_DTYPES`) on ``device`` in the
    types the step computes with: the image as float in [0, 1] (in the layout the model's
    convolutions want there), class maps as int64. Converting after the copy moves a quarter of
    the bytes to the device and spends no loader time on it."""
    return {
        "image": place_images(batch["image"], device).float() / 255,
        "np": batch["np"].to(device, non_blocking=True).long(),
        "hv": batch["hv"].to(device, non_blocking=True),
        "nc": batch["nc"].to(device, non_blocking=True).long(),
        "ignore": batch["ignore"].to(device, non_blocking=True),
    }


def forward_loss(
    model, batch: dict, config: TrainConfig, device: torch.device, total: Total = local_total
) -> dict:
    """The training step's forward: model and HoVer-Net loss terms of one batch on ``device``.

    ``total`` sums the loss's batch statistics over the ranks sharing the batch."""
    batch = to_device(batch, device)
    with autocast(config, device):
        outputs = model(batch["image"])
        return hovernet_loss(outputs, batch["np"], batch["hv"], batch["nc"], batch["ignore"], total)


def batch_step(
    run: Run,
    model: torch.nn.Module,
    batch: dict,
    training: bool,
    group_size: int,
    last_in_group: bool,
    sums: torch.Tensor,
) -> None:
    """One batch: forward and loss, and in training backward (an optimizer step when it ends
    its accumulation group); its loss terms, weighted by its images, added to ``sums`` on the
    device. Nothing here waits for the device (no host sync): the host queues the next batch's
    work while this one runs."""
    world = run.world
    total = functools.partial(global_sum, world=world) if training else local_total
    sync = contextlib.nullcontext()
    if training and world.distributed and not last_in_group:
        sync = model.no_sync()
    with sync, torch.set_grad_enabled(training):
        terms = forward_loss(model, batch, run.config, world.device, total)
        if training:
            (terms["total"] / group_size).backward()
    if training and last_in_group:
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
    n = batch["image"].shape[0]
    sums[:-1] += torch.stack([terms[t].detach().double() * n for t in LOSS_TERMS])
    sums[-1] += n


def backbone_frozen(model: CellSegModel) -> bool:
    """Whether nothing in the backbone trains (Phase 1 on pretrained weights)."""
    return not any(p.requires_grad for p in model.backbone.parameters())


def frozen_batchnorms(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers in ``module`` with affine parameters, none of which trains (one
    without any, ``affine=False``, keeps learning its statistics)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return [
        m for m in norms if m.affine and not m.weight.requires_grad and not m.bias.requires_grad
    ]


def stop_due(run: Run, group: int) -> bool:
    """Whether every rank stops after accumulation group ``group``: one process reads its own
    mark after each group; ranks agree by an all-reduce every ``PROGRESS_EVERY`` batches (a
    host sync each, as the progress bar's read)."""
    if run.stop is None:
        return False
    world = run.world
    if not world.distributed:
        return run.stop.requested
    if group % max(1, PROGRESS_EVERY // run.config.grad_accum):
        return False
    flag = torch.tensor([float(run.stop.requested)], device=world.device)
    return bool(all_reduce_sum(flag, world).item())


def run_epoch(
    run: Run, loader: DataLoader, training: bool, desc: str, n_batches: int | None = None
) -> dict[str, float]:
    """One pass over ``loader``; trains when ``training``. Returns sample-weighted mean losses.

    With ``grad_accum`` > 1, gradients of that many batches add up before one optimizer step;
    under DDP they are all-reduced once per step, not per batch. In training, the batch-level
    loss terms are computed over the ranks' global batch (:func:`global_sum`), so DDP equals
    one process on that batch; with ``grad_accum`` the micro-batches' losses are averaged.
    Validation shards differ in length across ranks, so there each rank's batch is its own.

    The running sums stay on the device: the host reads them for the progress bar every
    ``PROGRESS_EVERY`` batches and once at the end.

    Training resumes an epoch stopped in the middle (``run.state.batches_done`` > 0: the loader
    skips those batches, ``n_batches`` is the whole epoch's) with its sums and RNG, and raises
    :class:`Interrupted` after a group when :func:`stop_due` says so.
    """
    model = run.train_model if training else run.model
    model.train(training)
    if training and backbone_frozen(run.model):
        # a frozen backbone computes features as it will at inference: dropout, drop-path and
        # BatchNorm statistics in eval mode (UNI has none of them active; other backbones may)
        run.model.backbone.eval()
    elif training:
        # Phase 2: BatchNorm layers whose weights stay frozen under LoRA keep their pretrained
        # statistics; batches of four crops would overwrite them with noise
        for norm in frozen_batchnorms(run.model.backbone):
            norm.eval()
    world, accum, state = run.world, run.config.grad_accum, run.state
    start = state.batches_done if training else 0
    sums = torch.zeros(len(LOSS_TERMS) + 1, dtype=torch.float64, device=world.device)
    if start and state.epoch_sums and world.is_main:  # the ranks' sums, reduced, once
        sums += torch.tensor(state.epoch_sums, dtype=torch.float64, device=world.device)
    n_batches = n_batches or len(loader)
    batches = iter(loader)  # draws the loader's seed from torch's RNG: restore after it
    if start and state.epoch_rng is not None:
        set_rng_state(state.epoch_rng)
    bar = tqdm(batches, desc=desc, disable=not world.is_main, leave=False, file=sys.stderr,
               total=n_batches, initial=start)  # fmt: skip
    for i, batch in enumerate(bar, start):
        group_start = i - i % accum
        group_size = min(accum, n_batches - group_start)
        last_in_group = i == group_start + group_size - 1
        batch_step(run, model, batch, training, group_size, last_in_group, sums)
        if world.is_main and (i + 1) % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{(sums[0] / sums[-1]).item():.3f}")  # the running mean
        if training and last_in_group and i + 1 < n_batches and stop_due(run, i // accum):
            # every rank stops here together: the sums of all of them, as the epoch's end would
            state.batches_done = i + 1
            state.epoch_sums = all_reduce_sum(sums.clone(), world).tolist()
            bar.close()
            raise Interrupted(f"stopped after batch {i + 1} of {n_batches}")
    if training:
        state.batches_done, state.epoch_sums, state.epoch_rng = 0, None, None
    sums = all_reduce_sum(sums, world).tolist()
    return {t: sums[j] / sums[-1] for j, t in enumerate(LOSS_TERMS)}


def train_epoch(run: Run) -> dict[str, float]:
    epoch = run.state.epoch
    run.train_sampler.set_epoch(epoch)
    n_batches = len(run.train_loader)
    run.train_sampler.skip = run.state.batches_done * run.config.batch_size
    desc = f"phase {run.phase} epoch {epoch + 1}/{run.config.epochs}"
    try:
        return run_epoch(run, run.train_loader, True, desc, n_batches)
    finally:
        run.train_sampler.skip = 0


def validate(run: Run) -> dict[str, float]:
    return run_epoch(run, run.val_loader, False, "validate")


def save(run: Run, improved: bool, rngs: list[dict]) -> float:
    """``best`` when the validation loss improved; ``latest`` (with resume state) always;
    returns the seconds training waited for it (:class:`~cellseg.training.saver.
    CheckpointSaver` writes in the background).

    Args:
        rngs: every rank's RNG state, in rank order (:func:`gather_objects`).
    """
    resume = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "bad_epochs": run.stopper.bad_epochs,
        "stopped_early": run.state.stopped_early,
        "history": run.state.history,
        "rng": rngs,
        "batches_done": run.state.batches_done,  # > 0: saved in the middle of an epoch
        "epoch_sums": run.state.epoch_sums,
    }
    return run.saver.save(run.model, run.meta, run.state.epoch, run.stopper.best, improved, resume)


def restore(run: Run, ckpt: dict) -> None:
    """Optimizer, schedule, early stopping, history and RNG from a ``latest`` checkpoint."""
    run.optimizer.load_state_dict(ckpt["optimizer"])
    match_optimizer_to_device(run.optimizer)
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.stopper.best, run.stopper.bad_epochs = ckpt["best_metric"], ckpt["bad_epochs"]
    run.state = TrainState(ckpt["epoch"], ckpt["stopped_early"], list(ckpt["history"]))
    state = rank_rng_state(ckpt["rng"], run.world.rank)
    if state is not None:
        set_rng_state(state)
    if ckpt.get("batches_done"):  # stopped in the middle of an epoch: go on from there
        run.state.batches_done, run.state.epoch_sums = ckpt["batches_done"], ckpt["epoch_sums"]
        run.state.epoch_rng = state


def match_optimizer_to_device(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict``: the implementation chosen for this device (a loaded state
    keeps the saved groups' ``fused``/``foreach``, so a run saved on CUDA would resume fused on
    a CPU, one saved on a CPU unfused on CUDA) and each moment in its parameter's layout (the
    fused kernel refuses a contiguous moment of a channels-last weight)."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = (
            optimizer.defaults["fused"],
            optimizer.defaults["foreach"],
        )
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def keep_starting_point(run: Run) -> None:
    """Phase 2's first ``best``: its starting point (Phase 1's model) scored on val, so Phase 2
    replaces it only by beating it; recorded as ``chosen_phase`` 1."""
    start_loss = validate(run)["total"]
    run.stopper.best = start_loss
    if run.world.is_main:
        meta = dataclasses.replace(run.meta, chosen_phase=1)
        run.saver.save(run.model, meta, 0, start_loss, improved=True)
        print(f"phase 2: Phase 1's model scores val {start_loss:.4f}", file=sys.stderr)


def build_data(data: Path, config: TrainConfig, world: World):
    """The training loader and its sampler, and the validation loader."""
    train_set = CellDataset(
        data,
        "train",
        config.image_size,
        True,
        config.limit_train_images,
        config.seed,
        config.train_crop,
        config.crop_focus,
        config.degrade,
    )
    val_set = CellDataset(data, "val", config.image_size, False, config.limit_val_images)
    train_loader, train_sampler = make_loader(train_set, world, config, True, config.seed)
    val_loader, _ = make_loader(val_set, world, config, False, config.seed)
    return train_loader, train_sampler, val_loader


def build_optimization(
    model: CellSegModel, phase: int, config: TrainConfig, batches: int, device: torch.device
):
    """AdamW over the trainable groups and its warm-up + cosine schedule (``batches`` per epoch).

    On CUDA, AdamW's fused kernel: one launch for every parameter, and its step counts stay on
    the device. (The CPU keeps the default implementation, whose figures the docs report.)"""
    groups = param_groups(model, phase, config)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=fused)
    steps_per_epoch = math.ceil(batches / config.grad_accum)
    total, warmup = steps_per_epoch * config.epochs, steps_per_epoch * config.warmup_epochs
    schedule = lr_lambdas(phase, len(groups), total, warmup)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def checkpoint_meta(model: CellSegModel, phase: int, config: TrainConfig, data: Path):
    return CheckpointMeta(
        phase=phase,
        model_name=config.backbone,
        decoder_width=model.decoder.width,
        image_size=tuple(config.image_size),
        native_size=tuple(native_size(data)),
        lora={"rank": config.lora_rank, "alpha": config.lora_alpha} if phase == 2 else None,
        config=config_to_dict(config),
    )


def setup_run(phase, data, out, config, init, tracker, world: World) -> Run:
    """Model, data, optimizer and schedule; resumed from ``latest`` or, for Phase 2, started
    from Phase 1's checkpoint."""
    seed_everything(config.seed + world.rank, config.deterministic)
    latest = checkpoint_path(out, phase, LATEST)
    model, pretrained = model_for_phase(config, phase)
    resume = load_into(model, latest) if latest.is_file() else None
    if resume is None and phase == 2:
        source = find_phase1_checkpoint(init, out)
        start = load_into(model, source)
        if world.is_main:
            print(f"phase 2: starting from {source} (epoch {start['epoch']})", file=sys.stderr)
    place_model(model, world.device)
    configure_backends(world.device, config.deterministic)
    train_loader, train_sampler, val_loader = build_data(data, config, world)
    optimizer, scheduler = build_optimization(model, phase, config, len(train_loader), world.device)
    saver = None
    if world.is_main:
        frozen_ref = resume.get("frozen") if resume is not None else None
        saver = CheckpointSaver(out, phase, frozen_ref)
    train_model = DistributedDataParallel(model) if world.distributed else model
    if config.compile:
        train_model = torch.compile(train_model)
    run = Run(
        phase=phase,
        config=config,
        world=world,
        out=out,
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        scheduler=scheduler,
        stopper=EarlyStopping(config.patience, config.min_delta),
        state=TrainState(),
        meta=checkpoint_meta(model, phase, config, data),
        train_loader=train_loader,
        train_sampler=train_sampler,
        val_loader=val_loader,
        saver=saver,
        tracker=tracker,
    )
    if resume is not None:
        restore(run, resume)
        if world.is_main:
            done = run.state.epoch
            print(f"phase {phase}: resuming from {latest} after epoch {done}", file=sys.stderr)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"config_phase{phase}.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
        if tracker is not None and resume is None:
            tracker.log_params({**config_to_dict(config), "phase": phase, "pretrained": pretrained})
    if resume is None and phase == 2:
        keep_starting_point(run)
    return run


def log_epoch(run: Run, record: dict, improved: bool, checkpoint_s: float) -> None:
    """The epoch's line on stderr and its metrics; ``checkpoint_s``: the seconds training
    waited for its checkpoints (the write itself runs beside the next epoch)."""
    print(
        f"phase {run.phase} epoch {record['epoch']}: train {record['train_total']:.4f} "
        f"val {record['val_total']:.4f}{' (best)' if improved else ''}, "
        f"checkpoint {checkpoint_s:.2f} s",
        file=sys.stderr,
    )
    if run.tracker is not None:
        metrics = {k: v for k, v in record.items() if k != "epoch"}
        run.tracker.log_metrics({**metrics, "checkpoint_s": checkpoint_s}, record["epoch"])


def save_interrupted(run: Run, why: Interrupted) -> None:
    """``latest`` with the epoch's place, written before the process exits (rank 0)."""
    rngs = gather_objects(rng_state(), run.world)
    if run.world.is_main:
        save(run, False, rngs)
        run.saver.close()  # on disk before the exit, within the grace period
        where = f"phase {run.phase} epoch {run.state.epoch + 1}"
        code = Interrupted.exit_code
        print(f"{where}: SIGTERM, {why}; latest saved, exiting {code} (a restart resumes here)",
              file=sys.stderr)  # fmt: skip


def fit(run: Run) -> TrainState:
    """Epochs until ``epochs`` or early stopping; checkpoints and logs from rank 0. SIGTERM
    saves ``latest`` where training stands and raises :class:`Interrupted`."""
    try:
        while run.state.epoch < run.config.epochs and not run.state.stopped_early:
            start = time.perf_counter()
            try:
                train_losses = train_epoch(run)
            except Interrupted as why:
                save_interrupted(run, why)
                raise
            val_losses = validate(run)
            improved = run.stopper.update(val_losses["total"])
            run.state.epoch += 1
            run.state.stopped_early = broadcast_flag(run.stopper.should_stop, run.world)
            record = {
                "epoch": run.state.epoch,
                **{f"train_{k}": v for k, v in train_losses.items()},
                **{f"val_{k}": v for k, v in val_losses.items()},
                "lr": run.scheduler.get_last_lr()[-1],
                "seconds": time.perf_counter() - start,
            }
            run.state.history.append(record)
            rngs = gather_objects(rng_state(), run.world)
            if run.world.is_main:
                waited = save(run, improved, rngs)
                log_epoch(run, record, improved, waited)
    finally:
        if run.saver is not None:
            run.saver.close()  # every checkpoint on disk before anyone reads one
    if run.world.is_main and run.tracker is not None and run.best_path.is_file():
        run.tracker.log_artifact(run.best_path)
        chosen = load_checkpoint(run.best_path)["chosen_phase"]
        run.tracker.set_tags({"cellseg.chosen_phase": chosen})
    return run.state


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
        tracker: optional experiment logger (``cellseg.registry.tracking``); rank 0 only.
    """
    if phase not in (1, 2):
        raise TrainingError(f"phase must be 1 or 2, got {phase}")
    data, out = Path(data), Path(out)
    read_manifest(data)  # a clear error before any process group or model exists
    world = init_world(config.device)
    monitor = None
    if tracker is not None and world.is_main:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=5)
        monitor.start()
    try:
        with stop_on_sigterm() as stop:
            run = setup_run(phase, data, out, config, init, tracker, world)
            run.stop = stop
            return fit(run)
    finally:
        if monitor is not None:
            monitor.finish()
        shutdown(world)
