import numpy as np

from benchmarks.reference import classify_instances_reference
from cellseg.evaluation.postprocess import (
    classify_instances,
    merge_touching,
    postprocess,
    watershed_instances,
)
from cellseg.model.postprocess_params import PostprocessParams
from cellseg.training.targets import hv_maps


def discs(shape, centres, r):
    yy, xx = np.indices(shape)
    inst = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst == 0)] = i
    return inst


def test_a_perfectly_predicted_small_disk_whose_marker_is_too_small_is_one_instance():
    # radius 4: 49 px, above min_instance_area, but its marker (after the opening) is under 30
    truth = discs((40, 40), [(20, 20)], 4)
    fg, hv = (truth > 0).astype(np.float32), hv_maps(truth)
    params = PostprocessParams(min_marker_area=30, keep_markerless=True)
    labels = watershed_instances(fg, hv, params)
    assert labels.max() == 1
    assert np.array_equal(labels > 0, truth > 0)
    # off (the default, and uni-gpu's): the disk is lost, as before
    assert watershed_instances(fg, hv, PostprocessParams(min_marker_area=30)).max() == 0


def test_two_touching_discs_with_exact_hv_maps_are_separated():
    truth = discs((100, 140), [(50, 45), (50, 93)], 25)  # 48 px apart: they touch
    assert len(np.unique(truth)) == 3
    merged_fg = (truth > 0).astype(np.float32)
    labels = watershed_instances(merged_fg, hv_maps(truth))
    assert labels.max() == 2
    for i in (1, 2):
        best = max(
            np.logical_and(labels == j, truth == i).sum()
            / np.logical_or(labels == j, truth == i).sum()
            for j in (1, 2)
        )
        assert best > 0.9


def test_class_is_the_highest_non_background_class_of_the_mean_softmax():
    labels = np.zeros((1, 10), np.int32)
    labels[0, :10] = 1
    probs = np.zeros((4, 1, 10))
    probs[:, 0, :6] = np.array([0.0, 0.0, 0.5, 0.5 - 1e-3])[:, None]  # argmax WBC, narrowly
    probs[:, 0, 6:] = np.array([0.0, 0.0, 0.0, 1.0])[:, None]  # platelet, confidently
    inst = classify_instances(labels, np.ones((1, 10)), probs)
    # per-pixel majority would say WBC (6 of 10); the mean softmax says Platelets (0.7 vs 0.3)
    assert inst.classes.tolist() == [3]
    np.testing.assert_allclose(inst.class_probs[0], [0, 0, 0.3, 0.7], atol=1e-3)


def test_a_mostly_background_instance_still_gets_a_cell_class_with_a_low_score():
    labels = np.ones((4, 4), np.int32)
    probs = np.zeros((4, 4, 4))
    probs[:] = np.array([0.9, 0.02, 0.05, 0.03])[:, None, None]
    inst = classify_instances(labels, np.full((4, 4), 0.6), probs)
    assert inst.classes.tolist() == [2]  # WBC, never a silent default
    assert inst.scores[0] == np.float32(0.6 * 0.05 / 0.10)


def test_vectorised_classification_equals_the_per_instance_reference():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 30, (64, 80)).astype(np.int32)
    labels[labels == 7] = 0  # an id with no pixels
    logits = rng.normal(size=(4, 64, 80))
    probs = np.exp(logits) / np.exp(logits).sum(0)
    np_prob = rng.random((64, 80))
    fast = classify_instances(labels, np_prob, probs)
    ref = classify_instances_reference(labels, np_prob, probs)
    present = np.unique(labels[labels > 0]) - 1
    assert np.array_equal(fast.classes[present], ref.classes[present])
    np.testing.assert_allclose(fast.scores[present], ref.scores[present], rtol=1e-5)


def test_postprocess_of_an_empty_prediction_is_empty():
    inst = postprocess(np.zeros((32, 32)), np.zeros((2, 32, 32)), np.zeros((4, 32, 32)))
    assert inst.labels.max() == 0 and len(inst.classes) == 0


def test_fill_holes_matches_scipy():
    from scipy import ndimage as ndi

    from cellseg.evaluation.postprocess import fill_holes

    rng = np.random.default_rng(1)
    mask = ndi.binary_opening(rng.random((60, 80)) > 0.45)
    mask[10:20, 10:20] = True
    mask[13:17, 13:17] = False  # a hole
    assert np.array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))


def test_growing_markers_equals_the_plain_scikit_image_watershed():
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    from cellseg.evaluation.postprocess import grow_markers

    rng = np.random.default_rng(4)
    for _ in range(5):
        distance = ndi.gaussian_filter(rng.random((90, 120)), 3)
        mask = distance > np.percentile(distance, 35)
        markers = ndi.label(distance > np.percentile(distance, 85))[0]
        expected = watershed(distance, markers=markers, mask=mask)
        assert np.array_equal(grow_markers(distance, markers, mask), expected)


def test_border_instances_are_ranked_lower_never_dropped():
    from cellseg.evaluation.postprocess import touches_border

    labels = discs((64, 64), [(6, 6), (32, 40)], 9)  # one cut by the image's corner
    assert touches_border(labels).tolist() == [True, False]
    np_prob = (labels > 0).astype(np.float32)
    nc = np.zeros((4, 64, 64), np.float32)
    nc[1] = 1.0
    plain = postprocess(np_prob, hv_maps(labels), nc)
    scaled = postprocess(np_prob, hv_maps(labels), nc, PostprocessParams(border_score=0.25))
    assert np.array_equal(plain.labels, scaled.labels) and plain.labels.max() == 2  # kept
    edge = touches_border(plain.labels)
    assert edge.tolist().count(True) == 1
    assert np.allclose(scaled.scores[edge], 0.25 * plain.scores[edge])
    assert np.allclose(scaled.scores[~edge], plain.scores[~edge])


def test_slope_markers_keep_softly_predicted_large_cells_that_sobel_markers_lose():
    """Two large touching cells whose HV slopes are gentle (as a briefly trained network
    predicts them) beside three small steep ones: HoVer-Net's per-image normalised Sobel energy
    puts the large cells' interiors above its threshold, so they get no marker and vanish; the
    slope rule needs only the maps to rise and finds all five, whatever their size."""
    large = discs((120, 220), [(60, 50), (60, 118)], 34)
    small = discs((120, 220), [(30, 185), (90, 185), (60, 200)], 7)
    truth = np.where(small > 0, small + 2, large)
    hv = hv_maps(truth)
    hv[:, truth <= 2] *= 0.3
    fg = (truth > 0).astype(np.float32)

    def best_iou(labels, i):
        ids, counts = np.unique(labels[truth == i], return_counts=True)
        j = ids[counts.argmax()]
        return (
            ((labels == j) & (truth == i)).sum() / ((labels == j) | (truth == i)).sum() if j else 0
        )

    sobel = watershed_instances(fg, hv, PostprocessParams(markers="sobel"))
    slope = watershed_instances(fg, hv, PostprocessParams(markers="slope"))
    assert best_iou(sobel, 1) == best_iou(sobel, 2) == 0  # lost
    assert slope.max() == 5 and all(best_iou(slope, i) > 0.95 for i in range(1, 6))


def test_slope_markers_separate_touching_cells_of_any_size():
    for r in (6, 12, 40):
        truth = discs((4 * r + 20, 8 * r + 20), [(2 * r + 10, r + 10), (2 * r + 10, 3 * r + 10)], r)
        labels = watershed_instances(
            (truth > 0).astype(np.float32), hv_maps(truth), PostprocessParams(markers="slope")
        )
        assert labels.max() == 2, r


def test_touching_pieces_of_a_merge_class_become_one_cell():
    """A white cell cut in two, two touching red cells and a second white cell lying apart:
    only the white pieces merge."""
    labels = np.zeros((20, 40), np.int32)
    labels[2:10, 2:8], labels[2:10, 8:14] = 1, 2  # two pieces of one white cell
    labels[12:18, 2:8], labels[12:18, 8:14] = 3, 4  # two touching red cells
    labels[2:10, 30:36] = 5  # another white cell, apart
    merged = merge_touching(labels, np.array([2, 2, 1, 1, 2]), [2])
    assert merged.max() == 4 and merged[2, 3] == merged[2, 10]
    assert len({merged[12, 3], merged[12, 10], merged[2, 31], merged[2, 3]}) == 4


def test_postprocess_merges_a_split_white_cell_and_classes_it_by_the_merged_mean_softmax():
    truth = discs((100, 140), [(50, 45), (50, 93)], 25)  # two touching discs: split apart
    fg = (truth > 0).astype(np.float32)
    nc = np.zeros((4, 100, 140), np.float32)
    nc[0] = truth == 0
    nc[2][truth == 1] = 1.0
    nc[2][truth == 2], nc[3][truth == 2] = 0.8, 0.2  # both halves white, one less surely
    plain = postprocess(fg, hv_maps(truth), nc, PostprocessParams())
    assert plain.labels.max() == 2 and plain.classes.tolist() == [2, 2]
    merged = postprocess(fg, hv_maps(truth), nc, PostprocessParams(merge_touching=("WBC",)))
    assert merged.labels.max() == 1 and merged.classes.tolist() == [2]
    np.testing.assert_allclose(merged.class_probs[0], [0, 0, 0.9, 0.1], atol=0.01)
