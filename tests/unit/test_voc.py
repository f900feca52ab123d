from pathlib import Path

import pytest

from cellseg.data.voc import Box, CleanupCounts, box_iou, clean_boxes, parse_voc
from cellseg.errors import DataError
from tests.conftest import voc_xml


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "a.xml"
    path.write_text(text)
    return path


def test_parse_voc_reads_size_and_boxes_with_class_ids(tmp_path):
    xml = voc_xml("a.jpg", 640, 480, [("RBC", 1, 2, 30, 40), ("Platelets", 5, 6, 7, 8)])
    ann = parse_voc(write(tmp_path, xml))
    assert (ann.filename, ann.width, ann.height) == ("a.jpg", 640, 480)
    assert ann.boxes == (Box(1, 2, 30, 40, 1), Box(5, 6, 7, 8, 3))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<annotation><size>", "malformed XML"),
        (voc_xml("a.jpg", 64, 64, [("Neutrophil", 1, 1, 9, 9)]), "unknown class name"),
        (voc_xml("a.jpg", 64, 64, []), "empty annotation"),
        ("<annotation><object><name>RBC</name></object></annotation>", "no <size>"),
    ],
)
def test_parse_voc_errors_name_the_file_and_the_problem(tmp_path, text, problem):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as err:
        parse_voc(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_clean_boxes_clips_drops_degenerate_and_merges_duplicates():
    counts = CleanupCounts()
    boxes = (
        Box(-5, 10, 50, 60, 1),  # clipped at x = 0
        Box(100, 100, 101, 150, 1),  # 1 px wide: dropped
        Box(200, 200, 300, 300, 1),
        Box(202, 201, 301, 301, 1),  # IoU ~0.96 with the previous: merged
        Box(202, 201, 301, 301, 2),  # same place, other class: kept
    )
    kept = clean_boxes(boxes, 640, 480, min_side=4, duplicate_iou=0.9, counts=counts)
    assert kept == [
        Box(0, 10, 50, 60, 1),
        Box(201, 200, 301, 301, 1),
        Box(202, 201, 301, 301, 2),
    ]
    assert (counts.clipped, counts.dropped_degenerate, counts.merged_duplicates) == (1, 1, 1)


def test_box_iou_by_hand():
    assert box_iou(Box(0, 0, 10, 10, 1), Box(5, 0, 15, 10, 1)) == pytest.approx(50 / 150)
    assert box_iou(Box(0, 0, 10, 10, 1), Box(20, 20, 30, 30, 1)) == 0
