"""Model registry: log the model as an MLflow pyfunc, register it as ``challenger``, and move
``champion`` only through the promotion gate. Versions are never deleted.

The gate: the challenger becomes champion when it beats the champion's test PQ and no class's PQ
drops by more than ``tolerance``; the first model becomes champion; a forced promotion is allowed
and recorded as forced. The decision and its reasons are tags on the version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cellseg.classes import CLASS_NAMES

MODEL_NAME = "cellseg"
SERVING_CODE = Path(__file__).with_name("serving_model.py")
CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    forced: bool = False


def metric_tags(metrics: dict) -> dict[str, str]:
    """The figures the gate compares, as version tags (``test_pq``, ``test_pq_RBC``, ...)."""
    tags = {"test_pq": metrics["pq"], "test_box_map50": metrics["box_map50"]}
    tags.update({f"test_pq_{c}": metrics["per_class"][c]["pq"] for c in CLASS_NAMES})
    return {k: f"{float(v):.6f}" for k, v in tags.items()}


def decide(
    challenger: dict[str, str], champion: dict[str, str] | None, tolerance: float, force: bool
) -> Decision:
    """Compare two versions' metric tags (see :func:`metric_tags`)."""
    if force:
        return Decision(True, ["forced promotion"], forced=True)
    if champion is None:
        return Decision(True, ["first model: no champion yet"])
    new, old = float(challenger["test_pq"]), float(champion["test_pq"])
    reasons = []
    if new <= old:
        reasons.append(f"test PQ {new:.4f} does not beat the champion's {old:.4f}")
    for c in CLASS_NAMES:
        drop = float(champion[f"test_pq_{c}"]) - float(challenger[f"test_pq_{c}"])
        if drop > tolerance:
            reasons.append(f"{c} PQ drops by {drop:.4f} (tolerance {tolerance:.4f})")
    if reasons:
        return Decision(False, reasons)
    return Decision(True, [f"test PQ {new:.4f} beats the champion's {old:.4f}"])


CELL_COLUMNS = (
    "instance_id",
    "category_id",
    "class_name",
    "score",
    "x",
    "y",
    "width",
    "height",
    "area",
)


def instance_rows(inst) -> list[dict]:
    """One dict per instance (:data:`CELL_COLUMNS`): id, class, score, box and area."""
    import numpy as np
    from scipy import ndimage

    labels = np.ascontiguousarray(inst.labels)
    areas = np.bincount(labels.ravel())
    rows = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:  # an id with no pixel left (after resizing)
            continue
        rows_, cols = box
        cls = int(inst.classes[i - 1])
        rows.append(
            {
                "instance_id": i,
                "category_id": cls,
                "class_name": CLASS_NAMES[cls - 1],
                "score": float(inst.scores[i - 1]),
                "x": cols.start,
                "y": rows_.start,
                "width": cols.stop - cols.start,
                "height": rows_.stop - rows_.start,
                "area": int(areas[i]),
            }
        )
    return rows


def instances_table(inst, pd):
    """A DataFrame with one row per instance (:func:`instance_rows`)."""
    return pd.DataFrame(instance_rows(inst), columns=list(CELL_COLUMNS))


def log_model(run_id: str, checkpoint: Path, example_image) -> str:
    """Log the pyfunc (its code from :data:`SERVING_CODE`, the checkpoint as an artifact) in
    ``run_id``; returns its model URI."""
    from importlib.metadata import version

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    # Outputs only: the input is pixels or encoded images (see serving_model.py), which one
    # input schema cannot say, and the model checks its input itself. (A signature also keeps
    # MLflow from inferring one by running the model on the example.)
    types = {"class_name": "string", "score": "double"}
    outputs = Schema([ColSpec(types.get(c, "long"), c) for c in (*CELL_COLUMNS, "image")])
    signature = ModelSignature(outputs=outputs)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE),  # models-from-code: this file, not a pickle
            artifacts={"checkpoint": str(checkpoint)},
            signature=signature,
            input_example=example_image,
            # The serving environment is the project image; naming it skips MLflow's slow
            # requirement inference (which loads the model in a subprocess).
            pip_requirements=[f"cellseg-kfp=={version('cellseg-kfp')}"],
        )
    return info.model_uri


def champion_tags(client, name: str) -> dict[str, str] | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION).tags
    except MlflowException:
        return None


def register(
    run_id: str,
    checkpoint: Path,
    metrics: dict,
    example_image,
    name: str = MODEL_NAME,
    tolerance: float = 0.02,
    force: bool = False,
) -> tuple[str, Decision]:
    """Log and register a new version as ``challenger`` and decide (not yet move) ``champion``."""
    import mlflow

    client = mlflow.MlflowClient()
    model_uri = log_model(run_id, checkpoint, example_image)
    version = mlflow.register_model(model_uri, name).version
    tags = metric_tags(metrics)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, CHALLENGER, version)
    decision = decide(tags, champion_tags(client, name), tolerance, force)
    client.set_model_version_tag(
        name, version, "promotion.decision", "promote" if decision.promote else "keep"
    )
    client.set_model_version_tag(name, version, "promotion.reasons", json.dumps(decision.reasons))
    client.set_model_version_tag(name, version, "promotion.forced", str(decision.forced).lower())
    return str(version), decision


def promote(version: str, name: str = MODEL_NAME) -> None:
    """Move ``champion`` to ``version`` (the gate has already decided)."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion.champion", "true")
