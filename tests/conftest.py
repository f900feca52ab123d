"""Shared fixtures: where the real BCCD lives, and tiny synthetic VOC datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellseg.data.convert import convert_dataset
from cellseg.training.config import load_config
from cellseg.training.loop import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def bccd_source() -> Path:
    """The real BCCD VOC folder: ``BCCD_MIRROR`` (a directory) or the repo's ``data/BCCD``."""
    for candidate in (os.environ.get("BCCD_MIRROR"), REPO / "data" / "BCCD"):
        if candidate and (Path(candidate) / "Annotations").is_dir():
            return Path(candidate)
    pytest.skip("real BCCD not available: set BCCD_MIRROR or run `make data`")


def voc_xml(filename: str, width: int, height: int, boxes: list[tuple[str, int, int, int, int]]):
    objects = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, x0, y0, x1, y1 in boxes
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{width}</width>"
        f"<height>{height}</height><depth>3</depth></size>{objects}</annotation>"
    )


PLASMA = (205, 205, 215)
CELL = (190, 120, 140)


def disc_image(h: int, w: int, discs: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Plasma-coloured image with stained ellipses ``(cy, cx, ry, rx)``, slight noise."""
    rng = np.random.default_rng(0)
    image = np.empty((h, w, 3), np.float32)
    image[:] = PLASMA
    yy, xx = np.mgrid[0:h, 0:w]
    for cy, cx, ry, rx in discs:
        image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = CELL
    image += rng.normal(0, 2, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_voc(root: Path, samples: dict[str, tuple[np.ndarray, list]], splits: dict[str, list]):
    """A VOC folder: ``samples`` maps stem -> (image, boxes as (name, x0, y0, x1, y1))."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stem, (image, boxes) in samples.items():
        Image.fromarray(image).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        h, w = image.shape[:2]
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", w, h, boxes))
    for split, stems in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    return root


def synthetic_samples(n: int = 3) -> dict[str, tuple[np.ndarray, list]]:
    """``n`` 96x128 images, each with a red cell, a white cell and a platelet."""
    samples = {}
    for i in range(n):
        discs = [(30, 30 + i, 20, 20), (60, 90, 25, 28), (80, 30, 7, 7)]
        boxes = [
            ("RBC", 10 + i, 10, 51 + i, 51),
            ("WBC", 62, 35, 119, 86),
            ("Platelets", 23, 73, 38, 88),
        ]
        samples[f"img_{i:03d}"] = (disc_image(96, 128, discs), boxes)
    return samples


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    """Six synthetic images: train 3, val 2, test 1."""
    samples = synthetic_samples(6)
    stems = sorted(samples)
    return write_voc(
        tmp_path / "voc", samples, {"train": stems[:3], "val": stems[3:5], "test": stems[5:]}
    )


TINY = [
    "backbone=test_vit",
    "decoder_width=0",  # the test ViT's own (32), whatever the profile says
    "image_size=64,96",
    "train_crop=48",  # the profile's crops, scaled down with the frames
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
