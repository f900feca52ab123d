"""`cellseg tune` on a trained (tiny) model: the val maps computed once, a search that never
ends below the model's own settings, the choice written into the checkpoint every reader
applies, and the test split never read."""

from __future__ import annotations

import json
import shutil

import pytest

from cellseg import cli
from cellseg.evaluation.inference import Predictor
from cellseg.evaluation.tune import tune
from cellseg.training.config import load_config
from cellseg.training.loop import train
from tests.conftest import TINY

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune-model")
    train(1, dataset, out, load_config("local", 1, [*TINY, "epochs=2"]))
    return out


def test_tune_writes_a_checkpoint_with_the_choice_and_never_reads_test(dataset, trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "coco" / "test.json").unlink()  # tuning must not need, let alone read, the test split
    out = tmp_path / "tuned"
    tuning = tune(trained, data, out, device="cpu", budget_seconds=120)
    assert tuning.best_score >= tuning.start_score
    assert tuning.start == Predictor.from_checkpoint(trained / "best_phase1.pt", "cpu").params
    tuned = Predictor.from_checkpoint(out / "best_phase1.pt", "cpu")
    assert tuned.params == tuning.chosen  # evaluation, predict and serving read these
    saved = json.loads((out / "tuning.json").read_text())
    assert saved["objective"] == "val strict box mAP@0.5" and saved["trials"]
    assert saved["best_score"] == tuning.best_score
    assert (out / "tuning.md").read_text().startswith("# Post-processing chosen on val")


def test_evaluate_set_re_evaluates_with_other_settings(dataset, trained, tmp_path):
    base = ["evaluate", "--data", str(dataset), "--model", str(trained), "--split", "val",
            "--device", "cpu"]  # fmt: skip
    assert cli.main([*base, "--out", str(tmp_path / "own")]) == 0
    changed = ["--set", "min_instance_area=100000"]  # nothing that small survives
    assert cli.main([*base, "--out", str(tmp_path / "set"), *changed]) == 0
    own = json.loads((tmp_path / "own" / "results.json").read_text())
    other = json.loads((tmp_path / "set" / "results.json").read_text())
    assert own and other == []  # the same maps, post-processed with the setting given
    assert cli.main([*base, "--out", str(tmp_path / "bad"), "--set", "lr=1"]) == 2
