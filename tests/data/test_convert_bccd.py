"""The real BCCD through `cellseg convert`: splits, defects, COCO files, provenance."""

import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from cellseg.data.arrays import load_arrays
from cellseg.data.convert import convert_dataset
from cellseg.data.source import read_dvc_pointer

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def converted(bccd_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("bccd") / "dataset"
    convert_dataset(bccd_source, out, preview=2)
    return out


def test_official_splits_and_every_box_accounted_for(converted):
    manifest = json.loads((converted / "manifest.json").read_text())
    splits = manifest["splits"]
    assert {s: v["images"] for s, v in splits.items()} == {"train": 205, "val": 87, "test": 72}
    files = [set(v["files"]) for v in splits.values()]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
    # 4,888 boxes less 2 one-pixel boxes and 7 merged duplicates; no image skipped.
    assert manifest["cleanup"]["dropped_degenerate"] == 2
    assert manifest["cleanup"]["merged_duplicates"] == 7
    kept = sum(sum(v["instances"].values()) for v in splits.values())
    assert kept + manifest["masks"]["dropped_occluded"] == 4888 - 2 - 7
    masks = manifest["masks"]
    assert masks["colour"] + masks["ellipse_fallback"] == 4888 - 2 - 7
    assert masks["colour"] > masks["ellipse_fallback"]  # colour segmentation mostly works
    for split in splits.values():  # unlabelled cells exist in every split
        assert split["void_pixels"] > 0 and split["void_regions"] > 0


def test_manifest_records_the_source_dvc_md5(converted, repo_root):
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["source"]["dvc_md5"] == read_dvc_pointer(repo_root / "data.dvc").md5
    assert manifest["package_version"]


def test_coco_test_split_reads_with_pycocotools(converted):
    gt = COCO(str(converted / "coco" / "test.json"))
    assert len(gt.getImgIds()) == 72
    names = {c["name"] for c in gt.loadCats(gt.getCatIds())}
    assert names == {"RBC", "WBC", "Platelets"}
    img = gt.loadImgs(gt.getImgIds())[0]
    assert img["file_name"].startswith("BloodImage_") and img["file_name"].endswith(".jpg")
    assert (img["width"], img["height"]) == (640, 480)
    stem = img["file_name"][:-4]
    arrays = load_arrays(converted / "targets" / f"{stem}.npz")
    assert len(gt.getAnnIds(imgIds=[img["id"]])) == int(arrays["instance"].max())
    assert not (arrays["ignore"] & (arrays["instance"] > 0)).any()
    assert len(list((converted / "preview").glob("*.png"))) == 2
    assert np.unique(arrays["classes"]).max() <= 3
