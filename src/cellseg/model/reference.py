"""Model references: a checkpoint file, a training folder, or an MLflow URI, resolved to the
checkpoint file they name.

``models:/cellseg@champion``, ``models:/cellseg/3`` and ``runs:/<id>/model`` are downloaded with
MLflow (imported only then) and resolved to the checkpoint the registered model carries; so is
a folder that holds a downloaded MLflow model (its ``MLmodel`` file).
"""

from __future__ import annotations

from pathlib import Path

from cellseg.errors import CheckpointError
from cellseg.model.checkpoint import find_checkpoint

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_mlflow_reference(model_ref: str | Path) -> bool:
    return str(model_ref).startswith(MLFLOW_SCHEMES)


def resolve_checkpoint(model_ref: str) -> Path:
    """The checkpoint file ``model_ref`` names; an MLflow URI is looked up in the tracking
    store MLflow is pointed at (the caller's choice), and one that names nothing there is a
    one-line :class:`CheckpointError` naming the store."""
    if is_mlflow_reference(model_ref):
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=str(model_ref))
        except MlflowException as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{model_ref}: not found in the MLflow store {mlflow.get_tracking_uri()} "
                f"({first}); set MLFLOW_TRACKING_URI to the store that holds it"
            ) from None
        return mlflow_model_checkpoint(Path(local))
    if (Path(model_ref) / "MLmodel").is_file():  # a downloaded model (KServe's /mnt/models)
        return mlflow_model_checkpoint(Path(model_ref))
    return find_checkpoint(Path(model_ref))


def mlflow_model_checkpoint(local: Path) -> Path:
    found = sorted(local.rglob("*.pt"))  # a registered model carries its one checkpoint
    return found[0] if len(found) == 1 else find_checkpoint(local / "artifacts")
