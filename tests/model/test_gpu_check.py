"""`make bench-gpu` has never had a GPU here: its whole path runs on the CPU with the test ViT
(`--quick`), so the one GPU run, when a GPU is lent, does not fail on a typo."""

import json
import subprocess
import sys

import pytest

from tests.conftest import synthetic_samples, write_voc

pytestmark = pytest.mark.model


def test_the_gpu_check_runs_end_to_end_on_a_cpu(tmp_path):
    samples = synthetic_samples(8)
    stems = sorted(samples)
    voc = write_voc(
        tmp_path / "voc", samples, {"train": stems[:4], "val": stems[4:6], "test": stems[6:]}
    )
    out = tmp_path / "check"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--source", str(voc),
           "--out", str(out), "--steps", "2", "--epochs", "2", "--subset", "4"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((out / "gpu_check.json").read_text())
    assert [(s["phase"], s["compiled"]) for s in figures["steps"]] == [(1, False), (2, False)]
    assert all(s["img_per_s"] > 0 and s["gflops_per_image"] > 0 for s in figures["steps"])
    assert all(s["mfu"] is None for s in figures["steps"])  # no chip peak on a CPU
    for s in figures["steps"]:  # Phase 1's backbone and Phase 2's base weights: frozen
        assert 0 < s["checkpoint_share"] < 1 and s["checkpoint_write_s"] > 0
        assert s["checkpoint_mb"]["frozen"] > 0
    run = figures["training_run"]
    assert run["evaluated_images"] == 2 and 0 <= run["box_map50"] <= 1
    assert (out / "train" / "best_phase2.pt").is_file()
    assert "phase 1 step, eager" in result.stdout
    assert "phase 2 checkpoints per epoch" in result.stdout
