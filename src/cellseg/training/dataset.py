"""The converted dataset as PyTorch samples: image, NP / HV / NC targets, ignore mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cellseg.data.arrays import load_sample
from cellseg.data.manifest import split_files
from cellseg.training.augment import build_transform
from cellseg.training.targets import hv_maps


def to_tensors(image: np.ndarray, instance: np.ndarray, classes: np.ndarray, ignore: np.ndarray):
    """Model inputs and targets from (augmented) arrays; HV maps computed here."""
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255,
        "np": torch.from_numpy((instance > 0).astype(np.int64)),
        "hv": torch.from_numpy(hv_maps(instance)),
        "nc": torch.from_numpy(classes.astype(np.int64)),
        "ignore": torch.from_numpy(ignore.astype(bool)),
    }


def worker_init(_worker_id: int) -> None:
    """DataLoader workers: one OpenCV thread each (torch already uses one), so loading does
    not compete with the training step for cores."""
    import cv2

    cv2.setNumThreads(1)


class CellDataset(torch.utils.data.Dataset):
    """Samples of one split, resized (and, for training, augmented) to ``image_size``.

    Augmentation is seeded from (``seed``, epoch, index), so a sample is the same whichever
    worker or rank draws it, and a resumed run sees exactly what an uninterrupted one would.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        image_size: tuple[int, int],
        augment: bool,
        limit: int = 0,
        seed: int = 0,
    ):
        self.root = Path(root)
        self.files = split_files(self.root, split, limit)
        self.transform = build_transform(image_size, augment)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = load_sample(self.root, self.files[index])
        seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        self.transform.set_random_seed(int(seed))
        out = self.transform(
            image=sample["image"],
            masks=[sample["instance"], sample["classes"], sample["ignore"].astype(np.uint8)],
        )
        instance, classes, ignore = out["masks"]
        return to_tensors(out["image"], instance, classes, ignore)
