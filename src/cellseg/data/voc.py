"""Pascal VOC annotations: parsing and the clean-up BCCD's boxes need."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

from cellseg.classes import CLASS_IDS
from cellseg.errors import DataError


@dataclass(frozen=True)
class Box:
    """A cell's box in pixel coordinates, ``[x0, x1) x [y0, y1)``, and its class id."""

    x0: int
    y0: int
    x1: int
    y1: int
    label: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return max(self.width, 0) * max(self.height, 0)


@dataclass(frozen=True)
class Annotation:
    filename: str
    width: int
    height: int
    boxes: tuple[Box, ...]


def _int(node: ET.Element, tag: str, xml_path: Path) -> int:
    text = node.findtext(tag)
    try:
        return round(float(text))
    except (TypeError, ValueError):
        raise DataError(f"{xml_path}: <{tag}> is missing or not a number") from None


def parse_voc(xml_path: Path) -> Annotation:
    """Read one VOC XML file; unknown class names and unreadable XML are errors."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DataError(f"{xml_path}: malformed XML ({err})") from None
    size = root.find("size")
    if size is None:
        raise DataError(f"{xml_path}: no <size> element")
    boxes = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in CLASS_IDS:
            raise DataError(f"{xml_path}: unknown class name {name!r}")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DataError(f"{xml_path}: object {name} has no <bndbox>")
        boxes.append(
            Box(
                _int(bnd, "xmin", xml_path),
                _int(bnd, "ymin", xml_path),
                _int(bnd, "xmax", xml_path),
                _int(bnd, "ymax", xml_path),
                CLASS_IDS[name],
            )
        )
    if not boxes:
        raise DataError(f"{xml_path}: empty annotation (no <object>)")
    filename = root.findtext("filename") or xml_path.with_suffix(".jpg").name
    return Annotation(
        filename, _int(size, "width", xml_path), _int(size, "height", xml_path), tuple(boxes)
    )


def box_iou(a: Box, b: Box) -> float:
    iw = min(a.x1, b.x1) - max(a.x0, b.x0)
    ih = min(a.y1, b.y1) - max(a.y0, b.y0)
    inter = max(iw, 0) * max(ih, 0)
    union = a.area + b.area - inter
    return inter / union if union else 0.0


@dataclass
class CleanupCounts:
    clipped: int = 0
    dropped_degenerate: int = 0
    merged_duplicates: int = 0


def clean_boxes(
    boxes: tuple[Box, ...],
    width: int,
    height: int,
    min_side: int,
    duplicate_iou: float,
    counts: CleanupCounts,
) -> list[Box]:
    """Clip to the image, drop boxes thinner than ``min_side``, merge same-class duplicates.

    A duplicate (same class, IoU > ``duplicate_iou`` with an earlier kept box) is merged into
    that box as the coordinate-wise mean, so the order of the XML decides nothing but ties.
    """
    kept: list[Box] = []
    for box in boxes:
        clipped = Box(
            min(max(box.x0, 0), width),
            min(max(box.y0, 0), height),
            min(max(box.x1, 0), width),
            min(max(box.y1, 0), height),
            box.label,
        )
        counts.clipped += clipped != box
        if clipped.width < min_side or clipped.height < min_side:
            counts.dropped_degenerate += 1
            continue
        twin = next(
            (
                i
                for i, k in enumerate(kept)
                if k.label == clipped.label and box_iou(k, clipped) > duplicate_iou
            ),
            None,
        )
        if twin is None:
            kept.append(clipped)
            continue
        k = kept[twin]
        kept[twin] = replace(
            k,
            x0=(k.x0 + clipped.x0) // 2,
            y0=(k.y0 + clipped.y0) // 2,
            x1=(k.x1 + clipped.x1 + 1) // 2,
            y1=(k.y1 + clipped.y1 + 1) // 2,
        )
        counts.merged_duplicates += 1
    return kept
