"""The converted dataset as PyTorch samples: image, NP / HV / NC targets, ignore mask."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

from cellseg.data.arrays import load_sample
from cellseg.data.manifest import native_size, split_files
from cellseg.training.augment import build_transform, crop_window
from cellseg.training.losses import CLASS_WEIGHTS
from cellseg.training.targets import hv_maps

# What a sample's arrays travel as from the loader workers to the step: the compact types
# that hold them exactly (a 480x640 sample is 4.3 MB instead of 11). The step's device
# converts them (:func:`~cellseg.training.loop.to_device`). HV stays float32: quantising it
# would change the targets.
SAMPLE_DTYPES = {
    "image": torch.uint8,
    "np": torch.uint8,
    "hv": torch.float32,
    "nc": torch.uint8,
    "ignore": torch.bool,
}


def to_tensors(image: np.ndarray, instance: np.ndarray, classes: np.ndarray, ignore: np.ndarray):
    """Model input and targets from (augmented) arrays, as :data:`SAMPLE_DTYPES`: the image
    (3, H, W) in 0-255, NP 1 on cell pixels, HV maps computed here, NC class ids, ignore."""
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "np": torch.from_numpy((instance > 0).astype(np.uint8)),
        "hv": torch.from_numpy(hv_maps(instance)),
        "nc": torch.from_numpy(classes.astype(np.uint8)),
        "ignore": torch.from_numpy(ignore.astype(bool)),
    }


def single_threaded_opencv() -> None:
    """One OpenCV thread for this process and the DataLoader workers it forks (torch gives
    them one thread already), so loading does not compete with the training step for cores.

    Call it in the parent before the workers start: changing the count inside a forked worker
    hangs for good once the parent has used OpenCV's thread pool (the pthreads backend joins
    threads that do not exist in the child).
    """
    import cv2

    cv2.setNumThreads(1)


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation indices split over ranks, each exactly once: rank r takes r, r + W, ...

    :class:`DistributedSampler` pads the ranks to equal length with repeated images, which
    would count them twice in a validation loss; a rank here may hold one image less."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0):
        self.indices = range(rank, size, num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(torch.utils.data.Sampler):
    """A :class:`DistributedSampler`'s (or :class:`ShardSampler`'s) indices as
    ``(epoch, index)``: the epoch travels with each index, so loader workers stay alive across
    epochs (a new worker per epoch costs seconds on a CPU) and still augment each epoch
    differently."""

    def __init__(self, sampler: DistributedSampler | ShardSampler):
        self.sampler = sampler
        self.skip = 0  # indices of this epoch already trained on (a resume mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, index) for index in itertools.islice(self.sampler, self.skip, None))

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class CellDataset(torch.utils.data.Dataset):
    """Samples of one split, resized (and, for training, augmented) to ``image_size``, or
    ``crop`` x ``crop`` training crops at that scale, a share ``crop_focus`` of them placed on
    a cell drawn by the loss's class weights (:func:`~cellseg.training.augment.crop_window`).

    Augmentation is seeded from (``seed``, epoch, index), so a sample is the same whichever
    worker or rank draws it, and a resumed run sees exactly what an uninterrupted one would.
    Items are ``(epoch, index)`` pairs (:class:`EpochSampler` draws them); a bare index is
    epoch 0.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        image_size: tuple[int, int],
        augment: bool,
        limit: int = 0,
        seed: int = 0,
        crop: int = 0,
        crop_focus: float = 0.0,
        degrade: float = 0.0,
    ):
        self.root = Path(root)
        self.files = split_files(self.root, split, limit)
        self.transform = build_transform(image_size, augment, crop, degrade)
        self.seed = seed
        # a crop's side in the stored (native) pixels: the crop is cut at the inference scale
        self.crop_native = (
            crop * native_size(self.root)[0] / image_size[0] if augment and crop else 0
        )
        self.crop_focus = crop_focus

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        sample = load_sample(self.root, self.files[index])
        seed = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
        if self.crop_native:
            rng = np.random.default_rng(seed)
            window = crop_window(
                sample["classes"], self.crop_native, rng, self.crop_focus, CLASS_WEIGHTS
            )
            sample = {name: array[window] for name, array in sample.items()}
        self.transform.set_random_seed(int(seed))
        out = self.transform(
            image=sample["image"],
            masks=[sample["instance"], sample["classes"], sample["ignore"].astype(np.uint8)],
        )
        instance, classes, ignore = out["masks"]
        return to_tensors(out["image"], instance, classes, ignore)
