"""Network outputs -> classified instances: HoVer-Net's marker-controlled watershed.

Follows HoVer-Net ``process_np_hv``: the NP probability gives the foreground; Sobel filters of the
normalised HV maps are large on boundaries between cells; foreground minus boundaries gives one
marker per cell; a watershed on the smoothed "distance" grows the markers back to the foreground.

Two rules for the markers (``PostprocessParams.markers``):

- ``sobel``, HoVer-Net's: Sobel energy below ``boundary_threshold``. The energy is min-max
  normalised per image, so a large cell's gentle slopes land near the threshold and a softly
  predicted white cell falls apart while red cells still merge: the threshold trades one class
  against the other.
- ``slope``: where both HV maps rise (dh/dx > 0 and dv/dy > 0, after a 2-pixel Gaussian that
  removes the decoder's upsampling checkerboard). Inside a cell its maps run from -1 to +1;
  across any edge, to another cell or to the background, they fall: a sign, not a magnitude, so
  one rule fits cells of every size and needs no threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from skimage.segmentation import watershed

from cellseg.classes import CLASS_IDS
from cellseg.model.postprocess_params import PostprocessParams

DEFAULTS = PostprocessParams()  # HoVer-Net's settings


@dataclass
class Instances:
    """One image's result: ``labels`` (H, W) int32 with ids 1..n and, per id (index id - 1),
    ``classes`` (1..3), ``scores`` in [0, 1] and ``class_probs`` (n, 4), the mean softmax."""

    labels: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    class_probs: np.ndarray

    def class_map(self) -> np.ndarray:
        lut = np.concatenate([[0], self.classes]).astype(np.uint8)
        return lut[self.labels]


def _normalise(x: np.ndarray) -> np.ndarray:
    """Min-max scaling to [0, 1] (float32)."""
    return cv2.normalize(x.astype(np.float32), None, 0.0, 1.0, cv2.NORM_MINMAX)


def _components(mask: np.ndarray, min_area: int) -> np.ndarray:
    """4-connected components of ``mask`` (int32 labels), those under ``min_area`` removed."""
    _, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    return _remove_small(labels, min_area)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the border (a fast ``binary_fill_holes``)."""
    flood = cv2.copyMakeBorder(mask.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(flood, None, (0, 0), 1)  # the outside; what stays 0 is a hole
    return mask | (flood[1:-1, 1:-1] == 0)


def _remove_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    sizes = np.bincount(labels.ravel())
    small = sizes < min_area
    small[0] = False
    labels = labels.copy()
    labels[small[labels]] = 0
    return labels


def grow_markers(distance: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.watershed(distance, markers, mask=mask)``, about 3x faster.

    A marker pixel whose four neighbours carry the same marker can never change and never
    reaches an unlabelled pixel, so it stays out of the flooding: only each marker's outer ring
    enters the priority queue. The result is the same labelling (checked in the tests).
    """
    c = markers[1:-1, 1:-1]
    interior = np.zeros(markers.shape, bool)
    interior[1:-1, 1:-1] = (
        (c > 0)
        & (markers[:-2, 1:-1] == c)
        & (markers[2:, 1:-1] == c)
        & (markers[1:-1, :-2] == c)
        & (markers[1:-1, 2:] == c)
    )
    labels = watershed(distance, markers=np.where(interior, 0, markers), mask=mask & ~interior)
    labels[interior] = markers[interior]
    return labels


def watershed_instances(
    np_prob: np.ndarray,
    hv: np.ndarray,
    params: PostprocessParams = DEFAULTS,
    grow=grow_markers,
) -> np.ndarray:
    """Instance labels (int32, 1..n) from the cell probability (H, W) and HV maps (2, H, W).

    Args:
        grow: the watershed (:func:`grow_markers`; ``benchmarks.reference`` has the plain one).
    """
    fg = _components(np_prob >= params.np_threshold, params.min_instance_area) > 0
    if not fg.any():
        return np.zeros(np_prob.shape, np.int32)
    sobel_h = 1 - _normalise(
        cv2.Sobel(_normalise(hv[0]), cv2.CV_32F, 1, 0, ksize=params.sobel_ksize)
    )
    sobel_v = 1 - _normalise(
        cv2.Sobel(_normalise(hv[1]), cv2.CV_32F, 0, 1, ksize=params.sobel_ksize)
    )
    boundary = np.maximum(sobel_h, sobel_v)
    boundary[~fg] = 0
    distance = -cv2.GaussianBlur(((1.0 - boundary) * fg).astype(np.float64), (3, 3), 0)
    if params.markers == "slope":
        markers = fg & rising(hv, params.slope_sigma)
    else:
        markers = fg & (boundary < params.boundary_threshold)
    markers = fill_holes(markers)
    markers = cv2.morphologyEx(
        markers.astype(np.uint8),
        cv2.MORPH_OPEN,
        cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)),
    )
    markers = _components(markers, params.min_marker_area)
    labels = grow(distance, markers, fg)
    if params.keep_markerless:
        # the watershed floods each region that holds a marker (4-connected, as here), so what
        # stays unlabelled is exactly the marker-less regions
        orphans = _components(fg & (labels == 0), params.min_instance_area)
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    return _consecutive(_remove_small(labels, params.min_instance_area))


def _consecutive(labels: np.ndarray) -> np.ndarray:
    """The same instances with ids 1..n."""
    ids = np.flatnonzero(np.bincount(labels.ravel()))
    lut = np.zeros(int(ids.max()) + 1, np.int32)
    lut[ids] = np.arange(len(ids))
    return lut[labels]


def merge_touching(labels: np.ndarray, classes: np.ndarray, merge: list[int]) -> np.ndarray:
    """One instance for each group of touching instances whose class is in ``merge``.

    Args:
        labels: (H, W) ids 1..n; ``classes``: the class of each id (index id - 1).
    """
    selected = np.concatenate([[False], np.isin(classes, merge)])[labels]
    if not selected.any():
        return labels
    _, groups = cv2.connectedComponents(selected.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    merged = labels.copy()
    merged[selected] = groups[selected] + labels.max()
    return _consecutive(merged)


def rising(hv: np.ndarray, sigma: float) -> np.ndarray:
    """Where the horizontal map rises along x and the vertical map along y (both smoothed)."""
    h, v = (cv2.GaussianBlur(c.astype(np.float32), (0, 0), sigma) for c in hv)
    return (cv2.Sobel(h, cv2.CV_32F, 1, 0, ksize=3) > 0) & (
        cv2.Sobel(v, cv2.CV_32F, 0, 1, ksize=3) > 0
    )


def classify_instances(labels: np.ndarray, np_prob: np.ndarray, nc_prob: np.ndarray) -> Instances:
    """Class of each instance = the highest non-background class of its pixels' mean softmax.

    Never a default class: an instance whose mean is mostly background still gets its most
    likely cell class, and its score (mean NP probability x that class's share of the
    non-background mass) says how sure that is.

    Args:
        labels: (H, W) ids 1..n.
        np_prob: (H, W) probability of "cell".
        nc_prob: (4, H, W) class softmax.
    """
    n = int(labels.max())
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    counts[counts == 0] = 1
    probs = (
        np.stack(
            [np.bincount(flat, weights=c.ravel(), minlength=n + 1)[1:] for c in nc_prob], axis=1
        )
        / counts[:, None]
    )
    fg_mean = np.bincount(flat, weights=np_prob.ravel(), minlength=n + 1)[1:] / counts
    classes = 1 + probs[:, 1:].argmax(1) if n else np.zeros(0, np.int64)
    cell_mass = probs[:, 1:].sum(1).clip(1e-12)
    share = probs[np.arange(n), classes] / cell_mass if n else np.zeros(0)
    return Instances(labels, classes.astype(np.int64), (fg_mean * share).astype(np.float32), probs)


def postprocess(
    np_prob: np.ndarray,
    hv: np.ndarray,
    nc_prob: np.ndarray,
    params: PostprocessParams = DEFAULTS,
) -> Instances:
    """Watershed, then mean-softmax classification (again after merging touching instances of
    the ``merge_touching`` classes); border instances' scores scaled."""
    labels = watershed_instances(np_prob, hv, params)
    inst = classify_instances(labels, np_prob, nc_prob)
    if params.merge_touching:
        merge = [CLASS_IDS[name] for name in params.merge_touching]
        labels = merge_touching(labels, inst.classes, merge)
        inst = classify_instances(labels, np_prob, nc_prob)
    if params.border_score != 1.0 and len(inst.scores):
        inst.scores = np.where(
            touches_border(labels), inst.scores * params.border_score, inst.scores
        ).astype(np.float32)
    return inst


def touches_border(labels: np.ndarray) -> np.ndarray:
    """For each instance id 1..n (index id - 1), whether it has a pixel on the image's edge."""
    n = int(labels.max())
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return np.isin(np.arange(1, n + 1), edge)
