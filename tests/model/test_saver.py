"""Checkpoints at what they cost: ``latest`` holds what trains and points at the frozen
weights (written once per run), ``best`` stays whole, writes run in the background and stay
atomic, and a resume from split files ends where an uninterrupted run does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cellseg.errors import CheckpointError
from cellseg.model.checkpoint import (
    CheckpointMeta,
    checkpoint_files,
    load_checkpoint,
    load_into,
    write_frozen,
)
from cellseg.model.factory import create_model
from cellseg.training.config import load_config
from cellseg.training.loop import train
from cellseg.training.saver import CheckpointSaver
from tests.conftest import TINY

pytestmark = pytest.mark.model

META = CheckpointMeta(
    phase=1,
    model_name="test_vit",
    decoder_width=32,
    image_size=(64, 96),
    native_size=(96, 128),
    lora=None,
    config={},
)


def frozen_backbone_model():
    torch.manual_seed(0)
    model = create_model("test_vit", weights=None)
    model.backbone.requires_grad_(False)
    return model


def raw(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_latest_holds_what_trains_and_reads_back_whole_with_its_frozen_weights(tmp_path):
    model = frozen_backbone_model()
    saver = CheckpointSaver(tmp_path, 1)
    saver.save(model, META, 1, 0.5, improved=True, resume={"bad_epochs": 0})
    saver.close()
    latest, best, frozen = (tmp_path / f"{k}_phase1.pt" for k in ("latest", "best", "frozen"))
    on_disk = raw(latest)
    assert not any(k.startswith("backbone.") for k in on_disk["model"])
    assert on_disk["frozen"]["file"] == "frozen_phase1.pt"
    assert "frozen" not in raw(best)  # best is whole: what ships
    assert set(raw(best)["model"]) == set(model.state_dict())
    assert checkpoint_files(latest) == [latest, frozen]

    state = model.state_dict()
    for path in (latest, best):
        read = load_checkpoint(path)["model"]
        assert set(read) == set(state)
        assert all(torch.equal(read[k], state[k]) for k in state), path
    fresh = create_model("test_vit", weights=None)
    load_into(fresh, latest)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_frozen_weights_are_written_once_per_run_and_kept_by_a_resumed_one(tmp_path):
    model = frozen_backbone_model()
    saver = CheckpointSaver(tmp_path, 1)
    saver.save(model, META, 1, 0.5, improved=False, resume={})
    saver.wait()
    frozen = tmp_path / "frozen_phase1.pt"
    written = frozen.stat().st_mtime_ns
    with torch.no_grad():
        next(model.decoder.parameters()).add_(1.0)  # training moves the decoder only
    saver.save(model, META, 2, 0.5, improved=False, resume={})
    saver.close()
    assert frozen.stat().st_mtime_ns == written
    resumed = CheckpointSaver(tmp_path, 1, load_checkpoint(tmp_path / "latest_phase1.pt")["frozen"])
    resumed.save(model, META, 3, 0.5, improved=False, resume={})
    resumed.close()
    assert frozen.stat().st_mtime_ns == written


def test_a_missing_or_changed_frozen_file_fails_in_one_line(tmp_path):
    model = frozen_backbone_model()
    saver = CheckpointSaver(tmp_path, 1, background=False)
    saver.save(model, META, 1, 0.5, improved=False, resume={})
    latest, frozen = tmp_path / "latest_phase1.pt", tmp_path / "frozen_phase1.pt"
    other = {k: v + 1 for k, v in raw(frozen)["weights"].items()}
    write_frozen(frozen, other)  # another run's frozen weights in its place
    with pytest.raises(CheckpointError) as changed:
        load_checkpoint(latest)
    assert str(changed.value) == (
        f"{latest}: frozen_phase1.pt has changed since it was written (sha256 differs): "
        "it belongs to another run"
    )
    frozen.unlink()
    with pytest.raises(CheckpointError, match=r"latest_phase1\.pt: its frozen weights .* missing"):
        load_checkpoint(latest)


def test_a_write_that_fails_fails_the_next_save(tmp_path):
    saver = CheckpointSaver(tmp_path / "gone", 1)
    (tmp_path / "gone").rmdir()  # the volume went away: the write fails
    model = frozen_backbone_model()
    saver.save(model, META, 1, 0.5, improved=True)
    with pytest.raises(RuntimeError, match="does not exist"):
        saver.save(model, META, 2, 0.5, improved=True)
    saver.close()


WRITER = textwrap.dedent(
    """
    import sys, torch
    from cellseg.model.checkpoint import CheckpointMeta
    from cellseg.training.saver import CheckpointSaver

    meta = CheckpointMeta(1, "big", 0, (16, 16), (16, 16), None, {})
    model = torch.nn.Linear(4096, 8192)  # 128 MB of weights: each write takes a while
    saver = CheckpointSaver(sys.argv[1], 1)
    for epoch in range(1, 1000):
        with torch.no_grad():
            model.weight.fill_(epoch)
        saver.save(model, meta, epoch, 0.0, improved=False, resume={"bad_epochs": 0})
    """
)


def test_a_kill_9_mid_write_leaves_the_previous_latest_whole(tmp_path):
    """As a node or the OOM killer ends a pod while the background thread writes."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    latest = tmp_path / "latest_phase1.pt"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            writing = list(tmp_path.glob(".latest_phase1.pt.tmp-*"))
            if latest.exists() and writing and writing[0].stat().st_size > 0:
                break
            time.sleep(0.002)
        else:
            pytest.fail("never caught a write in progress")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    ckpt = load_checkpoint(latest)
    epoch = ckpt["epoch"]
    assert epoch >= 1 and bool((ckpt["model"]["weight"] == epoch).all())
    assert list(tmp_path.glob(".latest_phase1.pt.tmp-*"))  # the killed write's remains
    CheckpointSaver(tmp_path, 1).close()  # a restarted run clears them
    assert not list(tmp_path.glob(".latest_phase1.pt.tmp-*"))


class Preempted(Exception):
    pass


def test_phase2_resumed_from_split_checkpoints_ends_as_an_uninterrupted_run(
    dataset, tmp_path, monkeypatch
):
    """Phase 2's backbone base weights are frozen under the adapters: its ``latest`` is split,
    and a run stopped after its first epoch resumes from it exactly."""
    from cellseg.training import loop

    train(1, dataset, tmp_path / "p1", load_config("local", 1, [*TINY, "epochs=1"]))
    config = load_config("local", 2, [*TINY, "limit_train_images=4", "lora_rank=2", "epochs=2"])
    whole, resumed, init = tmp_path / "whole", tmp_path / "resumed", tmp_path / "p1"
    train(2, dataset, whole, config, init=init)

    log_epoch = loop.log_epoch

    def stop_after_first_epoch(run, record, *args):
        log_epoch(run, record, *args)
        if record["epoch"] == 1:
            raise Preempted

    monkeypatch.setattr(loop, "log_epoch", stop_after_first_epoch)
    with pytest.raises(Preempted):
        train(2, dataset, resumed, config, init=init)
    monkeypatch.undo()
    assert raw(resumed / "latest_phase2.pt")["frozen"]  # split
    state = train(2, dataset, resumed, config, init=init)
    assert [h["epoch"] for h in state.history] == [1, 2]
    a = load_checkpoint(whole / "latest_phase2.pt")["model"]
    b = load_checkpoint(resumed / "latest_phase2.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
