"""Writing one phase's checkpoints at what they cost: what changed, in the background.

Each epoch ``latest`` is written with the state that trains (decoder, adapters, any unfrozen
backbone part, buffers), the optimizer, schedule and RNG state, and a reference to the frozen
weights, which go to ``frozen_phase<N>.pt`` once per run (a frozen ViT-L is 1.2 GB that never
changes). ``best`` stays one whole file: it is what the next step loads and ships.

The training thread only copies the state to the CPU (training goes on changing it); a single
background thread writes the files, in order, each atomically (:func:`~cellseg.model.
checkpoint.write_payload`). So the next ``save`` waits for the previous write, a write that
fails fails the next ``save`` (or :meth:`CheckpointSaver.close`), and a process killed mid-write
leaves the previous file whole.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from torch import nn

from cellseg.atomic import remove_stale_temporaries
from cellseg.model.checkpoint import (
    BEST,
    FROZEN,
    LATEST,
    CheckpointMeta,
    checkpoint_path,
    checkpoint_payload,
    frozen_keys,
    snapshot,
    weights_digest,
    write_frozen,
    write_payload,
)


class CheckpointSaver:
    """``best``, ``latest`` and the frozen weights of one phase in ``out``.

    Args:
        frozen_ref: a resumed run's ``latest`` reference to its frozen weights: kept when the
            model's frozen weights still match it, so they are not written again.
        background: write in a background thread (False: before :meth:`save` returns).
    """

    def __init__(
        self, out: Path, phase: int, frozen_ref: dict | None = None, background: bool = True
    ):
        self.out, self.phase = Path(out), phase
        self.frozen_ref = frozen_ref
        self._frozen: dict | None = None  # CPU copy of the frozen weights, once known
        self._pool = ThreadPoolExecutor(1, "checkpoint-writer") if background else None
        self._pending: Future | None = None
        self.write_seconds = 0.0  # spent writing files, in whichever thread
        self.blocked_seconds = 0.0  # the training thread's time in save()
        self.out.mkdir(parents=True, exist_ok=True)
        for kind in (BEST, LATEST, FROZEN):
            remove_stale_temporaries(checkpoint_path(self.out, phase, kind))

    def path(self, kind: str) -> Path:
        return checkpoint_path(self.out, self.phase, kind)

    def save(
        self,
        model: nn.Module,
        meta: CheckpointMeta,
        epoch: int,
        best_metric: float,
        improved: bool,
        resume: dict | None = None,
    ) -> float:
        """``best`` when ``improved``, then ``latest`` when ``resume`` is given; returns the
        seconds the caller was held (the previous write, the copy to the CPU)."""
        start = time.perf_counter()
        self.wait()
        state = model.state_dict()
        frozen = set(frozen_keys(model))
        trainable = snapshot({k: v for k, v in state.items() if k not in frozen})
        jobs = []
        if frozen and self._frozen is None:
            self._frozen = snapshot({k: state[k] for k in frozen})
            digest = weights_digest(self._frozen)
            kept = self.frozen_ref and self.frozen_ref["sha256"] == digest
            if not (kept and self.path(FROZEN).is_file()):
                self.frozen_ref = {"file": self.path(FROZEN).name, "sha256": digest}
                frozen_job = functools.partial(write_frozen, digest=digest)
                jobs.append((frozen_job, self.path(FROZEN), self._frozen))
        whole = {**(self._frozen or {}), **trainable}
        if improved:
            payload = checkpoint_payload(whole, meta, epoch, best_metric)
            jobs.append((write_payload, self.path(BEST), payload))
        if resume is not None:
            ref = self.frozen_ref if frozen else None
            payload = checkpoint_payload(trainable, meta, epoch, best_metric, snapshot(resume), ref)
            jobs.append((write_payload, self.path(LATEST), payload))
        self._submit(jobs)
        held = time.perf_counter() - start
        self.blocked_seconds += held
        return held

    def _submit(self, jobs: list) -> None:
        def write_all():
            start = time.perf_counter()
            for write, path, payload in jobs:
                write(path, payload)
            self.write_seconds += time.perf_counter() - start

        if self._pool is None:
            write_all()
        else:
            self._pending = self._pool.submit(write_all)

    def wait(self) -> None:
        """Until the last write is on disk; raises its error if it failed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        """Wait for the last write and stop the writer thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
