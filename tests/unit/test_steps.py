"""Pipeline steps' wiring that needs no model: training requests and their arguments."""

from pathlib import Path

import pytest

from cellseg.errors import TrainingError
from cellseg.steps.train import TrainRequest, train_args, train_step
from cellseg.training.config import load_config


def test_lora_alpha_travels_with_the_rank_and_zero_keeps_the_profiles():
    request = TrainRequest(phase=2, profile="local", lora_rank=16, lora_alpha=32)
    args = train_args(request, Path("d"), Path("o"), Path("p1"), None)
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert sets == ["lora_rank=16", "lora_alpha=32"]
    config = load_config("local", 2, sets)
    assert config.lora_alpha / config.lora_rank == 2.0
    assert args[args.index("--init") + 1] == "p1"
    profile = load_config("local", 2, TrainRequest(phase=2, profile="local").config_overrides())
    assert (profile.lora_rank, profile.lora_alpha) == (4, 8.0)  # 0 = the profile's


def test_a_request_is_built_by_keyword_only():
    with pytest.raises(TypeError):
        TrainRequest(2, "local")  # positional arguments silently shifted once; now refused


def test_phase2_without_its_input_model_fails_before_anything_runs(tmp_path):
    with pytest.raises(TrainingError, match="Phase 2 needs its input model"):
        train_step(
            TrainRequest(phase=2, profile="local"),
            data=tmp_path,
            out=tmp_path / "out",
            init=None,
            pipeline_run_id="r",
            tags={},
            mlflow_uri="",
        )
    assert not (tmp_path / "out").exists()
