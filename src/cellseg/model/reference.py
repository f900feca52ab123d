"""Model references: a checkpoint file, a training folder, or an MLflow URI, resolved to the
checkpoint file they name.

``models:/cellseg@champion``, ``models:/cellseg/3`` and ``runs:/<id>/model`` are downloaded with
MLflow (imported only then) and resolved to the checkpoint the registered model carries; so is
a folder that holds a downloaded MLflow model (its ``MLmodel`` file).
"""

from __future__ import annotations

from pathlib import Path

from cellseg.model.checkpoint import find_checkpoint

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def resolve_checkpoint(model_ref: str) -> Path:
    if str(model_ref).startswith(MLFLOW_SCHEMES):
        import mlflow

        return mlflow_model_checkpoint(
            Path(mlflow.artifacts.download_artifacts(artifact_uri=str(model_ref)))
        )
    if (Path(model_ref) / "MLmodel").is_file():  # a downloaded model (KServe's /mnt/models)
        return mlflow_model_checkpoint(Path(model_ref))
    return find_checkpoint(Path(model_ref))


def mlflow_model_checkpoint(local: Path) -> Path:
    found = sorted(local.rglob("*.pt"))  # a registered model carries its one checkpoint
    return found[0] if len(found) == 1 else find_checkpoint(local / "artifacts")
