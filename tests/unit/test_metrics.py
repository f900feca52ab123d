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
