"""Evaluation on a split: metrics.json, a Markdown report, confusion matrix, PR curves, overlays.

Every figure is computed twice where it differs: *strict* (every unmatched prediction is a false
positive) and *void-aware* (predictions lying in the void region of unannotated cells are not
counted against the model; for COCO mAP each connected void region enters as one ``iscrowd``
ground truth with its own box, and COCOeval ignores the detections it matches, so a detection
away from every void region still counts as a false positive).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from cellseg.atomic import staged_dir
from cellseg.classes import CLASS_NAMES, NUM_CLASSES
from cellseg.data.arrays import load_sample
from cellseg.data.coco import coco_results, encode_rle
from cellseg.data.manifest import read_manifest
from cellseg.evaluation.metrics import (
    MatchStats,
    SemanticStats,
    aji,
    coco_map,
    match,
    pairwise_iou,
    relabel_by_class,
)
from cellseg.evaluation.postprocess import Instances

MISSED, EXTRA = "missed", "extra"


def instance_classes(instance: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Class of each ground-truth instance id (index id - 1): its pixels' majority class."""
    n = int(instance.max())
    table = np.zeros((n + 1, NUM_CLASSES), np.int64)
    np.add.at(table, (instance.ravel(), classes.ravel()), 1)
    return table[1:].argmax(1)


def void_crowd_annotations(image_id: int, void: np.ndarray, start_id: int) -> list[dict]:
    """Each connected void region (8-connected) as one ``iscrowd`` annotation per category,
    with the region's own mask and bounding box.

    COCOeval ignores a detection that matches a crowd annotation (box IoU computed against the
    crowd's area), so one box around *all* void pixels, which often spans the frame, would
    hide every false positive; a box per region hides only detections on that region.
    """
    labels, _ = ndi.label(void, structure=np.ones((3, 3), bool))
    found = []
    for region_id, (rows, cols) in enumerate(ndi.find_objects(labels), start=1):
        region = labels == region_id
        rle = encode_rle(region)
        box = [
            float(cols.start),
            float(rows.start),
            float(cols.stop - cols.start),
            float(rows.stop - rows.start),
        ]
        for k in range(len(CLASS_NAMES)):
            found.append(
                {
                    "id": start_id + len(found),
                    "image_id": image_id,
                    "category_id": k + 1,
                    "segmentation": rle,
                    "area": int(region.sum()),
                    "bbox": box,
                    "iscrowd": 1,
                }
            )
    return found


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
    """Rows: true class (RBC, WBC, Platelets, extra); columns: predicted (..., missed).

    The last row and column (index ``len(CLASS_NAMES)``) hold the unmatched instances."""
    unmatched = len(CLASS_NAMES)
    iou, gt_ids, pred_ids = pairwise_iou(gt, inst.labels)
    matched = iou > 0.5
    for i, g in enumerate(gt_ids):
        j = np.flatnonzero(matched[i])
        col = int(inst.classes[pred_ids[j[0]] - 1]) - 1 if len(j) else unmatched
        matrix[int(gt_cls[g - 1]) - 1, col] += 1
    for j, p in enumerate(pred_ids):
        if not matched[:, j].any():
            matrix[unmatched, int(inst.classes[p - 1]) - 1] += 1


@dataclass
class Scores:
    """What the per-image loop collects for the whole split."""

    strict: Accumulator = field(default_factory=Accumulator)
    void_aware: Accumulator = field(default_factory=Accumulator)
    confusion: np.ndarray = field(
        default_factory=lambda: np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    )
    aji: list[float] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)  # COCO results of every image
    crowd: list[dict] = field(default_factory=list)  # the void regions as iscrowd annotations
    per_image: list[tuple] = field(default_factory=list)  # (PQ, stem, instances) for overlays


def predict_chunks(data: Path, images: list[dict], predictor):
    """(image record, sample, instances) per image; a predictor with ``predict_batch`` gets
    ``batch_size`` images at a time, a plain callable one at a time."""
    batch = getattr(predictor, "batch_size", 1) if hasattr(predictor, "predict_batch") else 1
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        samples = [load_sample(data, Path(im["file_name"]).stem) for im in chunk]
        if batch > 1:
            found = predictor.predict_batch([s["image"] for s in samples])
        else:
            found = [predictor(s["image"]) for s in samples]
        yield from zip(chunk, samples, found, strict=True)


def score_images(data: Path, images: list[dict], predictor, first_crowd_id: int, desc: str):
    """Run ``predictor`` on the images and score each against the converted ground truth."""
    scores = Scores()
    chunks = predict_chunks(data, images, predictor)
    for im, sample, inst in tqdm(chunks, total=len(images), desc=desc, unit="img", file=sys.stderr):
        stem = Path(im["file_name"]).stem
        gt = sample["instance"].astype(np.int32)
        gt_cls = instance_classes(gt, sample["classes"])
        void = sample["ignore"]
        pq = scores.strict.add(gt, gt_cls, sample["classes"], inst, None)
        scores.void_aware.add(gt, gt_cls, sample["classes"], inst, void)
        scores.aji.append(aji(gt, inst.labels))
        confusion_update(scores.confusion, gt, gt_cls, inst)
        scores.results += coco_results(im["id"], inst)
        crowd_id = first_crowd_id + len(scores.crowd)
        scores.crowd += void_crowd_annotations(im["id"], void, crowd_id)
        scores.per_image.append((pq, stem, inst))
    return scores


def split_metrics(scores: Scores, gt_doc: dict) -> tuple[dict, dict]:
    """``metrics.json``'s content (without split, images, model) and the box PR curves."""
    void_doc = {**gt_doc, "annotations": gt_doc["annotations"] + scores.crowd}
    results = scores.results
    box, box_void = coco_map(gt_doc, results, "bbox"), coco_map(void_doc, results, "bbox")
    mask, mask_void = coco_map(gt_doc, results, "segm"), coco_map(void_doc, results, "segm")
    metrics = {
        **scores.strict.summary(),
        "aji": float(np.mean(scores.aji)) if scores.aji else 0.0,
        "box_map50": box["map50"],
        "box_map": box["map"],
        "mask_map50": mask["map50"],
        "mask_map": mask["map"],
        "void_aware": {
            **scores.void_aware.summary(),
            "box_map50": box_void["map50"],
            "mask_map50": mask_void["map50"],
            "mask_map": mask_void["map"],
        },
        "confusion": {
            "rows": [*CLASS_NAMES, EXTRA],
            "cols": [*CLASS_NAMES, MISSED],
            "counts": scores.confusion.tolist(),
        },
    }
    for name in CLASS_NAMES:
        metrics["per_class"][name]["box_ap50"] = box["ap50_per_class"][name]
        metrics["per_class"][name]["mask_ap50"] = mask["ap50_per_class"][name]
        metrics["void_aware"]["per_class"][name]["box_ap50"] = box_void["ap50_per_class"][name]
    return metrics, box["pr50"]


def evaluate(
    data: Path,
    predictor,
    out: Path,
    split: str = "test",
    limit: int = 0,
    overlays: int = 3,
    model_name: str = "",
) -> dict:
    """Evaluate ``predictor`` (RGB image -> :class:`Instances`) on ``split`` of the converted
    dataset ``data``; metrics, report and figures go to ``out``."""
    from cellseg.evaluation.report import write_report

    data, out = Path(data), Path(out)
    read_manifest(data)
    gt_doc = json.loads((data / "coco" / f"{split}.json").read_text())
    images = sorted(gt_doc["images"], key=lambda im: im["id"])[: limit or None]
    image_ids = {im["id"] for im in images}
    gt_doc["images"] = images
    gt_doc["annotations"] = [a for a in gt_doc["annotations"] if a["image_id"] in image_ids]
    first_crowd_id = 1 + max((a["id"] for a in gt_doc["annotations"]), default=0)
    scores = score_images(data, images, predictor, first_crowd_id, f"evaluate {split}")
    summary, pr50 = split_metrics(scores, gt_doc)
    metrics = {"split": split, "images": len(images), "model": model_name, **summary}
    if getattr(predictor, "chosen_phase", 0):  # which training phase's weights were scored
        metrics["chosen_phase"] = predictor.chosen_phase
    with staged_dir(out) as work:
        (work / "overlays").mkdir()
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (work / "results.json").write_text(json.dumps(scores.results))
        write_report(work, metrics, pr50, data, scores.per_image, overlays)
    return metrics
