"""The score-champion step: the current champion, with its own post-processing, scored on this
run's test split, so the gate compares two fresh results."""

from __future__ import annotations

from pathlib import Path

from cellseg.registry import tracking
from cellseg.settings import REGISTERED_MODEL


def score_champion_step(
    data: Path,
    out: Path,
    pipeline_run_id: str,
    tags: dict,
    mlflow_uri: str | None,
    parent_run: str = "",
) -> dict:
    """The champion's score (``champion_score.json``) and its report in ``out``."""
    from cellseg.registry.champion import score_champion

    with tracking.step_run(
        "score-champion", pipeline_run_id, tags, mlflow_uri or None, parent=parent_run
    ) as tracker:
        champion = score_champion(Path(data), Path(out) / "report", REGISTERED_MODEL)
        champion.write(Path(out))
        tracker.set_tags({"cellseg.champion_version": champion.version or "none"})
        if champion.metrics:
            flat = tracking.flat_metrics(champion.metrics)
            tracker.log_metrics({f"champion_{k}": v for k, v in flat.items()})
        elif champion.error:
            tracker.set_tags({"cellseg.champion_error": champion.error})
    print(champion.describe())
    return {"version": champion.version, "error": champion.error}
