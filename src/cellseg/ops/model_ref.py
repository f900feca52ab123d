"""Model references, resolved at the edge (CLI, pipeline steps): a checkpoint file, a training
folder, or an MLflow URI.

``models:/cellseg@champion``, ``models:/cellseg/3`` and ``runs:/<id>/model`` are downloaded with
MLflow (imported only then) and resolved to the checkpoint the registered model carries.
"""

from __future__ import annotations

from pathlib import Path

from cellseg.model.checkpoint import find_checkpoint

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def resolve_checkpoint(model_ref: str) -> Path:
    if str(model_ref).startswith(MLFLOW_SCHEMES):
        import mlflow

        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(model_ref)))
        found = sorted(local.rglob("*.pt"))  # a registered model carries its one checkpoint
        return found[0] if len(found) == 1 else find_checkpoint(local / "artifacts")
    return find_checkpoint(Path(model_ref))


def load_predictor(model_ref: str, device: str = "auto"):
    """A :class:`~cellseg.evaluation.inference.Predictor` for ``model_ref``, on ``device``
    (``auto``: CUDA when present)."""
    from cellseg.evaluation.inference import Predictor

    return Predictor.from_checkpoint(resolve_checkpoint(model_ref), device)
