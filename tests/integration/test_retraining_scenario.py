"""Scheduled retraining, end to end on real BCCD images (a tiny subset, the tiny test model):

revision 1 (some images held out, ``dvc add``ed, its md5 in data.dvc) -> a run -> champion;
revision 2 (the full subset, a new md5) -> a run with ``data_md5=""`` as a schedule sends ->
conversion runs again on the new md5, both models are scored on revision 2's test split, the
gate decides on those two fresh results; ``cellseg compare`` shows both runs with their md5.
The KFP UI outputs (confusion matrix, HTML report, the gate's Markdown) are checked as kfp.local
writes them.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from cellseg.data.source import read_dvc_pointer
from cellseg.registry.champion import CHAMPION
from cellseg.registry.compare import compare
from cellseg.settings import REGISTERED_MODEL as MODEL_NAME
from pipelines.run_local import executor_output, run_local, summary
from tests.conftest import TINY

pytestmark = [pytest.mark.integration, pytest.mark.data]
SPLITS = {"train": 6, "val": 2, "test": 3}  # revision 2; revision 1 lacks the last of train/test
HELD_OUT = {"train": 2, "test": 1}


def sh(*args: str, cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return result.stdout


def stems(bccd: Path, split: str, n: int) -> list[str]:
    return (bccd / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[:n]


def write_revision(bccd: Path, dest: Path, splits: dict[str, list[str]]) -> None:
    """A VOC folder holding exactly the images of ``splits`` (the previous revision replaced)."""
    shutil.rmtree(dest, ignore_errors=True)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (dest / sub).mkdir(parents=True)
    for split, names in splits.items():
        (dest / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in names))
        for s in names:
            shutil.copy(bccd / "Annotations" / f"{s}.xml", dest / "Annotations")
            shutil.copy(bccd / "JPEGImages" / f"{s}.jpg", dest / "JPEGImages")


def dvc_add(repo: Path, dvc: str) -> str:
    """``dvc add data/BCCD``, its pointer kept as the project keeps it (data.dvc at the root,
    path data/BCCD: the first time it is moved there, later DVC updates it in place); ``dvc
    status`` then checks the pointer against the files. Returns the pointer's md5."""
    sh(dvc, "add", "-q", "data/BCCD", cwd=repo)
    created = repo / "data" / "BCCD.dvc"
    if created.is_file():
        pointer = yaml.safe_load(created.read_text())
        pointer["outs"][0]["path"] = "data/BCCD"
        (repo / "data.dvc").write_text(yaml.safe_dump(pointer, sort_keys=False))
        created.unlink()
    status = sh(dvc, "status", "data.dvc", cwd=repo)
    assert "changed" not in status and "not in cache" not in status, status
    return read_dvc_pointer(repo / "data.dvc").md5


def registered(run_dir: Path) -> dict:
    return executor_output(run_dir, "register")["artifacts"]["registered"]["artifacts"][0][
        "metadata"
    ]


def test_a_new_data_revision_retrains_rescores_the_champion_and_gates_like_with_like(
    tmp_path, bccd_source
):
    dvc = str(Path(sys.executable).parent / "dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    sh(dvc, "init", "-q", cwd=repo)
    full = {split: stems(bccd_source, split, n) for split, n in SPLITS.items()}
    rev1 = {s: names[: len(names) - HELD_OUT.get(s, 0)] for s, names in full.items()}
    source = repo / "data" / "BCCD"
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"  # a registry of its own
    settings = [*TINY, "epochs=1"]

    # revision 1 -> a run pinned to data.dvc's md5 (as `make pipeline-run` does) -> champion
    write_revision(bccd_source, source, rev1)
    md5_1 = dvc_add(repo, dvc)
    run1 = run_local(source, tmp_path / "kfp", "local", settings, uri, data_md5=md5_1)
    reg1 = registered(run1)
    assert reg1["promote"] and reg1["champion_version"] == ""  # the first model
    client = mlflow.MlflowClient(uri)
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == reg1["version"]

    # revision 2 (the held-out images back): a new md5; the scheduled run asks for none
    write_revision(bccd_source, source, full)
    md5_2 = dvc_add(repo, dvc)
    assert md5_2 != md5_1
    run2 = run_local(source, tmp_path / "kfp", "local", settings, uri, data_md5="")

    # conversion ran again, on the new revision (its cache key, the md5, changed)
    convert = executor_output(run2, "convert")["artifacts"]["dataset"]["artifacts"][0]
    assert convert["metadata"]["data_md5"] == md5_2
    manifest = json.loads((run2 / "convert" / "dataset" / "manifest.json").read_text())
    assert {s: v["images"] for s, v in manifest["splits"].items()} == SPLITS

    # both models scored on revision 2's test split
    challenger = json.loads((run2 / "evaluate" / "report_files" / "metrics.json").read_text())
    champion_file = run2 / "score-champion" / "champion_score" / "champion_score.json"
    baseline = json.loads(champion_file.read_text())
    assert baseline["version"] == reg1["version"] and not baseline["error"]
    assert challenger["images"] == baseline["metrics"]["images"] == SPLITS["test"]

    # the gate decided on those two numbers, and says so on the version
    reg2 = registered(run2)
    assert reg2["champion_version"] == reg1["version"]
    assert reg2["champion_test_pq"] == pytest.approx(baseline["metrics"]["pq"])
    assert reg2["test_pq"] == pytest.approx(challenger["pq"])
    if challenger["pq"] <= baseline["metrics"]["pq"]:
        assert not reg2["promote"] and "does not beat" in reg2["reasons"][0]
    tags = client.get_model_version(MODEL_NAME, reg2["version"]).tags
    assert tags["gate.data_md5"] == md5_2 and tags["gate.champion_version"] == reg1["version"]
    # a version tag carries 6 decimals (registry.metric_tags), the baseline file the full float
    tagged = float(tags["gate.champion_test_pq"])
    assert tagged == pytest.approx(baseline["metrics"]["pq"], abs=1e-6)
    champion = str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version)
    assert champion == (reg2["version"] if reg2["promote"] else reg1["version"])
    text = summary(run2, uri)
    assert f"v{reg1['version']}" in text and f"v{reg2['version']}" in text

    # `make compare`: both runs, each with its data md5
    table = compare(5, None, None, uri)
    runs = table.split("Registry:")[0]
    assert md5_1 in runs and md5_2 in runs, table

    # what the KFP run page shows: confusion matrix, HTML report with overlays, the decision
    evaluated = executor_output(run2, "evaluate")["artifacts"]
    matrix = evaluated["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    labels = [s["displayName"] for s in matrix["annotationSpecs"]]
    assert labels == ["RBC", "WBC", "Platelets", "background"]
    assert sum(map(sum, (r["row"] for r in matrix["rows"]))) > 0
    html = (run2 / "evaluate" / "report_html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # confusion, PR curves, best and worst
    decision = (run2 / "register" / "decision").read_text()
    assert f"v{reg1['version']}" in decision and md5_2 in decision
    assert all(reason in decision for reason in reg2["reasons"])
