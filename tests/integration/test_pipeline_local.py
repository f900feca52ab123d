"""The whole KFP pipeline under kfp.local on a few synthetic images, tiny model, 1 epoch."""

import json

import mlflow
import pytest

from cellseg.registry.champion import CHALLENGER, CHAMPION
from cellseg.registry.compare import compare, pipeline_runs, plot_history
from cellseg.settings import REGISTERED_MODEL as MODEL_NAME
from pipelines.run_local import run_local, summary
from tests.conftest import TINY, synthetic_samples, write_voc

pytestmark = pytest.mark.integration


def test_pipeline_produces_a_registered_model_a_report_and_a_comparison(
    sqlite_mlflow_uri, tmp_path
):
    mlflow_uri = sqlite_mlflow_uri  # the pipeline is the subject, not the store
    samples = synthetic_samples(8)
    stems = sorted(samples)
    voc = write_voc(
        tmp_path / "voc", samples, {"train": stems[:4], "val": stems[4:6], "test": stems[6:]}
    )
    run_dir = run_local(voc, tmp_path / "kfp", "local", [*TINY, "epochs=1"], mlflow_uri)

    report = run_dir / "evaluate" / "report_files"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["images"] == 2 and 0 <= metrics["pq"] <= 1
    assert (report / "report.md").is_file() and (report / "confusion.png").is_file()
    manifest = json.loads((run_dir / "convert" / "dataset" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["images"] == 4

    text = summary(run_dir, mlflow_uri)
    assert "Registry: cellseg version" in text and "box mAP50" in text
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    assert champion.tags["promotion.decision"] == "promote"

    # one parent run with the five steps nested under it, tagged for filtering
    parents = client.search_runs(
        [client.get_experiment_by_name("cellseg").experiment_id],
        filter_string="tags.`cellseg.profile` = 'local'",
    )
    steps = {r.data.tags.get("cellseg.step") for r in parents}
    assert {"phase1", "phase2", "tune", "evaluate", "register"} <= steps
    # the post-processing chosen on val: in the tune step's run, never below the model's own
    (tuned,) = [r for r in parents if r.data.tags.get("cellseg.step") == "tune"]
    assert tuned.data.params["postprocess.markers"] in ("slope", "sobel")
    assert tuned.data.metrics["val_box_map50_tuned"] >= tuned.data.metrics["val_box_map50_start"]
    tuning_files = {a.path for a in client.list_artifacts(tuned.info.run_id, "tuning")}
    assert tuning_files == {"tuning/tuning.md", "tuning/tuning.json"}
    assert all(r.data.tags["cellseg.data_md5"].endswith(".dir") for r in parents)
    phase1 = next(r for r in parents if r.data.tags.get("cellseg.step") == "phase1")
    # the exit handler ended the one parent run of this pipeline run
    pipeline_run = phase1.data.tags["cellseg.pipeline_run_id"]
    (parent,) = [r for r in parents if r.data.tags.get("cellseg.pipeline_parent") == pipeline_run]
    assert parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in parents if r.data.tags.get("cellseg.step"))
    # the splits as MLflow datasets: named, with the raw data's DVC md5 as digest
    inputs = client.get_run(phase1.info.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["bccd-train", "bccd-val"]
    assert {i.dataset.digest for i in inputs} == {manifest["source"]["dvc_md5"]}
    assert phase1.data.params["backbone"] == "test_vit" and "val_total" in phase1.data.metrics
    # the phase that shipped, in the checkpoint's metrics, both runs' tags and the summary
    chosen = metrics["chosen_phase"]
    assert chosen in (1, 2) and f"Phase {chosen}'s model" in text
    for step in ("phase2", "evaluate"):
        run = next(r for r in parents if r.data.tags.get("cellseg.step") == step)
        assert run.data.tags["cellseg.chosen_phase"] == str(chosen), step

    # a second run registers a challenger; `make compare` names both aliases
    run_local(voc, tmp_path / "kfp", "local", [*TINY, "epochs=1", "seed=1"], mlflow_uri)
    table = compare(5, None, tmp_path / "history.png", mlflow_uri)
    assert pipeline_run in table
    registry = table.split("Registry:")[1]
    rows = {line.split()[0]: line.split()[1] for line in registry.strip().splitlines()[2:]}
    champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version
    challenger = client.get_model_version_by_alias(MODEL_NAME, CHALLENGER).version
    assert int(challenger) == max(map(int, rows)), rows  # the newest version
    assert "champion" in rows[str(champion)].split(","), registry
    assert "challenger" in rows[str(challenger)].split(","), registry
    assert (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"
    runs = pipeline_runs(client, client.get_experiment_by_name("cellseg").experiment_id, 5)
    marked = plot_history(runs, tmp_path / "again.png", str(champion))
    ordered = sorted(runs, key=lambda r: r["start"])
    assert ordered[marked - 1]["version"] == str(champion)
