"""Instance-segmentation metrics on label maps (HoVer-Net ``stats_utils``) and COCO mAP
(pycocotools: never re-implemented here).

Matching: a prediction and a ground-truth instance match when their IoU exceeds 0.5, which makes
the pairing unique (no Hungarian step needed). *Void-aware* variants do not count an unmatched
prediction as a false positive when most of it lies in the void region (cells no box covers).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy as np

from cellseg.classes import CLASS_NAMES, NUM_CLASSES


def pairwise_iou(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU matrix (n_gt, n_pred) between the instances of two label maps, and their ids."""
    gt_ids = np.unique(gt[gt > 0])
    pred_ids = np.unique(pred[pred > 0])
    if not len(gt_ids) or not len(pred_ids):
        return np.zeros((len(gt_ids), len(pred_ids))), gt_ids, pred_ids
    g = np.searchsorted(gt_ids, gt.ravel()) + 1
    g[gt.ravel() == 0] = 0
    p = np.searchsorted(pred_ids, pred.ravel()) + 1
    p[pred.ravel() == 0] = 0
    inter = np.bincount(
        g * (len(pred_ids) + 1) + p, minlength=(len(gt_ids) + 1) * (len(pred_ids) + 1)
    )
    inter = inter.reshape(len(gt_ids) + 1, len(pred_ids) + 1)[1:, 1:].astype(np.float64)
    area_g = np.bincount(g, minlength=len(gt_ids) + 1)[1:, None]
    area_p = np.bincount(p, minlength=len(pred_ids) + 1)[None, 1:]
    return inter / (area_g + area_p - inter), gt_ids, pred_ids


@dataclass
class MatchStats:
    """Counts that add up over images: true/false positives, misses, summed IoU of matches."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def __iadd__(self, other: MatchStats) -> MatchStats:
        self.tp, self.fp, self.fn = self.tp + other.tp, self.fp + other.fp, self.fn + other.fn
        self.iou_sum += other.iou_sum
        return self

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 1.0

    @property
    def sq(self) -> float:
        return self.iou_sum / self.tp if self.tp else 0.0

    @property
    def rq(self) -> float:
        return self.f1

    @property
    def pq(self) -> float:
        return self.sq * self.rq

    def as_dict(self) -> dict[str, float]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "sq": self.sq,
            "rq": self.rq,
            "pq": self.pq,
        }


def match(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> MatchStats:
    """Match instances at IoU > 0.5. With ``void``, unmatched predictions lying mostly in the
    void region are dropped rather than counted as false positives."""
    iou, gt_ids, pred_ids = pairwise_iou(gt, pred)
    matched = iou > 0.5
    tp = int(matched.sum())
    unmatched_pred = pred_ids[~matched.any(0)] if len(gt_ids) else pred_ids
    fp = len(unmatched_pred)
    if void is not None and fp:
        in_void = np.bincount(pred[void].ravel(), minlength=int(pred.max()) + 1)
        area = np.bincount(pred.ravel(), minlength=int(pred.max()) + 1)
        fp = int(np.sum(in_void[unmatched_pred] <= 0.5 * area[unmatched_pred]))
    return MatchStats(tp, fp, len(gt_ids) - int(matched.any(1).sum()), float(iou[matched].sum()))


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017), as HoVer-Net's ``get_fast_aji``."""
    iou, gt_ids, pred_ids = pairwise_iou(gt, pred)
    if not len(gt_ids):
        return 1.0 if not len(pred_ids) else 0.0
    _, g_areas = np.unique(gt[gt > 0], return_counts=True)
    _, p_areas = np.unique(pred[pred > 0], return_counts=True)
    inter_total, union_total = 0.0, 0.0
    used = np.zeros(len(pred_ids), bool)
    for i in range(len(gt_ids)):
        if len(pred_ids) and iou[i].max() > 0:
            j = int(iou[i].argmax())
            inter = iou[i, j] * (g_areas[i] + p_areas[j]) / (1 + iou[i, j])
            inter_total += inter
            union_total += g_areas[i] + p_areas[j] - inter
            used[j] = True
        else:
            union_total += g_areas[i]
    union_total += p_areas[~used].sum() if len(pred_ids) else 0
    return inter_total / union_total if union_total else 1.0


def relabel_by_class(labels: np.ndarray, classes: np.ndarray, cls: int) -> np.ndarray:
    """Keep only the instances whose class (indexed by id - 1) is ``cls``."""
    lut = np.zeros(int(labels.max()) + 1, labels.dtype)
    keep = np.flatnonzero(np.asarray(classes) == cls) + 1
    lut[keep] = keep
    return lut[labels]


@dataclass
class SemanticStats:
    """Pixel counts per class (0..3) for IoU and Dice."""

    inter: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES))
    pred: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES))
    gt: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES))

    def add(self, gt_classes: np.ndarray, pred_classes: np.ndarray, valid: np.ndarray) -> None:
        g, p = gt_classes[valid], pred_classes[valid]
        self.inter += np.bincount(g[g == p], minlength=NUM_CLASSES)[:NUM_CLASSES]
        self.pred += np.bincount(p, minlength=NUM_CLASSES)[:NUM_CLASSES]
        self.gt += np.bincount(g, minlength=NUM_CLASSES)[:NUM_CLASSES]

    def as_dict(self) -> dict[str, dict[str, float]]:
        union = self.pred + self.gt - self.inter
        out = {}
        for c, name in enumerate(CLASS_NAMES, start=1):
            out[name] = {
                "iou": float(self.inter[c] / union[c]) if union[c] else 0.0,
                "dice": float(2 * self.inter[c] / (self.pred[c] + self.gt[c]))
                if self.pred[c] + self.gt[c]
                else 0.0,
            }
        return out


def coco_map(ground_truth: dict, results: list[dict], iou_type: str) -> dict:
    """pycocotools COCOeval: mAP@[.5:.95], mAP@.5, per-class AP@.5 and the PR curves at .5."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = ground_truth
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    if not results:
        zero = {name: 0.0 for name in CLASS_NAMES}
        return {"map": 0.0, "map50": 0.0, "ap50_per_class": zero, "pr50": {}}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # (iou, recall, class, area, maxdet)
    cat_ids = ev.params.catIds

    def ap(p: np.ndarray) -> float:
        p = p[p > -1]
        return float(p.mean()) if p.size else 0.0

    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    return {
        "map": ap(precision[:, :, :, 0, -1]),
        "map50": ap(precision[0, :, :, 0, -1]),
        "ap50_per_class": {names[c]: ap(precision[0, :, k, 0, -1]) for k, c in enumerate(cat_ids)},
        "pr50": {names[c]: precision[0, :, k, 0, -1].tolist() for k, c in enumerate(cat_ids)},
    }
