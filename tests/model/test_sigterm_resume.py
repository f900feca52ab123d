"""SIGTERM in the middle of an epoch (a Kueue preemption, a node drain, a terminated run): the
training loop saves ``latest`` with the epoch's place within the pod's grace period, exits
143, and the restarted run ends bit-identical to one that was never stopped."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from cellseg.model.checkpoint import load_checkpoint
from cellseg.training import loop
from cellseg.training.config import load_config
from cellseg.training.loop import Interrupted, train
from tests.conftest import TINY

pytestmark = pytest.mark.model


def raw(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def sigterm_at(monkeypatch, call: int) -> None:
    """A real SIGTERM to this process during the ``call``-th training batch (1-based)."""
    step, calls = loop.batch_step, []

    def batch_step(run, model, batch, training, *args):
        if training:
            calls.append(1)
            if len(calls) == call:
                os.kill(os.getpid(), signal.SIGTERM)
        return step(run, model, batch, training, *args)

    monkeypatch.setattr(loop, "batch_step", batch_step)


@pytest.mark.parametrize(
    ("phase", "accum", "signal_at", "batches_done"),
    [
        (2, 1, 5, 2),  # LoRA dropout draws from the RNG: epoch 2, after its 2nd batch of 3
        (1, 2, 4, 2),  # accumulation: the signal in a group's first batch stops at its end
    ],
)
def test_sigterm_mid_epoch_saves_latest_and_the_restart_ends_as_an_uninterrupted_run(
    dataset, tmp_path, monkeypatch, phase, accum, signal_at, batches_done
):
    init = None
    if phase == 2:
        init = tmp_path / "p1"
        train(1, dataset, init, load_config("local", 1, [*TINY, "epochs=1"]))
    config = load_config("local", phase, [*TINY, "epochs=2", f"grad_accum={accum}", "lora_rank=2"])
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    uninterrupted = train(phase, dataset, whole, config, init=init)

    sigterm_at(monkeypatch, signal_at)
    with pytest.raises(Interrupted) as interrupted:
        train(phase, dataset, stopped, config, init=init)
    monkeypatch.undo()
    assert interrupted.value.exit_code == 128 + signal.SIGTERM
    latest = raw(stopped / f"latest_phase{phase}.pt")
    assert latest["epoch"] == 1 and latest["batches_done"] == batches_done  # mid-epoch 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again

    resumed = train(phase, dataset, stopped, config, init=init)
    timeless = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert timeless(resumed.history) == timeless(uninterrupted.history)  # epoch 2's losses too
    a = load_checkpoint(whole / f"latest_phase{phase}.pt")
    b = load_checkpoint(stopped / f"latest_phase{phase}.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["batches_done"] == 0  # the epoch finished


def test_the_cli_exits_143_when_training_stops_on_sigterm(dataset, tmp_path, monkeypatch):
    """143 (128 + SIGTERM), not 0: the job's restart policy restarts the container, which
    resumes from ``latest``."""
    from cellseg import cli

    def stopped(*args, **kwargs):
        raise Interrupted("stopped after batch 2 of 3")

    monkeypatch.setattr(loop, "train", stopped)
    argv = ["train", "--phase", "1", "--data", str(dataset), "--out", str(tmp_path)]
    assert cli.main([*argv, "--profile", "local"]) == 143
