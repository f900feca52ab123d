"""Pictures a person can judge: instance outlines coloured by class over the image."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import find_boundaries

CLASS_COLOURS = {1: (255, 60, 60), 2: (60, 120, 255), 3: (255, 200, 0)}  # RBC, WBC, Platelets
VOID_COLOUR = (40, 40, 40)


def draw_overlay(
    image: np.ndarray,
    instance: np.ndarray,
    classes: np.ndarray,
    void: np.ndarray | None = None,
) -> np.ndarray:
    """RGB uint8 picture: outlines coloured by class; the void region hatched."""
    out = image[..., :3].copy()
    if void is not None:
        yy, xx = np.indices(void.shape)
        out[void & ((xx + yy) % 8 < 2)] = VOID_COLOUR
    edges = find_boundaries(instance, mode="inner")
    for label, colour in CLASS_COLOURS.items():
        out[edges & (classes == label)] = colour
    return out
