"""Registry and tracking against a real `mlflow server`: register, aliases, pyfunc, gate."""

import json
import subprocess
import sys
import uuid

import mlflow
import numpy as np
import pytest
from PIL import Image

from cellseg.model_store import resolve_checkpoint
from cellseg.registry import CHALLENGER, CHAMPION, promote, register
from cellseg.voc import CLASS_NAMES

pytestmark = pytest.mark.integration


def fake_metrics(pq: float, per_class: dict | None = None) -> dict:
    per_class = per_class or {c: pq for c in CLASS_NAMES}
    return {"pq": pq, "box_map50": pq, "per_class": {c: {"pq": v} for c, v in per_class.items()}}


def new_run() -> str:
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("registry-tests") or client.get_experiment(
        client.create_experiment("registry-tests")
    )
    return client.create_run(exp.experiment_id).info.run_id


@pytest.fixture
def model_name():
    return f"cellseg-{uuid.uuid4().hex[:8]}"


def test_register_alias_load_by_alias_and_predict_on_a_bccd_image(
    mlflow_uri, checkpoint, bccd_source, model_name
):
    image = np.asarray(
        Image.open(bccd_source / "JPEGImages" / "BloodImage_00000.jpg").convert("RGB")
    )
    version, decision = register(
        new_run(), checkpoint, fake_metrics(0.5), image[:64, :64], model_name
    )
    assert decision.promote and decision.reasons == ["first model: no champion yet"]
    promote(version, model_name)
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(model_name, CHAMPION).version == version
    assert client.get_model_version_by_alias(model_name, CHALLENGER).version == version

    # `cellseg predict --model models:/...@champion` resolves the same version's checkpoint
    local = resolve_checkpoint(f"models:/{model_name}@{CHAMPION}")
    assert local.read_bytes() == checkpoint.read_bytes()

    model = mlflow.pyfunc.load_model(f"models:/{model_name}@{CHAMPION}")
    cells = model.predict(image)
    assert list(cells.columns[:4]) == ["instance_id", "category_id", "class_name", "score"]
    assert set(cells["class_name"]) <= set(CLASS_NAMES)
    assert (cells["x"] + cells["width"] <= 640).all() and (
        cells["y"] + cells["height"] <= 480
    ).all()


def test_promotion_gate_both_ways_and_forced(mlflow_uri, checkpoint, model_name):
    client = mlflow.MlflowClient()
    example = np.zeros((32, 32, 3), np.uint8)

    def reg(metrics, force=False):
        version, decision = register(
            new_run(), checkpoint, metrics, example, model_name, tolerance=0.05, force=force
        )
        if decision.promote:
            promote(version, model_name)
        return version, decision

    v1, d1 = reg(fake_metrics(0.40))
    assert d1.promote  # the first model
    v2, d2 = reg(fake_metrics(0.45))  # better everywhere: promoted
    assert d2.promote and client.get_model_version_by_alias(model_name, CHAMPION).version == v2
    v3, d3 = reg(fake_metrics(0.44))  # worse: stays challenger
    assert not d3.promote and "does not beat" in d3.reasons[0]
    assert client.get_model_version_by_alias(model_name, CHAMPION).version == v2
    assert client.get_model_version_by_alias(model_name, CHALLENGER).version == v3
    tags = client.get_model_version(model_name, v3).tags
    assert (
        tags["promotion.decision"] == "keep" and json.loads(tags["promotion.reasons"]) == d3.reasons
    )
    # better overall but platelets collapse beyond the tolerance: kept
    v4, d4 = reg(fake_metrics(0.50, {"RBC": 0.60, "WBC": 0.50, "Platelets": 0.30}))
    assert not d4.promote and any("Platelets PQ drops by 0.1500" in r for r in d4.reasons)
    v5, d5 = reg(fake_metrics(0.10), force=True)
    assert d5.forced and client.get_model_version(model_name, v5).tags["promotion.forced"] == "true"
    assert client.get_model_version_by_alias(model_name, CHAMPION).version == v5
    versions = {v.version for v in client.search_model_versions(f"name='{model_name}'")}
    assert versions == {v1, v2, v3, v4, v5}  # never deleted


LOGGER = """
import sys, mlflow
mlflow.set_tracking_uri(sys.argv[1])
client = mlflow.MlflowClient()
for step in range(40):
    client.log_metric(sys.argv[2], sys.argv[3], float(step), step=step)
"""


def test_two_processes_logging_to_one_run_lose_nothing(mlflow_uri):
    run_id = new_run()
    procs = [
        subprocess.Popen([sys.executable, "-c", LOGGER, mlflow_uri, run_id, name])
        for name in ("loss_a", "loss_b")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    client = mlflow.MlflowClient()
    for name in ("loss_a", "loss_b"):
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == list(range(40))
