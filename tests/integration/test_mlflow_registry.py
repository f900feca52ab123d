"""Registry and tracking against a real `mlflow server`: register, aliases, pyfunc, gate."""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from cellseg.classes import CLASS_NAMES
from cellseg.ops.model_ref import resolve_checkpoint
from cellseg.ops.registry import CHALLENGER, CHAMPION, promote, register
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration


def wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(process.stderr.read()) from None
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {seconds} s")


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

    uri = f"models:/{model_name}@{CHAMPION}"
    model = mlflow.pyfunc.load_model(uri)
    cells = model.predict(image)
    assert list(cells.columns[:4]) == ["instance_id", "category_id", "class_name", "score"]
    assert set(cells["class_name"]) <= set(CLASS_NAMES)
    assert (cells["x"] + cells["width"] <= 640).all() and (
        cells["y"] + cells["height"] <= 480
    ).all()

    # models-from-code: the version holds our source file and the checkpoint, no pickle
    files = [p.name for p in Path(mlflow.artifacts.download_artifacts(uri)).rglob("*")]
    assert "serving_model.py" in files and not [f for f in files if f.endswith(".pkl")], files

    # `mlflow models serve` answers an HTTP request with the same rows as the loaded model
    # (as `make serve` does: the venv's bin first on PATH, where MLflow looks for uvicorn)
    bin_dir = Path(sys.executable).parent
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    serve = [str(bin_dir / "mlflow"), "models", "serve", "-m", uri]
    server = subprocess.Popen(
        [*serve, "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, seconds=180)
        body = json.dumps({"inputs": image.tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            served = json.loads(answer.read())["predictions"]
        # the README's curl line: the JPEG itself, base64, ~30x smaller than its pixel values
        jpeg = (bccd_source / "JPEGImages" / "BloodImage_00000.jpg").read_bytes()
        body = json.dumps({"inputs": [base64.b64encode(jpeg).decode()] * 2}).encode()
        request.data = body
        with urllib.request.urlopen(request, timeout=120) as answer:
            encoded = json.loads(answer.read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert len(served) == len(cells)  # one row per cell
    assert [r["class_name"] for r in served] == list(cells["class_name"])
    assert [r["area"] for r in served] == list(cells["area"])
    # two encoded images in one request: each image's rows, tagged by its index
    for i in (0, 1):
        assert [r["area"] for r in encoded if r["image"] == i] == list(cells["area"])


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
