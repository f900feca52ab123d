"""The post-processing search on hand-built maps, where the right setting is known: four cells
(317 px) and five specks (21 px) that no annotator boxed; markers under ``min_marker_area`` are
dropped, so any value that drops the specks' markers and keeps the cells' is right."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg.classes import CLASS_NAMES
from cellseg.errors import ConfigError
from cellseg.evaluation.tune import SplitMaps, grid, search
from cellseg.model.postprocess_params import PostprocessParams, with_overrides
from cellseg.training.targets import hv_maps

H, W = 96, 128
CELLS = [(25, 30), (25, 90), (70, 40), (70, 100)]
SPECKS = [(10, 60), (50, 10), (50, 64), (85, 70), (48, 118)]


def hand_built_maps(images: int = 2) -> SplitMaps:
    yy, xx = np.mgrid[:H, :W]
    labels = np.zeros((H, W), np.int32)
    for i, (y, x) in enumerate(CELLS, 1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= 100] = i
    for j, (y, x) in enumerate(SPECKS, len(CELLS) + 1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= 6] = j
    np_prob = np.where(labels > 0, 0.95, 0.02).astype(np.float32)
    nc_prob = np.zeros((4, H, W), np.float32)
    nc_prob[0], nc_prob[1] = labels == 0, labels > 0  # every cell a red one
    maps = (np_prob, hv_maps(labels).astype(np.float32), nc_prob)
    gt = {"images": [], "annotations": [],
          "categories": [{"id": k, "name": n} for k, n in enumerate(CLASS_NAMES, 1)]}  # fmt: skip
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "width": W, "height": H, "file_name": f"{image_id}"})
        for y, x in CELLS:  # the boxed cells only
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": 1,
                "bbox": [x - 10.0, y - 10.0, 21.0, 21.0], "area": 441.0, "iscrowd": 0,
            })  # fmt: skip
    return SplitMaps(gt, gt["images"], [maps] * images, [(H, W)] * images)


def test_the_search_finds_the_min_marker_area_that_drops_the_specks():
    maps = hand_built_maps()
    start = PostprocessParams(markers="slope", min_marker_area=5, min_instance_area=2)
    tuning = search(maps.box_map50, start, keys=("min_marker_area",))
    assert tuning.start_score < 0.9  # the specks' instances are false positives at 5 px
    assert tuning.chosen.min_marker_area in (20, 40, 80) and tuning.best_score == 1.0
    assert tuning.changed() == {"min_marker_area": tuning.chosen.min_marker_area}
    assert [t["value"] for t in tuning.trials if t["kept"]] == [tuning.chosen.min_marker_area]
    again = search(maps.box_map50, start, keys=("min_marker_area",))
    assert again.chosen == tuning.chosen  # deterministic


def test_the_search_never_ends_below_its_start_and_respects_its_budget():
    maps = hand_built_maps(1)
    start = PostprocessParams(markers="slope", min_marker_area=40, min_instance_area=2)
    tuning = search(maps.box_map50, start)  # already right: nothing may make it worse
    assert tuning.best_score >= tuning.start_score == 1.0
    spent = search(maps.box_map50, start, budget_seconds=0.0)
    assert not spent.complete and spent.trials == [] and spent.chosen == start
    table = tuning.markdown()
    assert "| `min_marker_area` | 40 |" in table and "val strict box mAP@0.5" in table


def test_areas_are_searched_as_multiples_of_the_models_own():
    """The grid follows the working scale: uni-gpu's 188 px at 1.0x, local's 30 px at 0.4x."""
    assert grid("min_marker_area", PostprocessParams(min_marker_area=188)) == [
        47,
        94,
        188,
        376,
        752,
    ]
    assert grid("min_marker_area", PostprocessParams(min_marker_area=30)) == [8, 15, 30, 60, 120]


def test_evaluate_set_overrides_post_processing_in_one_checked_line():
    params = with_overrides(PostprocessParams(), ["border_score=0.8", "merge_touching=[WBC]"])
    assert params.border_score == 0.8 and params.merge_touching == ("WBC",)
    with pytest.raises(ConfigError, match="post-processing key"):
        with_overrides(PostprocessParams(), ["lr=0.1"])
    with pytest.raises(ConfigError, match="--set border_score"):
        with_overrides(PostprocessParams(), ["border_score=2"])
