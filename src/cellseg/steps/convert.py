"""The convert step: raw BCCD (VOC boxes) -> the instance-segmentation dataset."""

from __future__ import annotations

from pathlib import Path

PREVIEW_IMAGES = 4  # overlays written beside the dataset, for a person to check


def convert_step(source: str, data_md5: str, out: Path) -> dict:
    """Convert raw BCCD at ``source``; ``data_md5`` (from the data-version step) is recorded."""
    from cellseg.data.convert import convert_dataset

    manifest = convert_dataset(Path(source), Path(out), preview=PREVIEW_IMAGES)
    return {k: v["images"] for k, v in manifest["splits"].items()} | {"data_md5": data_md5}
