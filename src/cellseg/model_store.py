"""Model references: a checkpoint file, a training folder, or an MLflow URI.

``models:/cellseg@champion``, ``models:/cellseg/3`` and ``runs:/<id>/model`` are downloaded with
MLflow (imported only then) and resolved to the checkpoint the registered model carries.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_NAMES = ("best_phase2.pt", "latest_phase2.pt", "best_phase1.pt", "latest_phase1.pt")
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file, or the most advanced one in a folder (Phase 2 best first)."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.rglob("*.pt"))
        if found:
            return found[0]
    raise FileNotFoundError(f"{path}: no checkpoint (expected a .pt file or a training folder)")


def resolve_checkpoint(model_ref: str) -> Path:
    if str(model_ref).startswith(MLFLOW_SCHEMES):
        import mlflow

        local = mlflow.artifacts.download_artifacts(artifact_uri=str(model_ref))
        return find_checkpoint(Path(local))
    return find_checkpoint(Path(model_ref))


def load_predictor(model_ref: str, device: str = "cpu"):
    from cellseg.inference import Predictor

    return Predictor.from_checkpoint(resolve_checkpoint(model_ref), device)
