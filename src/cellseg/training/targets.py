"""Training targets computed from an instance map (after augmentation, at load time)."""

from __future__ import annotations

import numpy as np


def hv_maps(instance: np.ndarray) -> np.ndarray:
    """HoVer-Net horizontal and vertical distance maps, shape ``(2, H, W)``, float32.

    For each instance, a pixel's offset from the instance centroid along x (channel 0) and y
    (channel 1), scaled separately on each side so the most negative offset is -1 and the most
    positive is +1 (HoVer-Net ``gen_targets``). Background is 0.
    """
    h, w = instance.shape
    labels = instance.ravel().astype(np.int64)
    n = int(labels.max()) + 1
    out = np.zeros((2, h * w), np.float32)
    if n == 1:
        return out.reshape(2, h, w)
    fg = labels > 0
    lab = labels[fg]
    count = np.bincount(lab, minlength=n).astype(np.float64)
    count[count == 0] = 1
    yy, xx = np.divmod(np.flatnonzero(fg), w)
    for channel, coord in enumerate((xx, yy)):
        centre = np.bincount(lab, weights=coord, minlength=n) / count
        offset = coord - centre[lab]
        low = np.zeros(n)
        high = np.zeros(n)
        np.minimum.at(low, lab, offset)
        np.maximum.at(high, lab, offset)
        scale = np.where(offset < 0, -low[lab], high[lab])
        out[channel, fg] = np.divide(offset, scale, out=np.zeros_like(offset), where=scale > 0)
    return out.reshape(2, h, w)
