"""Evaluation on a split: metrics.json, a Markdown report, confusion matrix, PR curves, overlays.

Every figure is computed twice where it differs: *strict* (every unmatched prediction is a false
positive) and *void-aware* (predictions lying in the void region of unannotated cells are not
counted against the model; for COCO mAP the void region enters as ``iscrowd`` ground truth, which
COCOeval ignores matches to).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cellseg.arrays import load_sample
from cellseg.atomic import staged_dir
from cellseg.coco import encode_rle
from cellseg.metrics import (
    MatchStats,
    SemanticStats,
    aji,
    coco_map,
    match,
    pairwise_iou,
    relabel_by_class,
)
from cellseg.postprocess import Instances
from cellseg.voc import CLASS_NAMES

MISSED, EXTRA = "missed", "extra"


def instance_classes(instance: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Class of each ground-truth instance id (index id - 1): its pixels' majority class."""
    n = int(instance.max())
    table = np.zeros((n + 1, 4), np.int64)
    np.add.at(table, (instance.ravel(), classes.ravel()), 1)
    return table[1:].argmax(1)


def coco_results(image_id: int, inst: Instances) -> list[dict]:
    """COCO results entries (RLE masks, mask boxes, scores) for one image's instances."""
    from pycocotools import mask as mask_utils

    out = []
    for i in np.unique(inst.labels[inst.labels > 0]):
        rle = encode_rle(inst.labels == i)
        box = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
        out.append(
            {
                "image_id": image_id,
                "category_id": int(inst.classes[i - 1]),
                "segmentation": rle,
                "bbox": [float(v) for v in box],
                "score": float(inst.scores[i - 1]),
            }
        )
    return out


def void_crowd_annotations(image_id: int, void: np.ndarray, start_id: int) -> list[dict]:
    """The void region as one ``iscrowd`` annotation per category (COCOeval ignores matches)."""
    if not void.any():
        return []
    rle = encode_rle(void)
    ys, xs = np.nonzero(void)
    box = [
        float(xs.min()),
        float(ys.min()),
        float(xs.max() - xs.min() + 1),
        float(ys.max() - ys.min() + 1),
    ]
    return [
        {
            "id": start_id + k,
            "image_id": image_id,
            "category_id": k + 1,
            "segmentation": rle,
            "area": int(void.sum()),
            "bbox": box,
            "iscrowd": 1,
        }
        for k in range(len(CLASS_NAMES))
    ]


@dataclass
class Accumulator:
    """Everything that adds up over images, for one variant (strict or void-aware)."""

    overall: MatchStats = field(default_factory=MatchStats)
    per_class: dict[str, MatchStats] = field(
        default_factory=lambda: {n: MatchStats() for n in CLASS_NAMES}
    )
    semantic: SemanticStats = field(default_factory=SemanticStats)
    bpq: list[float] = field(default_factory=list)
    mpq: list[float] = field(default_factory=list)

    def add(self, gt, gt_cls, gt_cmap, inst: Instances, void) -> float:
        pred_cmap = inst.class_map()
        image = match(gt, inst.labels, void)
        self.overall += image
        self.bpq.append(image.pq)
        class_pqs = []
        for c, name in enumerate(CLASS_NAMES, start=1):
            g = relabel_by_class(gt, gt_cls, c)
            p = relabel_by_class(inst.labels, inst.classes, c)
            stats = match(g, p, void)
            self.per_class[name] += stats
            if g.any() or p.any():  # PanNuke mPQ: classes absent from both are skipped
                class_pqs.append(stats.pq)
        self.mpq.append(float(np.mean(class_pqs)) if class_pqs else 1.0)
        valid = np.ones_like(gt, bool) if void is None else ~void
        self.semantic.add(gt_cmap, pred_cmap, valid)
        return image.pq

    def summary(self) -> dict:
        semantic = self.semantic.as_dict()
        return {
            **{k: v for k, v in self.overall.as_dict().items()},
            "bpq": float(np.mean(self.bpq)) if self.bpq else 0.0,
            "mpq": float(np.mean(self.mpq)) if self.mpq else 0.0,
            "per_class": {
                name: {**self.per_class[name].as_dict(), **semantic[name]} for name in CLASS_NAMES
            },
        }


def confusion_update(matrix: np.ndarray, gt, gt_cls, inst: Instances) -> None:
    """Rows: true class (RBC, WBC, Platelets, extra); columns: predicted (..., missed)."""
    iou, gt_ids, pred_ids = pairwise_iou(gt, inst.labels)
    matched = iou > 0.5
    for i, g in enumerate(gt_ids):
        j = np.flatnonzero(matched[i])
        col = int(inst.classes[pred_ids[j[0]] - 1]) - 1 if len(j) else 3
        matrix[int(gt_cls[g - 1]) - 1, col] += 1
    for j, p in enumerate(pred_ids):
        if not matched[:, j].any():
            matrix[3, int(inst.classes[p - 1]) - 1] += 1


def evaluate(
    data: Path,
    model_ref: str,
    out: Path,
    split: str = "test",
    device: str = "cpu",
    limit: int = 0,
    overlays: int = 3,
) -> dict:
    """Evaluate the model at ``model_ref`` on ``split`` of the converted dataset ``data``."""
    from cellseg.model_store import load_predictor

    predictor = load_predictor(model_ref, device)
    return evaluate_predictor(data, predictor, out, split, limit, overlays, str(model_ref))


def evaluate_predictor(
    data: Path,
    predictor,
    out: Path,
    split: str = "test",
    limit: int = 0,
    overlays: int = 3,
    model_name: str = "",
) -> dict:
    """Evaluate any ``predictor`` (RGB image -> :class:`Instances`); the report goes to ``out``."""
    data, out = Path(data), Path(out)
    gt_doc = json.loads((data / "coco" / f"{split}.json").read_text())
    images = sorted(gt_doc["images"], key=lambda im: im["id"])[: limit or None]
    image_ids = {im["id"] for im in images}
    gt_doc["images"] = images
    gt_doc["annotations"] = [a for a in gt_doc["annotations"] if a["image_id"] in image_ids]

    strict, void_aware = Accumulator(), Accumulator()
    confusion = np.zeros((4, 4), np.int64)
    results, crowd, per_image = [], [], []
    aji_values = []
    next_crowd_id = 1 + max((a["id"] for a in gt_doc["annotations"]), default=0)
    for im in tqdm(images, desc=f"evaluate {split}", unit="img", file=sys.stderr):
        stem = Path(im["file_name"]).stem
        sample = load_sample(data, stem)
        gt = sample["instance"].astype(np.int32)
        gt_cls = instance_classes(gt, sample["classes"])
        void = sample["ignore"]
        inst = predictor(sample["image"])
        pq = strict.add(gt, gt_cls, sample["classes"], inst, None)
        void_aware.add(gt, gt_cls, sample["classes"], inst, void)
        aji_values.append(aji(gt, inst.labels))
        confusion_update(confusion, gt, gt_cls, inst)
        results += coco_results(im["id"], inst)
        crowd += void_crowd_annotations(im["id"], void, next_crowd_id + len(crowd))
        per_image.append((pq, stem, inst))

    void_doc = {**gt_doc, "annotations": gt_doc["annotations"] + crowd}
    box, box_void = coco_map(gt_doc, results, "bbox"), coco_map(void_doc, results, "bbox")
    mask, mask_void = coco_map(gt_doc, results, "segm"), coco_map(void_doc, results, "segm")
    metrics = {
        "split": split,
        "images": len(images),
        "model": model_name,
        **strict.summary(),
        "aji": float(np.mean(aji_values)) if aji_values else 0.0,
        "box_map50": box["map50"],
        "box_map": box["map"],
        "mask_map50": mask["map50"],
        "mask_map": mask["map"],
        "void_aware": {
            **void_aware.summary(),
            "box_map50": box_void["map50"],
            "mask_map50": mask_void["map50"],
            "mask_map": mask_void["map"],
        },
        "confusion": {
            "rows": [*CLASS_NAMES, EXTRA],
            "cols": [*CLASS_NAMES, MISSED],
            "counts": confusion.tolist(),
        },
    }
    for name in CLASS_NAMES:
        metrics["per_class"][name]["box_ap50"] = box["ap50_per_class"][name]
        metrics["per_class"][name]["mask_ap50"] = mask["ap50_per_class"][name]
        metrics["void_aware"]["per_class"][name]["box_ap50"] = box_void["ap50_per_class"][name]

    from cellseg.report import write_report

    with staged_dir(out) as work:
        (work / "overlays").mkdir()
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (work / "results.json").write_text(json.dumps(results))
        write_report(work, metrics, box["pr50"], data, per_image, overlays)
    return metrics
