import numpy as np

from cellseg.data.pseudomask import MaskCounts, MaskParams, ellipse_mask, instances_from_boxes
from cellseg.data.voc import Box
from tests.conftest import disc_image


def iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def test_masks_of_known_discs_and_ellipses_reach_iou_above_0_9():
    shapes = [(40, 40, 25, 25), (50, 120, 20, 35), (110, 60, 12, 12), (120, 160, 15, 22)]
    image = disc_image(160, 220, shapes)
    boxes = [Box(cx - rx, cy - ry, cx + rx + 1, cy + ry + 1, 1) for cy, cx, ry, rx in shapes]
    counts = MaskCounts()
    instance, classes, void, kept = instances_from_boxes(image, boxes, MaskParams(), counts)
    assert counts.colour == 4 and counts.ellipse_fallback == 0
    for i, (cy, cx, ry, rx) in enumerate(shapes, start=1):
        assert iou(instance == i, ellipse(160, 220, cy, cx, ry, rx)) > 0.9
    assert kept == boxes and set(np.unique(classes)) == {0, 1}
    # every stained cell has a box: void is at most the blurred stain's rim outside the masks
    assert void.sum() < 0.05 * (instance > 0).sum()


def test_an_empty_box_falls_back_to_its_inscribed_ellipse():
    image = disc_image(100, 100, [])
    counts = MaskCounts()
    instance, _, _, _ = instances_from_boxes(image, [Box(20, 30, 60, 50, 2)], MaskParams(), counts)
    assert counts.ellipse_fallback == 1
    crop = instance[30:50, 20:60] == 1
    assert np.array_equal(crop, ellipse_mask(20, 40)) and instance.sum() == crop.sum()


def test_overlapping_boxes_split_by_normalised_distance_to_box_centres():
    # Two touching discs whose boxes overlap: each pixel goes to the nearer box centre.
    image = disc_image(80, 140, [(40, 45, 30, 30), (40, 95, 30, 30)])
    boxes = [Box(15, 10, 76, 71, 1), Box(65, 10, 126, 71, 1)]
    instance, _, _, _ = instances_from_boxes(image, boxes, MaskParams(), MaskCounts())
    overlap_columns = instance[40, 65:76]
    assert list(overlap_columns[:5]) == [1] * 5 and list(overlap_columns[-5:]) == [2] * 5
    # a platelet inside a white cell's box keeps its own pixels
    image = disc_image(100, 100, [(50, 50, 40, 40), (50, 50, 6, 6)])
    boxes = [Box(10, 10, 91, 91, 2), Box(44, 44, 57, 57, 3)]
    instance, classes, _, _ = instances_from_boxes(image, boxes, MaskParams(), MaskCounts())
    assert instance[50, 50] == 2 and classes[50, 50] == 3 and classes[20, 50] == 2


def test_stained_pixels_outside_every_box_form_the_void_region():
    image = disc_image(100, 200, [(50, 50, 25, 25), (50, 150, 25, 25)])
    boxes = [Box(25, 25, 76, 76, 1)]  # the second cell is not annotated
    _, _, void, _ = instances_from_boxes(image, boxes, MaskParams(), MaskCounts())
    assert iou(void, ellipse(100, 200, 50, 150, 25, 25)) > 0.9
    assert not void[:, :100].any()


def test_stained_pixels_no_box_can_take_are_void_not_background():
    # an annotated cell, an unannotated speck 3 px from its box (in what used to be a margin
    # that never counted as void, and below the old 150 px minimum), and a lone 5 px speck
    shapes = [(50, 50, 20, 20), (50, 77, 3, 3), (15, 150, 1, 1)]
    image = disc_image(100, 200, shapes)
    boxes = [Box(30, 30, 71, 71, 1)]
    instance, _, void, _ = instances_from_boxes(image, boxes, MaskParams(), MaskCounts())
    speck = ellipse(100, 200, 50, 77, 3, 3)
    assert void[speck].mean() > 0.9 and not instance[speck].any()
    assert void[14:17, 149:152].any()
    assert not (void & (instance > 0)).any()
