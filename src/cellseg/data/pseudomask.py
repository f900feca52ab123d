"""Instance masks from boxes: colour segmentation inside each box, ellipse fallback.

Stained cells are more saturated than the plasma around them, so one Otsu threshold on HSV
saturation per image separates "looks like a cell" from background. Inside each box we fill the
pale centres of red cells, split touching cells apart with a small opening, keep the component
that best matches the box's inscribed ellipse and take its convex hull. A result covering too
little or too much of the box is implausible and replaced by the ellipse itself.

Overlaps: boxes are painted largest first. A box much smaller than the cell under it (area ratio
above ``overlap_area_ratio``, e.g. a platelet on a white cell) lies on top and takes its pixels.
Between boxes of similar size (touching red cells) a pixel goes to the cell whose box centre is
nearer in box-normalised distance ((dx / half-width)^2 + (dy / half-height)^2); on equal
distance the smaller box, then the later one in the annotation, wins. Each
instance then keeps only its largest connected piece.

Void: every stained pixel no instance took (an unannotated cell, the part of a cell under
another box, a speck, a stained rim just outside a mask) is *void*: no loss term or metric
counts it as background, since nobody can tell what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image, disk

from cellseg.data.voc import Box


@dataclass(frozen=True)
class MaskParams:
    """Conversion parameters; recorded in the dataset's manifest."""

    min_box_share: float = 0.35  # below this share of its box, a mask is implausible
    max_box_share: float = 0.97  # above it, the mask leaked into neighbours or background
    opening_radius: int = 2
    min_mask_area: int = 16  # pixels: a smaller pseudo-mask is dropped
    min_box_side: int = 4
    duplicate_iou: float = 0.9
    overlap_area_ratio: float = 2.0  # a box this many times smaller lies on top of the other


@dataclass
class MaskCounts:
    colour: int = 0
    ellipse_fallback: int = 0
    dropped_occluded: int = 0


def saturation(image: np.ndarray) -> np.ndarray:
    """HSV saturation of an RGB uint8 image, as float32 in [0, 1]."""
    rgb = image.astype(np.float32)
    vmax = rgb.max(axis=2)
    vmin = rgb.min(axis=2)
    return np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1), 0).astype(np.float32)


def cell_likeness(image: np.ndarray) -> np.ndarray:
    """Boolean map of pixels that look like stained cells (holes filled)."""
    sat = ndi.gaussian_filter(saturation(image), sigma=1.0)
    # A strongly stained white-cell nucleus would pull a plain Otsu threshold above the red
    # cells; clipping the top decile makes the nucleus count as "a cell", not as its own mode.
    fg = sat > threshold_otsu(np.minimum(sat, np.percentile(sat, 90)))
    return ndi.binary_fill_holes(fg)


def ellipse_mask(h: int, w: int) -> np.ndarray:
    """The ellipse inscribed in an ``h`` x ``w`` box."""
    yy, xx = np.mgrid[0:h, 0:w]
    ry, rx = h / 2, w / 2
    return ((yy + 0.5 - ry) / ry) ** 2 + ((xx + 0.5 - rx) / rx) ** 2 <= 1.0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def mask_in_box(fg: np.ndarray, box: Box, params: MaskParams) -> tuple[np.ndarray, bool]:
    """The cell's mask inside ``box`` (box-sized crop) and whether the colour result was used."""
    crop = fg[box.y0 : box.y1, box.x0 : box.x1]
    ellipse = ellipse_mask(box.height, box.width)
    mask = ndi.binary_fill_holes(crop)
    if params.opening_radius and min(crop.shape) > 4 * params.opening_radius:
        mask = ndi.binary_opening(mask, disk(params.opening_radius))
    labels, n = ndi.label(mask)
    if n:
        scores = [_iou(labels == i, ellipse) for i in range(1, n + 1)]
        best = labels == (1 + int(np.argmax(scores)))
        share = best.sum() / ellipse.size
        if params.min_box_share <= share <= params.max_box_share:
            # Red cells are convex; their pale centres and ragged stain edges are not cell gaps.
            return convex_hull_image(best), True
    return ellipse, False


def instances_from_boxes(
    image: np.ndarray, boxes: list[Box], params: MaskParams, counts: MaskCounts
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Box]]:
    """Instance map (uint16, 1..n), class map (uint8), void mask (bool) and the kept boxes.

    Instance ids follow the order of ``boxes``; a box whose cell is fully taken by others is
    dropped and counted, so ids stay consecutive and instance ``i`` belongs to ``kept[i - 1]``.
    """
    h, w = image.shape[:2]
    fg = cell_likeness(image)
    owner = np.zeros((h, w), np.int32)  # index into boxes + 1
    best = np.full((h, w), np.inf, np.float32)
    owner_area = np.zeros((h, w), np.int64)
    order = sorted(range(len(boxes)), key=lambda i: (-boxes[i].area, i))
    for i in order:
        box = boxes[i]
        mask, from_colour = mask_in_box(fg, box, params)
        counts.colour += from_colour
        counts.ellipse_fallback += not from_colour
        yy, xx = np.mgrid[box.y0 : box.y1, box.x0 : box.x1]
        cy, cx = (box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2
        dist = ((yy + 0.5 - cy) / (box.height / 2)) ** 2 + ((xx + 0.5 - cx) / (box.width / 2)) ** 2
        region = (slice(box.y0, box.y1), slice(box.x0, box.x1))
        on_top = owner_area[region] > params.overlap_area_ratio * box.area
        wins = mask & (on_top | (dist <= best[region]))
        best[region][wins] = dist[wins]
        owner[region][wins] = i + 1
        owner_area[region][wins] = box.area

    instance = np.zeros((h, w), np.uint16)
    classes = np.zeros((h, w), np.uint8)
    kept: list[Box] = []
    for i, box in enumerate(boxes):
        region = (slice(box.y0, box.y1), slice(box.x0, box.x1))
        mine = owner[region] == i + 1
        labels, n = ndi.label(mine)
        if n > 1:
            sizes = np.bincount(labels.ravel())[1:]
            mine = labels == 1 + int(np.argmax(sizes))
        if mine.sum() < params.min_mask_area:
            counts.dropped_occluded += 1
            continue
        kept.append(box)
        instance[region][mine] = len(kept)
        classes[region][mine] = box.label

    # stained pixels that no instance holds: unknown, not background
    void = fg & (instance == 0)
    return instance, classes, void, kept
