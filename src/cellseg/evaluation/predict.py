"""``cellseg predict``: images in, instance maps, counts, overlays and COCO results out.

A bad file (not an image, corrupt, too large) gets one line on stderr naming it; the other files
are still processed, and the return value counts the failures.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cellseg.atomic import write_text
from cellseg.classes import CLASS_NAMES, NUM_CLASSES
from cellseg.data.coco import coco_results
from cellseg.errors import InputError
from cellseg.evaluation.inference import as_rgb_uint8
from cellseg.overlay import draw_overlay

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; folders expanded to their images (sorted)."""
    files = []
    for path in map(Path, inputs):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def decode_image(data: bytes) -> np.ndarray:
    """Pixels of an encoded image (JPEG, PNG, TIFF, BMP) as an array (uint8 or uint16; gray,
    RGB or RGBA); raises InputError. ``cellseg predict`` and the model server both read
    images through here."""
    if not data:
        raise InputError("empty image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(im).astype(np.uint16)
            if im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.mode else "RGB")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise InputError(f"not a readable image ({err.__class__.__name__})") from None


def read_image(path: Path) -> np.ndarray:
    """Pixels of an image file (see :func:`decode_image`); raises InputError."""
    if not path.is_file():
        raise InputError("file not found")
    return decode_image(path.read_bytes())


def predict(inputs: list[Path], predictor, out: Path) -> int:
    """Run ``predictor`` (RGB image -> Instances) on every input; returns how many failed."""
    out = Path(out)
    for sub in ("overlays", "instances"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    results, rows, failures = [], [], 0
    for image_id, path in enumerate(expand_inputs(inputs), start=1):
        try:
            image = as_rgb_uint8(read_image(path))
            inst = predictor(image)
        except InputError as err:
            print(f"cellseg predict: {path}: {err}", file=sys.stderr)
            failures += 1
            continue
        ids = np.unique(inst.labels[inst.labels > 0])
        counts = (
            np.bincount(inst.classes[ids - 1], minlength=NUM_CLASSES)[1:]
            if len(ids)
            else [0] * len(CLASS_NAMES)
        )
        rows.append([path.name, *map(int, counts)])
        Image.fromarray(draw_overlay(image, inst.labels, inst.class_map())).save(
            out / "overlays" / f"{path.stem}.png"
        )
        Image.fromarray(inst.labels.astype(np.uint16)).save(out / "instances" / f"{path.stem}.png")
        results += [{**r, "file_name": path.name} for r in coco_results(image_id, inst)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", *CLASS_NAMES])
    writer.writerows(rows)
    write_text(out / "counts.csv", buf.getvalue())
    write_text(out / "results.json", json.dumps(results))
    return failures
