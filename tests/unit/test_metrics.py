import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cellseg.data.coco import encode_rle
from cellseg.evaluation.metrics import aji, coco_map, match


def squares(shape=(40, 60), boxes=((2, 2, 12, 12), (2, 20, 12, 30), (20, 2, 30, 12))):
    labels = np.zeros(shape, np.int32)
    for i, (y0, x0, y1, x1) in enumerate(boxes, start=1):
        labels[y0:y1, x0:x1] = i
    return labels


def test_a_perfect_prediction_scores_one_everywhere():
    gt = squares()
    stats = match(gt, gt.copy())
    assert (stats.tp, stats.fp, stats.fn) == (3, 0, 0)
    assert stats.pq == stats.sq == stats.rq == stats.f1 == 1.0
    assert aji(gt, gt) == 1.0


def test_one_instance_missing():
    gt = squares()
    pred = gt.copy()
    pred[pred == 3] = 0
    stats = match(gt, pred)
    assert (stats.tp, stats.fp, stats.fn) == (2, 0, 1)
    assert stats.f1 == pytest.approx(4 / 5) and stats.sq == 1.0 and stats.pq == pytest.approx(0.8)
    assert aji(gt, pred) == pytest.approx(200 / 300)


def test_one_extra_instance():
    gt = squares()
    pred = gt.copy()
    pred[30:35, 40:50] = 4  # 50 px where nothing is
    stats = match(gt, pred)
    assert (stats.tp, stats.fp, stats.fn) == (3, 1, 0)
    assert stats.f1 == pytest.approx(6 / 7) and stats.pq == pytest.approx(6 / 7)
    assert aji(gt, pred) == pytest.approx(300 / 350)


def test_one_instance_split_in_two():
    gt = squares(boxes=((2, 2, 12, 12), (2, 20, 12, 30)))
    pred = gt.copy()
    pred[2:12, 7:12] = 3  # instance 1 split into halves 1 and 3 (IoU 0.5 each: no match)
    stats = match(gt, pred)
    assert (stats.tp, stats.fp, stats.fn) == (1, 2, 1)
    assert stats.f1 == pytest.approx(2 / 5) and stats.sq == 1.0 and stats.pq == pytest.approx(0.4)
    # AJI: GT 1 pairs with one half (I 50, U 100), the other half adds 50 to the union.
    assert aji(gt, pred) == pytest.approx((50 + 100) / (100 + 50 + 100))


def test_partial_overlap_gives_sq_below_one():
    gt = squares(boxes=((0, 0, 10, 10),))
    pred = squares(boxes=((0, 0, 10, 8),))  # IoU 0.8
    stats = match(gt, pred)
    assert stats.tp == 1 and stats.sq == pytest.approx(0.8) and stats.pq == pytest.approx(0.8)


def test_void_aware_matching_forgives_predictions_on_unannotated_cells():
    gt = squares()
    pred = gt.copy()
    pred[30:36, 40:50] = 4
    void = np.zeros_like(gt, bool)
    void[29:37, 39:51] = True  # an unannotated cell
    assert match(gt, pred).fp == 1
    assert match(gt, pred, void).fp == 0


def _coco_inputs():
    rng = np.random.default_rng(3)
    images, anns, results = [], [], []
    for img_id in (1, 2):
        images.append({"id": img_id, "file_name": f"{img_id}.jpg", "width": 60, "height": 40})
        gt = squares()
        for k in (1, 2, 3):
            m = gt == k
            ys, xs = np.nonzero(m)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": k,
                    "iscrowd": 0,
                    "segmentation": encode_rle(m),
                    "area": int(m.sum()),
                    "bbox": [float(xs.min()), float(ys.min()), 10.0, 10.0],
                }
            )
            shifted = np.roll(m, int(rng.integers(0, 4)), axis=1)
            results.append(
                {
                    "image_id": img_id,
                    "category_id": int(rng.integers(1, 4)),
                    "segmentation": encode_rle(shifted),
                    "bbox": [float(xs.min() + 1), float(ys.min()), 10.0, 10.0],
                    "score": float(rng.random()),
                }
            )
    cats = [{"id": i, "name": n} for i, n in enumerate(("RBC", "WBC", "Platelets"), start=1)]
    return {"images": images, "annotations": anns, "categories": cats}, results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_our_map_equals_pycocotools_summarize(iou_type):
    gt_doc, results = _coco_inputs()
    ours = coco_map(gt_doc, results, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_doc
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ours["map"] == pytest.approx(ev.stats[0])
    assert ours["map50"] == pytest.approx(ev.stats[1])
    assert 0 < ours["map50"] < 1


def coco_ap_by_hand(ranked: list[str], n_gt: int) -> float:
    """COCO's 101-point interpolated AP of detections ranked by score, each "tp", "fp" or
    "ignored" (matched to a crowd region: dropped from the ranking)."""
    flags = [f == "tp" for f in ranked if f != "ignored"]
    tp = np.cumsum(flags)
    precision = tp / np.arange(1, len(flags) + 1)
    recall = tp / n_gt
    envelope = [max(precision[recall >= r], default=0.0) for r in np.linspace(0, 1, 101)]
    return float(np.mean(envelope))


def test_void_aware_box_ap_hides_only_detections_on_void_regions():
    """Two small void regions in opposite corners: one box around all void pixels spans the
    frame and hid the false positive in the middle; a box per region does not."""
    from cellseg.data.coco import categories
    from cellseg.evaluation.evaluate import void_crowd_annotations

    void = np.zeros((100, 200), bool)
    void[0:6, 190:200] = True  # top right
    void[94:100, 0:6] = True  # bottom left
    gt_doc = {
        "images": [{"id": 1, "width": 200, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 20.0, 20.0]}
            | {"area": 400, "iscrowd": 0}
        ],
        "categories": categories(),
    }

    def det(x, y, w, h, score):
        return {"image_id": 1, "category_id": 1, "bbox": [x, y, w, h], "score": score}

    results = [
        det(190.0, 0.0, 10.0, 6.0, 0.95),  # on the top-right void region: forgiven
        det(100.0, 50.0, 20.0, 20.0, 0.9),  # on nothing: a false positive
        det(10.0, 10.0, 20.0, 20.0, 0.8),  # the cell
    ]
    crowd = void_crowd_annotations(1, void, start_id=2)
    assert len(crowd) == 2 * 3  # two regions, one annotation per class each
    assert sorted(tuple(a["bbox"]) for a in crowd[::3]) == [(0, 94, 6, 6), (190, 0, 10, 6)]
    fair = coco_map({**gt_doc, "annotations": gt_doc["annotations"] + crowd}, results, "bbox")
    assert fair["map50"] == pytest.approx(coco_ap_by_hand(["ignored", "fp", "tp"], 1))
    assert fair["map50"] == pytest.approx(0.5)

    # the old definition: one crowd box around every void pixel hides the false positive too
    whole = {"bbox": [0.0, 0.0, 200.0, 100.0], "segmentation": encode_rle(void), "area": 72}
    old = [{**a, **whole} for a in crowd[:3]]
    hidden = coco_map({**gt_doc, "annotations": gt_doc["annotations"] + old}, results, "bbox")
    assert hidden["map50"] == pytest.approx(coco_ap_by_hand(["ignored", "ignored", "tp"], 1))
    assert hidden["map50"] == pytest.approx(1.0)
    strict = coco_map(gt_doc, results, "bbox")
    assert strict["map50"] == pytest.approx(coco_ap_by_hand(["fp", "fp", "tp"], 1))
