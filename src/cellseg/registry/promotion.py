"""The registry's writes: log the model as an MLflow pyfunc, register it as ``challenger`` with
the gate's decision (:mod:`cellseg.registry.gate`), and move ``champion`` only through
:func:`promote`. Versions are never deleted.

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
from pathlib import Path

import numpy as np

from cellseg.errors import CellsegError
from cellseg.registry.champion import CHALLENGER, CHAMPION, ChampionScore, champion_version
from cellseg.registry.gate import Decision, decide, gate_tags, metric_tags
from cellseg.serving.payload import CELL_COLUMNS, MLFLOW_INPUT
from cellseg.settings import PROMOTION_TOLERANCE, REGISTERED_MODEL

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
LOCK_SUFFIX = "-promotion-lock"  # cellseg -> cellseg-promotion-lock
CHAMPION_MOVED = "champion moved during this run"


class PromotionError(CellsegError):
    """The promotion lock could not be taken in time."""


def example_input(image, side: int = 160):
    """The model's input example: one JPEG of a ``side`` x ``side`` crop of ``image`` (a few
    KB, where a full frame's pixel values are megabytes of JSON), in the input schema's
    column."""
    import cv2
    import pandas as pd

    crop = np.ascontiguousarray(image[:side, :side, ::-1])  # RGB -> the BGR OpenCV encodes
    ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise CellsegError("could not encode the input example as JPEG")
    return pd.DataFrame({MLFLOW_INPUT: [jpeg.tobytes()]})


def log_model(run_id: str, checkpoint: Path, example_image):
    """Log the pyfunc (its code from :data:`PYFUNC_CODE`, the checkpoint as an artifact) in
    ``run_id``; returns MLflow's ``ModelInfo`` (``model_uri``, ``model_id``)."""
    from importlib.metadata import version

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    # In: one binary column of encoded images (MLflow's UI, `mlflow models predict` and
    # MLServer read it); out: one row per cell. Pixel arrays stay accepted by the KServe
    # server (python -m cellseg.serving) and by the pyfunc called from code.
    inputs = Schema([ColSpec("binary", MLFLOW_INPUT)])
    types = {"class_name": "string", "score": "double"}
    outputs = Schema([ColSpec(types.get(c, "long"), c) for c in (*CELL_COLUMNS, "image")])
    client = mlflow.MlflowClient()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),  # models-from-code: this file, not a pickle
            artifacts={"checkpoint": str(checkpoint)},
            signature=ModelSignature(inputs=inputs, outputs=outputs),
            input_example=example_input(example_image),
            # The serving environment is the project image; naming it skips MLflow's slow
            # requirement inference (which loads the model in a subprocess).
            pip_requirements=[f"cellseg-kfp=={version('cellseg-kfp')}"],
        )
    client.update_run(run_id, status="RUNNING")  # start_run's exit ended it; the step ends it
    return info


def model_metrics(metrics: dict) -> dict[str, float]:
    """The evaluation's headline figures as the logged model's metrics: every top-level number,
    and each class's box AP@0.5 when present."""
    flat = {f"test_{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    for name, per_class in metrics.get("per_class", {}).items():
        if "box_ap50" in per_class:
            flat[f"test_box_ap50_{name}"] = float(per_class["box_ap50"])
    return flat


def register(
    run_id: str,
    checkpoint: Path,
    metrics: dict,
    example_image,
    name: str = REGISTERED_MODEL,
    tolerance: float = PROMOTION_TOLERANCE,
    force: bool = False,
    champion: ChampionScore | None = None,
    data_md5: str = "",
    test_dataset=None,
) -> tuple[str, Decision]:
    """Log and register a new version as ``challenger`` and decide (not yet move) ``champion``.
    ``metrics`` are logged against the logged model (MLflow 3's model page shows them), with
    ``test_dataset`` (an MLflow dataset) as what they were measured on.

    Args:
        champion: the champion re-scored on this run's test split
            (:func:`cellseg.registry.champion.score_champion`). None: there must be no champion
            (if there is one, the gate keeps the new version: it was not compared).
    """
    import mlflow

    client = mlflow.MlflowClient()
    if champion is None:  # never compare with a stored tag: an unscored champion blocks the gate
        current = champion_version(client, name)
        unscored = "not scored on this run's split"
        champion = ChampionScore(current, None, unscored) if current else ChampionScore()
    info = log_model(run_id, checkpoint, example_image)
    mlflow.log_metrics(
        model_metrics(metrics), run_id=run_id, model_id=info.model_id, dataset=test_dataset
    )
    version = str(mlflow.register_model(info.model_uri, name).version)
    tags = metric_tags(metrics)
    scored = metric_tags(champion.metrics) if champion.metrics else None
    error = champion.describe() if champion.unloadable else ""
    decision = decide(tags, scored, tolerance, force, error)
    tags |= gate_tags(version, tags, champion, data_md5)
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
    version: str, compared_with: str, name: str = REGISTERED_MODEL, force: bool = False
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
