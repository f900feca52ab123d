"""Model registry: log the model as an MLflow pyfunc, register it as ``challenger``, and move
``champion`` only through the promotion gate. Versions are never deleted.

The gate compares two fresh results on the same test split: the challenger's, and the current
champion's re-scored in the same run (:mod:`cellseg.ops.baseline`), never a stored tag from an
older data revision. The challenger becomes champion when it beats the champion's PQ and no
class's PQ drops by more than ``tolerance``; the first model becomes champion; a champion that
cannot be loaded keeps the challenger out unless the promotion is forced (recorded as forced).
The decision, its reasons, both scores, both version numbers and the data md5 are version tags.

Promotion moves ``champion`` only if it still points to the version the gate compared against,
checked and set under a lock (a registered model used as a compare-and-set token), so two
overlapping runs cannot both win against the same old champion.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cellseg.classes import CLASS_NAMES
from cellseg.errors import CellsegError
from cellseg.ops.baseline import Baseline, champion_version

MODEL_NAME = "cellseg"
SERVING_CODE = Path(__file__).with_name("serving_model.py")
CHAMPION, CHALLENGER = "champion", "challenger"
LOCK_SUFFIX = "-promotion-lock"  # cellseg -> cellseg-promotion-lock
CHAMPION_MOVED = "champion moved during this run"


class PromotionError(CellsegError):
    """The promotion lock could not be taken in time."""


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
    challenger: dict[str, str],
    champion: dict[str, str] | None,
    tolerance: float,
    force: bool,
    champion_error: str = "",
) -> Decision:
    """Compare two sets of metric tags (see :func:`metric_tags`) from the same test split.

    Args:
        champion: the champion's fresh tags; None when there is no champion (or it failed).
        champion_error: why the champion could not be scored; only ``force`` promotes then.
    """
    if force:
        return Decision(True, ["forced promotion", *([champion_error] if champion_error else [])],
                        forced=True)  # fmt: skip
    if champion_error:
        return Decision(False, [f"{champion_error}; only force_promote promotes"])
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


def gate_tags(version: str, tags: dict, baseline: Baseline, data_md5: str) -> dict[str, str]:
    """What the gate compared, on the new version: both scores, both versions, the data md5."""
    champion = metric_tags(baseline.metrics) if baseline.metrics else {}
    out = {
        "gate.data_md5": data_md5,
        "gate.challenger_version": version,
        "gate.challenger_test_pq": tags["test_pq"],
        "gate.champion_version": baseline.version,
        "gate.champion_test_pq": champion.get("test_pq", "unloadable" if baseline.error else ""),
    }
    out.update({f"gate.champion_{k}": v for k, v in champion.items() if k != "test_pq"})
    return out


def register(
    run_id: str,
    checkpoint: Path,
    metrics: dict,
    example_image,
    name: str = MODEL_NAME,
    tolerance: float = 0.02,
    force: bool = False,
    baseline: Baseline | None = None,
    data_md5: str = "",
) -> tuple[str, Decision]:
    """Log and register a new version as ``challenger`` and decide (not yet move) ``champion``.

    Args:
        baseline: the champion re-scored on this run's test split
            (:func:`cellseg.ops.baseline.score_champion`). None: there must be no champion
            (if there is one, the gate keeps the new version: it was not compared).
    """
    import mlflow

    client = mlflow.MlflowClient()
    if baseline is None:  # never compare with a stored tag: an unscored champion blocks the gate
        current = champion_version(client, name)
        baseline = Baseline(current, None, "not scored on this run's split") if current else None
    baseline = baseline or Baseline()
    model_uri = log_model(run_id, checkpoint, example_image)
    version = str(mlflow.register_model(model_uri, name).version)
    tags = metric_tags(metrics)
    champion = metric_tags(baseline.metrics) if baseline.metrics else None
    error = baseline.describe() if baseline.unloadable else ""
    decision = decide(tags, champion, tolerance, force, error)
    tags |= gate_tags(version, tags, baseline, data_md5)
    tags |= {
        "promotion.decision": "promote" if decision.promote else "keep",
        "promotion.reasons": json.dumps(decision.reasons),
        "promotion.forced": str(decision.forced).lower(),
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version, decision


@contextlib.contextmanager
def promotion_lock(client, name: str, timeout: float = 120.0, stale_after: float = 600.0):
    """Hold ``<name>-promotion-lock``: a registered model whose creation is the compare-and-set
    (the store refuses a second model of that name, atomically, on SQLite and PostgreSQL alike).

    A lock older than ``stale_after`` seconds is taken to be left by a crashed step (a promotion
    holds it well under a second) and removed.
    """
    from mlflow.exceptions import MlflowException

    lock, token = f"{name}{LOCK_SUFFIX}", uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(
                lock, tags={"holder": token, "since": f"{time.time():.3f}"},
                description=f"held while a pipeline step moves {name}@{CHAMPION}",
            )  # fmt: skip
            break
        except MlflowException:
            try:
                held = client.get_registered_model(lock)
            except MlflowException:
                continue  # released meanwhile: try again at once
            if held.tags.get("holder") == token:
                break  # our create went through, its answer did not
            if time.time() - float(held.tags.get("since", "0")) > stale_after:
                with contextlib.suppress(MlflowException):
                    client.delete_registered_model(lock)
                continue
            if time.monotonic() > deadline:
                msg = f"{lock} held by another step for over {timeout:.0f} s"
                raise PromotionError(msg) from None
            time.sleep(0.1 + random.random() * 0.2)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def promote(
    version: str, compared_with: str, name: str = MODEL_NAME, force: bool = False
) -> Decision:
    """Move ``champion`` to ``version`` if it still points to ``compared_with`` (the version the
    gate compared against; "" = none). Otherwise the new version stays challenger with the
    reason :data:`CHAMPION_MOVED`: it was never compared with the new champion, and re-gating
    would need that champion scored on this run's split, so the next run decides. A forced
    promotion moves ``champion`` whatever it points to (still under the lock)."""
    import mlflow

    client = mlflow.MlflowClient()
    with promotion_lock(client, name):
        current = champion_version(client, name)
        if current != str(compared_with) and not force:
            was = f"v{compared_with}" if compared_with else "no champion"
            reason = f"{CHAMPION_MOVED}: compared with {was}, champion is now v{current}"
            client.set_model_version_tag(name, version, "promotion.decision", "keep")
            client.set_model_version_tag(name, version, "promotion.reasons", json.dumps([reason]))
            return Decision(False, [reason])
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion.champion", "true")
    was = f"v{current}" if current else "none"
    return Decision(True, [f"champion moved from {was} to v{version}"], forced=force)
