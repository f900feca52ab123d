"""The register step: the model registered as ``challenger`` with the gate's decision, taken
against the champion as scored on this run's split."""

from __future__ import annotations

import json
from pathlib import Path

from cellseg.model.checkpoint import find_checkpoint
from cellseg.registry import tracking
from cellseg.settings import PROMOTION_TOLERANCE


def register_step(
    *,
    model: Path,
    metrics_path: Path,
    data: Path,
    pipeline_run_id: str,
    tags: dict,
    mlflow_uri: str | None,
    tolerance: float = PROMOTION_TOLERANCE,
    force: bool = False,
    champion_dir: Path | None = None,
    data_md5: str = "",
    parent_run: str = "",
) -> dict:
    """Register the model and return the promotion decision; ``champion_dir`` holds the
    score-champion step's output (None: no champion was scored, so none may exist)."""
    from cellseg.data.arrays import load_sample
    from cellseg.data.manifest import split_files
    from cellseg.registry.champion import ChampionScore
    from cellseg.registry.promotion import register

    metrics = json.loads(Path(metrics_path).read_text())
    champion = ChampionScore.read(champion_dir) if champion_dir else None
    example = load_sample(Path(data), split_files(Path(data), "test", 1)[0])["image"]
    with tracking.step_run(
        "register", pipeline_run_id, tags, mlflow_uri or None, parent=parent_run
    ) as tracker:
        version, decision = register(
            tracker.run_id,
            find_checkpoint(Path(model)),
            metrics,
            example,
            tolerance=tolerance,
            force=force,
            champion=champion,
            data_md5=data_md5,
            test_dataset=tracking.split_dataset(Path(data), "test"),
        )
        tracker.set_tags(
            {
                "cellseg.model_version": version,
                "cellseg.promote": decision.promote,
                "cellseg.data_md5": data_md5 or tags.get("cellseg.data_md5", ""),
            }
        )
    champion = champion or ChampionScore()
    return {
        "version": version,
        "promote": decision.promote,
        "forced": decision.forced,
        "reasons": decision.reasons,
        "data_md5": data_md5,
        "test_pq": metrics["pq"],
        "champion_version": champion.version,
        "champion_test_pq": champion.metrics["pq"] if champion.metrics else None,
        "champion_error": champion.error,
    }
