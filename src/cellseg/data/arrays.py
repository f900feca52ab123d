"""Compact, byte-reproducible storage of per-image arrays (``.npz``)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from cellseg.atomic import replacing

# A fixed timestamp makes the archive's bytes depend on the arrays alone.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as a deflated ``.npz`` that ``np.load`` reads; atomic."""
    with replacing(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def load_sample(root: Path, stem: str) -> dict[str, np.ndarray]:
    """One image of a converted dataset: ``image`` (H, W, 3) uint8, ``instance``, ``classes``,
    ``ignore``."""
    from PIL import Image

    with Image.open(Path(root) / "images" / f"{stem}.jpg") as im:
        image = np.asarray(im.convert("RGB"))
    return {"image": image, **load_arrays(Path(root) / "targets" / f"{stem}.npz")}
