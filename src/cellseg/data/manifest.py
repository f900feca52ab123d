"""The converted dataset's manifest (``manifest.json``): its one writer and reader.

Everything that needs a split's files, the class table or the frames' native size asks here, so
the format tag is checked wherever a dataset is opened.
"""

from __future__ import annotations

import json
from pathlib import Path

from cellseg.atomic import write_text
from cellseg.classes import CLASS_IDS
from cellseg.errors import DataError

FORMAT = "cellseg-dataset/2"  # 2: unassigned stained pixels are void (issue 23)
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


def write_manifest(root: Path, manifest: dict) -> dict:
    """Write ``manifest`` (format tag and class table added) into the dataset at ``root``."""
    manifest = {"format": FORMAT, "classes": dict(CLASS_IDS), **manifest}
    write_text(Path(root) / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def read_manifest(root: Path) -> dict:
    """The manifest of the dataset at ``root``; a :class:`DataError` if it is not one of ours."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{root}: not a converted dataset (no {MANIFEST}); run `cellseg convert`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{path}: dataset format {manifest.get('format')!r}, this cellseg reads {FORMAT!r}; "
            "convert the data again with this version"
        )
    if manifest.get("classes") != CLASS_IDS:
        raise DataError(f"{path}: classes {manifest.get('classes')} differ from {CLASS_IDS}")
    return manifest


def split_files(root: Path, split: str, limit: int = 0) -> list[str]:
    """Image stems of ``split`` in the dataset at ``root`` (the first ``limit``; 0 = all)."""
    files = read_manifest(root)["splits"][split]["files"]
    return files[:limit] if limit else files


def native_size(root: Path) -> list[int]:
    """(H, W) of the dataset's frames: inference rescales other images by the same factor."""
    read_manifest(root)
    first = json.loads((Path(root) / "coco" / "train.json").read_text())["images"][0]
    return [first["height"], first["width"]]
