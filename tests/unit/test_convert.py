"""`cellseg convert` on tiny synthetic VOC folders: outputs, determinism, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from cellseg.data.arrays import load_arrays
from cellseg.data.convert import convert_dataset
from tests.conftest import voc_xml


def run_convert(*args):
    return subprocess.run(
        [sys.executable, "-m", "cellseg.cli", "convert", *map(str, args)],
        capture_output=True,
        text=True,
    )


def test_convert_writes_arrays_manifest_coco_and_previews(tiny_voc, tmp_path):
    out = tmp_path / "ds"
    result = run_convert("--source", tiny_voc, "--out", out, "--preview", 2)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {
        "train": 3,
        "val": 2,
        "test": 1,
    }
    assert manifest["splits"]["train"]["instances"] == {"RBC": 3, "WBC": 3, "Platelets": 3}
    assert manifest["source"]["dvc_md5"].endswith(".dir")
    assert manifest["params"]["duplicate_iou"] == 0.9

    arrays = load_arrays(out / "targets" / "img_000.npz")
    assert arrays["instance"].dtype == np.uint16 and arrays["classes"].dtype == np.uint8
    assert arrays["ignore"].dtype == bool and arrays["instance"].shape == (96, 128)
    assert set(np.unique(arrays["classes"])) == {0, 1, 2, 3}
    assert (out / "images" / "img_000.jpg").read_bytes() == (
        tiny_voc / "JPEGImages" / "img_000.jpg"
    ).read_bytes()
    assert len(list((out / "preview").glob("*.png"))) == 2

    gt = COCO(str(out / "coco" / "train.json"))
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == ["RBC", "WBC", "Platelets"]
    assert sorted(img["file_name"] for img in gt.dataset["images"]) == [
        "img_000.jpg",
        "img_001.jpg",
        "img_002.jpg",
    ]
    ann = gt.loadAnns(gt.getAnnIds(imgIds=[1], catIds=[2]))[0]
    mask = gt.annToMask(ann)  # the RLE decodes back to the stored instance
    inst_id = np.bincount(arrays["instance"][mask > 0]).argmax()
    assert np.array_equal(mask > 0, arrays["instance"] == inst_id)
    assert ann["bbox"] == [62.0, 35.0, 57.0, 51.0]  # the annotated box, not the mask's


def test_two_conversions_give_byte_identical_arrays(tiny_voc, tmp_path):
    convert_dataset(tiny_voc, tmp_path / "a", workers=1)
    convert_dataset(tiny_voc, tmp_path / "b", workers=2)
    for name in ("targets/img_004.npz", "coco/val.json", "manifest.json"):
        a, b = (tmp_path / d / name for d in ("a", "b"))
        if name == "manifest.json":  # records the source path only
            assert json.loads(a.read_text()) == json.loads(b.read_text())
        else:
            assert a.read_bytes() == b.read_bytes()


def break_input(voc, problem: str) -> str:
    """Damage one file of ``voc`` so conversion hits ``problem``; returns the file's name."""
    xml, jpg = voc / "Annotations" / "img_001.xml", voc / "JPEGImages" / "img_001.jpg"
    if problem == "malformed XML":
        xml.write_text("<annotation><object>")
    elif problem == "unknown class name":
        xml.write_text(voc_xml("img_001.jpg", 128, 96, [("Monocyte", 5, 5, 30, 30)]))
    elif problem == "empty annotation":
        xml.write_text(voc_xml("img_001.jpg", 128, 96, []))
    elif problem == "image missing":
        jpg.unlink()
    elif problem == "not a readable image":
        jpg.write_bytes(b"\xff\xd8 truncated")
    elif problem == "image is 64x48":
        Image.new("RGB", (64, 48)).save(jpg)
    return (xml if "XML" in problem or "annotation" in problem or "class" in problem else jpg).name


BAD_INPUTS = [
    "malformed XML",
    "unknown class name",
    "empty annotation",
    "image missing",
    "not a readable image",
    "image is 64x48",
]


@pytest.mark.parametrize("problem", BAD_INPUTS)
def test_bad_input_is_one_clear_line_and_leaves_no_output(tiny_voc, tmp_path, problem):
    bad_file = break_input(tiny_voc, problem)
    out = tmp_path / "ds"
    result = run_convert("--source", tiny_voc, "--out", out)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and bad_file in error[0] and problem in error[0], result.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["voc"]

    skipped = run_convert("--source", tiny_voc, "--out", out, "--skip-bad")
    assert skipped.returncode == 0, skipped.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["skipped"]] == ["img_001"]
    assert manifest["splits"]["train"]["images"] == 2


def test_every_defect_is_reported_in_one_run(tiny_voc, tmp_path):
    """A malformed XML, an unknown class and a missing image: three lines, one run, no output."""
    (tiny_voc / "Annotations" / "img_000.xml").write_text("<annotation><object>")
    (tiny_voc / "Annotations" / "img_002.xml").write_text(
        voc_xml("img_002.jpg", 128, 96, [("Monocyte", 5, 5, 30, 30)])
    )
    (tiny_voc / "JPEGImages" / "img_004.jpg").unlink()
    out = tmp_path / "ds"
    result = run_convert("--source", tiny_voc, "--out", out)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    expected = [
        "img_000.xml: malformed XML",
        "img_002.xml: unknown class name 'Monocyte'",
        "img_004.jpg: image missing",
    ]
    for line, wanted in zip(errors, expected, strict=False):
        assert wanted in line, result.stderr
    assert len(errors) == 4 and "3 bad files; nothing written" in errors[3], result.stderr
    assert not out.exists()
