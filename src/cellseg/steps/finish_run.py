"""The finish-run step, the pipeline's exit handler: it runs however the run ended (succeeded,
failed, or cancelled where the backend still runs exit handlers) and leaves nothing half-done:
the parent MLflow run FINISHED or FAILED (with the failed steps and the error), the run's
scratch folder on the checkpoints volume deleted, and one line that says so."""

from __future__ import annotations

import shutil
from pathlib import Path

from cellseg.cluster.client import run_scratch
from cellseg.registry import tracking

# The final state KFP hands an exit handler when the run succeeded: kfp.local writes
# "SUCCEEDED" (kfp/local/orchestrator/orchestrator_utils.py, kfp 2.17.3); the backend's driver
# writes the exit-handler group's MLMD execution state, "COMPLETE" (backend/src/v2/driver/
# resolve.go, tag 2.17.0). Neither names the failed task or its error: the MLflow runs do.
SUCCEEDED_STATES = ("SUCCEEDED", "COMPLETE")


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def finish_run_step(
    pipeline_run_id: str,
    state: str,
    error: str,
    mlflow_uri: str | None,
    scratch: Path | None = None,
) -> str:
    """End the run; returns the one-line summary (also printed).

    Args:
        state: the run's final state as KFP reports it (:data:`SUCCEEDED_STATES`, else failed).
        error: KFP's error message, when it gives one.
        scratch: the run's scratch folder (default: the checkpoints volume's, on a cluster).
    """
    succeeded = state in SUCCEEDED_STATES
    parts = [f"pipeline run {pipeline_run_id}: {state}"]
    try:
        ending = tracking.finish_parent(pipeline_run_id, succeeded, error, mlflow_uri or None)
        if ending.failed_steps:
            parts.append(f"failed: {', '.join(ending.failed_steps)}")
        if error and not succeeded:
            parts.append(error.strip().splitlines()[0])
        if ending.parent:
            parts.append(f"MLflow run {ending.parent} {ending.status}")
    finally:  # the scratch goes even when MLflow cannot be reached
        parts.append(remove_scratch(scratch or run_scratch(pipeline_run_id)))
    line = "; ".join(p for p in parts if p)
    print(line)
    return line


def remove_scratch(scratch: Path | None) -> str:
    """Delete the run's ``scratch`` folder; what was done, in words ("" for nothing)."""
    if scratch is None or not scratch.exists():
        return ""
    size = folder_size(scratch)
    try:
        shutil.rmtree(scratch)
    except OSError as err:  # a cancelled job's pod may still be writing into it
        return f"could not remove all of {scratch} ({err.strerror or err})"
    return f"removed {scratch} ({size / 1e9:.1f} GB)"
