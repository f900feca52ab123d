"""The start-run step: the pipeline run's parent MLflow run, created before any step runs beside
another and handed on to every step that logs (two steps that each searched for it, then
created it, could make two)."""

from __future__ import annotations

from cellseg.registry import tracking


def start_run_step(
    pipeline_run_id: str,
    tags: dict,
    mlflow_uri: str | None,
    data_repo: str = "",
    data_rev: str = "",
    data_commit: str = "",
) -> str:
    """The parent run's id (found again when the step is retried), tagged with the data's
    repository (without credentials), revision and commit when it was pulled by revision."""
    from cellseg.data.revision import shown

    data = {"repo": shown(data_repo), "rev": data_rev, "commit": data_commit}
    tags = {**tags, **{f"cellseg.data_{k}": v for k, v in data.items()}}
    parent = tracking.start_parent(pipeline_run_id, tags, mlflow_uri or None)
    print(f"pipeline run {pipeline_run_id}: MLflow parent run {parent}")
    return parent
