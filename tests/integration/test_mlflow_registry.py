"""Registry and tracking against a real `mlflow server` (on SQLite and on PostgreSQL):
register, aliases, pyfunc, the gate on fresh scores, promotions that overlap."""

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellseg.classes import CLASS_NAMES
from cellseg.evaluation.evaluate import evaluate
from cellseg.evaluation.inference import Predictor
from cellseg.model.reference import resolve_checkpoint
from cellseg.registry.champion import CHALLENGER, CHAMPION, ChampionScore, score_champion
from cellseg.registry.promotion import CHAMPION_MOVED, LOCK_SUFFIX, promote, register
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
    sqlite_mlflow_uri, checkpoint, bccd_source, model_name
):
    mlflow_uri = sqlite_mlflow_uri  # the pyfunc and its serving: the store is not the subject
    image = np.asarray(
        Image.open(bccd_source / "JPEGImages" / "BloodImage_00000.jpg").convert("RGB")
    )
    version, decision = register(
        new_run(), checkpoint, fake_metrics(0.5), image[:64, :64], model_name
    )
    assert decision.promote and decision.reasons == ["first model: no champion yet"]
    promote(version, "", model_name)
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(model_name, CHAMPION).version == version
    assert client.get_model_version_by_alias(model_name, CHALLENGER).version == version

    # `cellseg predict --model models:/...@champion` resolves the same version's checkpoint
    local = resolve_checkpoint(f"models:/{model_name}@{CHAMPION}")
    assert local.read_bytes() == checkpoint.read_bytes()

    uri = f"models:/{model_name}@{CHAMPION}"
    model = mlflow.pyfunc.load_model(uri)
    jpeg = (bccd_source / "JPEGImages" / "BloodImage_00000.jpg").read_bytes()
    cells = model.predict(pd.DataFrame({"image": [jpeg]}))  # the input schema's binary column
    assert list(cells.columns[:4]) == ["instance_id", "category_id", "class_name", "score"]
    assert set(cells["class_name"]) <= set(CLASS_NAMES)
    assert (cells["x"] + cells["width"] <= 640).all() and (
        cells["y"] + cells["height"] <= 480
    ).all()

    # models-from-code: the version holds our source file and the checkpoint, no pickle
    folder = Path(mlflow.artifacts.download_artifacts(uri))
    files = [p.name for p in folder.rglob("*")]
    assert "pyfunc_model.py" in files and not [f for f in files if f.endswith(".pkl")], files
    # MLflow 3's model page: an input schema, a small example, the test metrics on the model
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.to_dict() == [
        {"type": "binary", "name": "image", "required": True}
    ]
    assert (folder / "serving_input_example.json").stat().st_size < 20_000
    logged = mlflow.get_logged_model(info.model_id)
    assert {m.key: m.value for m in logged.metrics}["test_pq"] == 0.5

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
        split = {"columns": ["image"], "data": [[base64.b64encode(jpeg).decode()]]}
        body = json.dumps({"dataframe_split": split}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            served = json.loads(answer.read())["predictions"]
        # docs/serving.md's curl line: the JPEG itself, base64, ~30x smaller than its pixel values
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


def champion_now(name: str) -> str:
    return mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).version


def test_promotion_gate_both_ways_and_forced(mlflow_uri, checkpoint, model_name):
    client = mlflow.MlflowClient()
    example = np.zeros((32, 32, 3), np.uint8)
    scores: dict[str, dict] = {}  # version -> its fresh metrics on "this run's" split

    def reg(metrics, force=False):
        champion = champion_now(model_name) if scores else ""
        baseline = ChampionScore(champion, scores.get(champion))
        version, decision = register(
            new_run(), checkpoint, metrics, example, model_name, tolerance=0.05, force=force,
            champion=baseline,
        )  # fmt: skip
        scores[version] = metrics
        if decision.promote:
            assert promote(version, champion, model_name, force=force).promote
        return version, decision

    v1, d1 = reg(fake_metrics(0.40))
    assert d1.promote  # the first model
    v2, d2 = reg(fake_metrics(0.45))  # better everywhere: promoted
    assert d2.promote and champion_now(model_name) == v2
    v3, d3 = reg(fake_metrics(0.44))  # worse: stays challenger
    assert not d3.promote and "does not beat" in d3.reasons[0]
    assert champion_now(model_name) == v2
    assert client.get_model_version_by_alias(model_name, CHALLENGER).version == v3
    tags = client.get_model_version(model_name, v3).tags
    assert (
        tags["promotion.decision"] == "keep" and json.loads(tags["promotion.reasons"]) == d3.reasons
    )
    assert tags["gate.champion_version"] == v2 and tags["gate.challenger_version"] == v3
    assert (
        tags["gate.champion_test_pq"] == "0.450000"
        and tags["gate.challenger_test_pq"] == "0.440000"
    )
    # better overall but platelets collapse beyond the tolerance: kept
    v4, d4 = reg(fake_metrics(0.50, {"RBC": 0.60, "WBC": 0.50, "Platelets": 0.30}))
    assert not d4.promote and any("Platelets PQ drops by 0.1500" in r for r in d4.reasons)
    v5, d5 = reg(fake_metrics(0.10), force=True)
    assert d5.forced and client.get_model_version(model_name, v5).tags["promotion.forced"] == "true"
    assert champion_now(model_name) == v5
    versions = {v.version for v in client.search_model_versions(f"name='{model_name}'")}
    assert versions == {v1, v2, v3, v4, v5}  # never deleted


def test_the_gate_decides_on_the_champions_fresh_score_not_its_stored_tag(
    mlflow_uri, checkpoint, dataset, model_name, tmp_path
):
    example = np.zeros((32, 32, 3), np.uint8)
    # v1 was registered on an older data revision, where its test PQ was 0.99
    v1, _ = register(new_run(), checkpoint, fake_metrics(0.99), example, model_name)
    promote(v1, "", model_name)

    # this run re-scores it on its own test split, with the checkpoint's saved post-processing
    baseline = score_champion(dataset, tmp_path / "champion", model_name)
    assert baseline.version == v1 and not baseline.error
    direct = evaluate(dataset, Predictor.from_checkpoint(checkpoint), tmp_path / "direct")
    assert baseline.metrics["pq"] == pytest.approx(direct["pq"])
    assert baseline.metrics["pq"] < 0.99

    # a challenger below the stored 0.99 but above the fresh score: the fresh score decides
    fresh = baseline.metrics["pq"]
    challenger = fake_metrics(
        fresh + 0.01, {c: baseline.metrics["per_class"][c]["pq"] for c in CLASS_NAMES}
    )
    challenger["pq"] = fresh + 0.01
    v2, decision = register(
        new_run(),
        checkpoint,
        challenger,
        example,
        model_name,
        champion=baseline,
        data_md5="abc.dir",
    )
    assert decision.promote, decision.reasons
    assert f"beats the champion's {fresh:.4f}" in decision.reasons[0]
    tags = mlflow.MlflowClient().get_model_version(model_name, v2).tags
    assert float(tags["gate.champion_test_pq"]) == pytest.approx(fresh, abs=1e-6)
    assert tags["gate.champion_version"] == v1 and tags["gate.challenger_version"] == v2
    assert tags["gate.data_md5"] == "abc.dir"


def test_an_unloadable_champion_is_named_in_one_line_and_only_force_promotes(
    mlflow_uri, checkpoint, dataset, model_name, tmp_path
):
    client = mlflow.MlflowClient()
    client.create_registered_model(model_name)
    run = new_run()  # a version whose artifacts are gone (the run never had them)
    gone = client.create_model_version(model_name, f"runs:/{run}/model", run_id=run)
    client.set_registered_model_alias(model_name, CHAMPION, gone.version)

    baseline = score_champion(dataset, tmp_path / "champion", model_name)
    assert baseline.version == gone.version and baseline.metrics is None
    assert baseline.error and "\n" not in baseline.error
    example = np.zeros((32, 32, 3), np.uint8)
    _, decision = register(
        new_run(), checkpoint, fake_metrics(0.5), example, model_name, champion=baseline
    )
    assert not decision.promote and len(decision.reasons) == 1
    assert f"champion v{gone.version} could not be loaded" in decision.reasons[0]
    assert "only force_promote promotes" in decision.reasons[0]
    forced, decision = register(
        new_run(), checkpoint, fake_metrics(0.5), example, model_name, champion=baseline,
        force=True,
    )  # fmt: skip
    assert decision.promote and decision.forced
    assert promote(forced, baseline.version, model_name, force=True).promote
    assert champion_now(model_name) == forced


def test_two_overlapping_promotions_cannot_both_win(mlflow_uri, checkpoint, model_name):
    """Two runs compared against v1 and both passed their gate; they promote at the same moment:
    exactly one moves ``champion``, the other stays challenger with the reason. Before the lock,
    both moved it and the later one overwrote the other."""
    example = np.zeros((32, 32, 3), np.uint8)
    v1, _ = register(new_run(), checkpoint, fake_metrics(0.40), example, model_name)
    promote(v1, "", model_name)
    old = ChampionScore(v1, fake_metrics(0.40))
    a, da = register(new_run(), checkpoint, fake_metrics(0.50), example, model_name, champion=old)
    b, db = register(new_run(), checkpoint, fake_metrics(0.60), example, model_name, champion=old)
    assert da.promote and db.promote  # each beats v1

    start, results = threading.Barrier(2), {}

    def run(version):
        start.wait()
        results[version] = promote(version, v1, model_name)

    threads = [threading.Thread(target=run, args=(v,)) for v in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    moved = [v for v, d in results.items() if d.promote]
    kept = [v for v, d in results.items() if not d.promote]
    assert len(moved) == 1 and len(kept) == 1, results
    assert champion_now(model_name) == moved[0]
    assert results[kept[0]].reasons[0].startswith(CHAMPION_MOVED)
    tags = mlflow.MlflowClient().get_model_version(model_name, kept[0]).tags
    assert tags["promotion.decision"] == "keep"
    assert json.loads(tags["promotion.reasons"])[0].startswith(CHAMPION_MOVED)

    # a third run, also compared against v1, finishes later: it does not overwrite either
    c, dc = register(new_run(), checkpoint, fake_metrics(0.70), example, model_name, champion=old)
    assert dc.promote and not promote(c, v1, model_name).promote
    assert champion_now(model_name) == moved[0]
    # the lock is released every time
    lock = f"{model_name}{LOCK_SUFFIX}"
    assert not mlflow.MlflowClient().search_registered_models(f"name = '{lock}'")


def test_a_lock_left_by_a_crashed_step_is_taken_over(mlflow_uri, checkpoint, model_name):
    client = mlflow.MlflowClient()
    example = np.zeros((32, 32, 3), np.uint8)
    client.create_registered_model(
        f"{model_name}{LOCK_SUFFIX}", tags={"holder": "crashed", "since": "0"}
    )
    v1, _ = register(new_run(), checkpoint, fake_metrics(0.40), example, model_name)
    assert promote(v1, "", model_name).promote
    assert champion_now(model_name) == v1
