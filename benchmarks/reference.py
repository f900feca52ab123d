"""Plain implementations the library's fast ones are measured against (``make bench``) and
checked against (``tests/unit/test_postprocess.py``)."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import watershed

from cellseg.evaluation.postprocess import Instances


def plain_watershed(distance: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``skimage``'s watershed as it is: what ``grow_markers`` must equal, faster."""
    return watershed(distance, markers=markers, mask=mask)


def classify_instances_reference(
    labels: np.ndarray, np_prob: np.ndarray, nc_prob: np.ndarray
) -> Instances:
    """What ``classify_instances`` computes, one mask per instance."""
    n = int(labels.max())
    probs, scores = np.zeros((n, nc_prob.shape[0])), np.zeros(n, np.float32)
    classes = np.ones(n, np.int64)
    for i in range(1, n + 1):
        mask = labels == i
        if not mask.any():
            continue
        probs[i - 1] = nc_prob[:, mask].mean(1)
        cls = 1 + int(probs[i - 1, 1:].argmax())
        classes[i - 1] = cls
        scores[i - 1] = (
            np_prob[mask].mean() * probs[i - 1, cls] / max(probs[i - 1, 1:].sum(), 1e-12)
        )
    return Instances(labels, classes, scores, probs)
