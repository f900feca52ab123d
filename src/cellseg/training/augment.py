"""Augmentation (albumentations): geometry on image and masks alike, colour on the image only.

Masks (instance, class, ignore) are resampled nearest-neighbour; HV maps are not augmented but
recomputed from the augmented instance map (``cellseg.training.targets.hv_maps``).

Training samples are whole frames (zoomed in by up to 1.7x) or square crops cut at the inference
scale (:func:`crop_window`), optionally placed on the rarer classes' cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CROP_SCALE_JITTER = 1.15  # crops see cells up to 15% smaller or larger than inference does
# CellViT's blur and noise, at its recommended limits (TIO-IKIM/CellViT
# configs/examples/cell_segmentation/train_cellvit.yaml: blur_limit 10, gaussnoise var_limit 10,
# i.e. a standard deviation of sqrt(10) of 255): smears differ in focus and sensor noise
BLUR_LIMIT = (3, 9)  # odd kernel sides up to CellViT's 10
NOISE_STD = (0.0, 10**0.5 / 255)


def degradations(p: float) -> list:
    """Blur or sensor noise, one of them with probability ``p`` (0: none)."""
    import albumentations as A

    if not p:
        return []
    blur_or_noise = [A.Blur(blur_limit=BLUR_LIMIT, p=1.0), A.GaussNoise(std_range=NOISE_STD, p=1.0)]
    return [A.OneOf(blur_or_noise, p=p)]


def build_transform(
    image_size: tuple[int, int], augment: bool, crop: int = 0, degrade: float = 0.0
):
    """An ``albumentations.Compose`` producing ``image_size`` (H, W) images, or ``crop`` x
    ``crop`` images from windows that :func:`crop_window` cut.

    Args:
        augment: random flips, 90° rotations, scale/crop and colour/stain jitter; otherwise a
            plain resize (validation, evaluation).
        crop: with ``augment``, the side of the training crops; 0: whole frames.
        degrade: with ``augment``, the probability of blur or noise (:func:`degradations`).
    """
    import albumentations as A  # only the training and evaluation images need it

    h, w = image_size
    # INTER_AREA when shrinking, as inference does (Predictor): linear resampling at 0.4x aliases
    # the stain texture the network would then never see at test time
    area = "image"
    if not augment:
        return A.Compose([A.Resize(h, w, area_for_downscale=area)])
    flips = [A.RandomRotate90(), A.HorizontalFlip(), A.VerticalFlip()]
    colour = [
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, p=0.8),
        A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=8, p=0.5),
    ]
    colour += degradations(degrade)
    if crop:
        return A.Compose([A.Resize(crop, crop, area_for_downscale=area), *flips, *colour])
    aspect = w / h
    zoomed = A.RandomResizedCrop(
        size=(h, w),
        scale=(0.35, 1.0),
        ratio=(aspect * 0.8, aspect * 1.25),
        area_for_downscale=area,
    )
    return A.Compose([*flips, zoomed, *colour])


def crop_window(
    classes: np.ndarray,
    side: float,
    rng: np.random.Generator,
    focus: float = 0.0,
    class_weights: Sequence[float] = (),
) -> tuple[slice, slice]:
    """A square window of about ``side`` pixels (scale-jittered by ``CROP_SCALE_JITTER``) of an
    image whose class map is ``classes``, as (rows, cols).

    With probability ``focus`` the window holds a random pixel of a class drawn among the cell
    classes present with ``class_weights`` (indexed by class id): nnU-Net's foreground
    oversampling, so the rare classes are seen often enough to be learnt. Otherwise it lies
    anywhere, uniformly.
    """
    height, width = classes.shape
    side = int(
        min(height, width, round(side * rng.uniform(1 / CROP_SCALE_JITTER, CROP_SCALE_JITTER)))
    )
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    present = np.flatnonzero(np.bincount(classes.ravel()))  # np.unique sorts: 5x slower
    present = present[present > 0]
    if len(present) and rng.random() < focus:
        weights = np.asarray(class_weights, np.float64)[present]
        cls = rng.choice(present, p=weights / weights.sum())
        ys, xs = np.nonzero(classes == cls)
        k = rng.integers(len(ys))
        # the chosen pixel lands anywhere in the window, so focused cells are not always central
        top = int(np.clip(ys[k] - rng.integers(0, side), 0, height - side))
        left = int(np.clip(xs[k] - rng.integers(0, side), 0, width - side))
    return slice(top, top + side), slice(left, left + side)
