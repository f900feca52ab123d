"""A tiny converted dataset and a checkpoint trained on it, shared by the model tests."""

from pathlib import Path

import pytest

from cellseg.config import load_config
from cellseg.convert import convert_dataset
from cellseg.train import train
from tests.conftest import synthetic_samples, write_voc

TINY = [
    "backbone=test_vit",
    "image_size=64,96",
    "num_workers=0",
    "batch_size=2",
    "grad_accum=1",
    "device=cpu",
    "deterministic=true",
    "lr=0.002",
    "warmup_epochs=0",
]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    samples = synthetic_samples(10)
    stems = sorted(samples)
    voc = write_voc(
        root / "voc", samples, {"train": stems[:6], "val": stems[6:8], "test": stems[8:]}
    )
    convert_dataset(voc, root / "dataset", workers=1)
    return root / "dataset"


@pytest.fixture(scope="session")
def checkpoint(dataset, tmp_path_factory) -> Path:
    """best_phase1.pt of a 2-epoch run of the test ViT."""
    out = tmp_path_factory.mktemp("trained")
    train(1, dataset, out, load_config("local", 1, [*TINY, "epochs=2"]))
    return out / "best_phase1.pt"
