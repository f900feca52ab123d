"""Augmentation (albumentations): geometry on image and masks alike, colour on the image only.

Masks (instance, class, ignore) are resampled nearest-neighbour; HV maps are not augmented but
recomputed from the augmented instance map (``cellseg.training.targets.hv_maps``).
"""

from __future__ import annotations


def build_transform(image_size: tuple[int, int], augment: bool):
    """An ``albumentations.Compose`` producing ``image_size`` (H, W) images.

    Args:
        augment: random flips, 90° rotations, scale/crop and colour/stain jitter; otherwise a
            plain resize (validation, evaluation).
    """
    import albumentations as A  # only the training and evaluation images need it

    h, w = image_size
    if not augment:
        return A.Compose([A.Resize(h, w)])
    aspect = w / h
    return A.Compose(
        [
            A.RandomRotate90(),
            A.HorizontalFlip(),
            A.VerticalFlip(),
            A.RandomResizedCrop(
                size=(h, w), scale=(0.35, 1.0), ratio=(aspect * 0.8, aspect * 1.25)
            ),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, p=0.8),
            A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=8, p=0.5),
        ]
    )
