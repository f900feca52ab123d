"""`cellseg predict` and `cellseg evaluate` with a trained checkpoint, and on bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cellseg.data.arrays import load_sample
from cellseg.evaluation.evaluate import evaluate, instance_classes
from cellseg.evaluation.inference import Predictor
from cellseg.evaluation.postprocess import Instances
from cellseg.evaluation.predict import predict

pytestmark = pytest.mark.model


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cellseg.cli", *map(str, args)], capture_output=True, text=True
    )


def test_predictor_returns_instances_at_the_input_resolution_for_odd_sizes(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint)
    for shape in [(96, 128, 3), (100, 130, 3), (77, 53), (64, 64, 4)]:
        image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
        inst = predictor(image)
        assert inst.labels.shape == shape[:2]
        ids = np.unique(inst.labels[inst.labels > 0])
        assert set(inst.classes[ids - 1].tolist()) <= {1, 2, 3}  # never background


def test_batched_inference_equals_one_image_at_a_time(checkpoint, dataset, tmp_path):
    import torch

    predictor = Predictor.from_checkpoint(checkpoint, batch_size=3)  # device "auto"
    assert predictor.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(1)
    shapes = [(96, 128, 3), (100, 130, 3), (96, 128, 3), (96, 128, 3), (96, 128, 3)]
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in shapes]
    tolerance = 1e-5 if predictor.device.type == "cpu" else 2e-2  # bf16 on CUDA
    batched = predictor.probabilities_batch(images)  # 4 of one size: batches of 3 and 1
    for image, together in zip(images, batched, strict=True):
        for a, b in zip(together, predictor.probabilities(image), strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=tolerance)
    if predictor.device.type == "cpu":
        for image, inst in zip(images, predictor.predict_batch(images), strict=True):
            assert np.array_equal(inst.labels, predictor(image).labels)
    # the evaluation's figures do not depend on the batching (CPU: within 1e-3)
    one = evaluate(dataset, Predictor.from_checkpoint(checkpoint, batch_size=1), tmp_path / "a")
    many = evaluate(dataset, predictor, tmp_path / "b")
    for key in ("box_map50", "mask_map50", "pq", "f1", "aji"):
        assert many[key] == pytest.approx(one[key], abs=1e-3), key
    assert many["chosen_phase"] == 1  # metrics.json names the phase whose weights it scored


def test_predict_writes_results_counts_and_overlays_and_reports_each_bad_file(
    checkpoint, dataset, tmp_path
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = load_sample(dataset, "img_008")["image"]
    Image.fromarray(good).save(inputs / "rgb.jpg")
    Image.fromarray(good[..., 0]).save(inputs / "gray.png")
    Image.fromarray(np.dstack([good, np.full(good.shape[:2], 255, np.uint8)])).save(
        inputs / "rgba.png"
    )
    Image.fromarray(good[..., 0].astype(np.uint16) * 257).save(inputs / "deep16.png")
    Image.fromarray(good[:90, :101]).save(inputs / "odd.png")
    (inputs / "notes.txt").write_text("not an image")  # skipped: folders give images only
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    Image.new("L", (4200, 4100)).save(inputs / "huge.png")
    text = tmp_path / "text.png"
    text.write_text("hello")

    out = tmp_path / "out"
    result = cli("predict", inputs, text, "--model", checkpoint, "--out", out)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    errors = [x for x in lines if x.startswith("cellseg predict:") and "error:" not in x]
    assert len(errors) == 3, result.stderr
    assert any("corrupt.jpg: not a readable image" in e for e in errors)
    assert any("huge.png" in e and "pixel limit" in e for e in errors)
    assert any("text.png: not a readable image" in e for e in errors)

    names = ["deep16.png", "gray.png", "odd.png", "rgb.jpg", "rgba.png"]
    counts = (out / "counts.csv").read_text().splitlines()
    assert counts[0] == "file,RBC,WBC,Platelets"
    assert sorted(row.split(",")[0] for row in counts[1:]) == names
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(
        n.rsplit(".", 1)[0] + ".png" for n in names
    )
    assert isinstance(json.loads((out / "results.json").read_text()), list)


class Oracle:
    """Returns the ground truth itself: every metric must come out 1.0."""

    def __init__(self, dataset):
        self.truth = {}
        for stem in ("img_008", "img_009"):
            s = load_sample(dataset, stem)
            self.truth[s["image"].tobytes()] = s

    def __call__(self, image):
        s = self.truth[image.tobytes()]
        labels = s["instance"].astype(np.int32)
        classes = instance_classes(labels, s["classes"])
        n = len(classes)
        return Instances(labels, classes, np.ones(n, np.float32), np.zeros((n, 4)))


def test_a_perfect_prediction_scores_one_on_every_metric(dataset, tmp_path):
    metrics = evaluate(dataset, Oracle(dataset), tmp_path / "eval", "test")
    for key in ("mask_map50", "mask_map", "pq", "sq", "rq", "f1", "aji", "bpq", "mpq"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["box_map50"] == pytest.approx(1.0)  # mask boxes vs original boxes: IoU > .5
    for name, pc in metrics["per_class"].items():
        assert pc["pq"] == pc["iou"] == pc["dice"] == pytest.approx(1.0), name
    confusion = np.array(metrics["confusion"]["counts"])
    assert np.array_equal(confusion, np.diag([2, 2, 2, 0]))  # 2 images x one cell per class


def test_evaluate_cli_writes_metrics_report_and_figures(checkpoint, dataset, tmp_path):
    out = tmp_path / "eval"
    result = cli(
        "evaluate", "--data", dataset, "--model", checkpoint, "--split", "test", "--out", out
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"box_map50", "mask_map50", "mask_map", "pq", "f1", "per_class", "void_aware"} <= set(
        metrics
    )
    assert set(metrics["per_class"]) == {"RBC", "WBC", "Platelets"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("box_map50", "mask_map50", "pq", "f1"))
    assert "| box_map50 |" in (out / "report.md").read_text()
    for png in ("confusion.png", "pr_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "overlays").glob("best_*.png")) and list(
        (out / "overlays").glob("worst_*.png")
    )


def test_predict_records_every_instance_with_its_class(dataset, tmp_path):
    """With a predictor whose answer is known (the ground truth), every cell is a COCO result
    and a count, under its own file name."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    expected = {}
    for stem in ("img_008", "img_009"):
        sample = load_sample(dataset, stem)
        Image.fromarray(sample["image"]).save(inputs / f"{stem}.png")  # lossless: same pixels
        labels = sample["instance"].astype(np.int32)
        expected[f"{stem}.png"] = np.bincount(
            instance_classes(labels, sample["classes"]), minlength=4
        )
    assert predict([inputs], Oracle(dataset), tmp_path / "out") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for name, per_class in expected.items():
        mine = [r for r in results if r["file_name"] == name]
        assert len(mine) == per_class.sum() > 0, name
        found = np.bincount([r["category_id"] for r in mine], minlength=4)
        assert np.array_equal(found, per_class), name
        assert all({"image_id", "bbox", "score", "segmentation"} <= set(r) for r in mine)
    rows = (tmp_path / "out" / "counts.csv").read_text().splitlines()[1:]
    assert sorted(rows) == sorted(f"{n},{c[1]},{c[2]},{c[3]}" for n, c in expected.items())


def test_the_profiles_post_processing_travels_with_the_checkpoint(dataset, tmp_path):
    """`local` chose its post-processing on val; the predictor built from its checkpoint uses
    it, an override travels the same way, and `uni-gpu` starts from the same choices carried
    to its scale, not from HoVer-Net's 40x nuclei defaults."""
    from cellseg.model.postprocess_params import POSTPROCESS_KEYS, PostprocessParams
    from cellseg.training.config import load_config
    from cellseg.training.loop import train
    from tests.conftest import TINY

    def chosen(params_or_config) -> dict:
        return {k: getattr(params_or_config, k) for k in POSTPROCESS_KEYS}

    uni, default = load_config("uni-gpu", 1), PostprocessParams()
    assert uni.markers == "slope" != default.markers and uni.merge_touching == ("WBC",)
    local = load_config("local", 1)
    assert chosen(local) != chosen(default) and local.markers == "slope"
    train(1, dataset, tmp_path / "a", load_config("local", 1, [*TINY, "epochs=1"]))
    other = load_config("local", 1, [*TINY, "epochs=1", "markers=sobel", "merge_touching=[]"])
    train(1, dataset, tmp_path / "b", other)
    a = Predictor.from_checkpoint(tmp_path / "a" / "best_phase1.pt").params
    b = Predictor.from_checkpoint(tmp_path / "b" / "best_phase1.pt").params
    assert chosen(a) == chosen(local)
    assert (b.markers, b.merge_touching, b.np_threshold) == ("sobel", (), local.np_threshold)
