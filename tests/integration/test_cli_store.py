"""The CLI and `make` find the same MLflow store: with no MLFLOW_TRACKING_URI, `cellseg
predict --model models:/...` reads the embedded store `make pipeline-run` writes
(`mlruns/mlflow.db`), and a reference that names nothing there is one line naming the store."""

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from PIL import Image

from cellseg.classes import CLASS_NAMES
from cellseg.registry.champion import CHAMPION
from cellseg.registry.promotion import promote, register
from cellseg.registry.tracking import configure, default_tracking_uri

pytestmark = pytest.mark.integration


def cellseg(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "cellseg.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def predict_champion(cwd):
    image = cwd / "cells.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(image)
    ref = f"models:/cellseg@{CHAMPION}"
    return cellseg("predict", image, "--model", ref, "--out", "preds", cwd=cwd)


def test_without_a_store_predict_says_where_it_looked_in_one_line(tmp_path):
    result = predict_champion(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cellseg predict: error: no MLflow store at {default_tracking_uri(tmp_path)} "
        "(`make pipeline-run` writes it in the project folder; run from there, or set "
        "MLFLOW_TRACKING_URI to the store that holds the model)"
    ]
    assert not (tmp_path / "mlruns").exists()  # nothing created


def test_a_model_uri_that_names_nothing_fails_in_one_line_naming_the_store(tmp_path):
    configure(default_tracking_uri(tmp_path))  # a store without the model
    result = predict_champion(tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (
        f"cellseg predict: error: models:/cellseg@{CHAMPION}: not found in the MLflow store "
        f"{default_tracking_uri(tmp_path)} (Registered Model with name=cellseg not found); "
        "set MLFLOW_TRACKING_URI to the store that holds it"
    )


def test_predict_finds_the_champion_in_the_embedded_store_without_a_tracking_uri(
    tmp_path, checkpoint, monkeypatch
):
    store = default_tracking_uri(tmp_path)  # what `make pipeline-run` writes, run from here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    experiment = configure(store)
    run = mlflow.MlflowClient().create_run(experiment).info.run_id
    metrics = {"pq": 0.5, "box_map50": 0.5, "per_class": {c: {"pq": 0.5} for c in CLASS_NAMES}}
    image = np.full((64, 64, 3), 200, np.uint8)
    version, _ = register(run, checkpoint, metrics, image, "cellseg")
    promote(version, "", "cellseg")
    result = predict_champion(tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "preds" / "results.json").is_file()
