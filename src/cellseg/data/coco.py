"""COCO-format ground truth and results (RLE masks) that pycocotools reads."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from cellseg.classes import CLASS_NAMES
from cellseg.data.voc import Box


def categories() -> list[dict]:
    return [
        {"id": i + 1, "name": name, "supercategory": "cell"} for i, name in enumerate(CLASS_NAMES)
    ]


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a boolean mask, with ``counts`` as text for JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def box_annotations(instance: np.ndarray, boxes: list[Box]) -> list[dict]:
    """One annotation per instance ``i`` (mask) with the box ``boxes[i - 1]`` it came from."""
    anns = []
    for inst_id, box in enumerate(boxes, start=1):
        mask = instance == inst_id
        anns.append(
            {
                "category_id": box.label,
                "segmentation": encode_rle(mask),
                "area": int(mask.sum()),
                "bbox": [float(box.x0), float(box.y0), float(box.width), float(box.height)],
            }
        )
    return anns


def ground_truth(images: list[dict], annotations: list[dict]) -> dict:
    """A COCO instances document; annotation ids are assigned here, from 1."""
    anns = [{"id": i + 1, "iscrowd": 0, **a} for i, a in enumerate(annotations)]
    return {
        "info": {"description": "BCCD pseudo-masks from boxes (cellseg convert)"},
        "images": images,
        "annotations": anns,
        "categories": categories(),
    }


def coco_results(image_id: int, inst) -> list[dict]:
    """COCO results entries (RLE masks, mask boxes, scores) for one image's instances
    (an :class:`~cellseg.evaluation.postprocess.Instances`)."""
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
