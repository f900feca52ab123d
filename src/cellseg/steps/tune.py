"""The tune step: the post-processing chosen on the val split (:mod:`cellseg.evaluation.tune`),
written into the model the later steps evaluate, register and serve; the choice and every
trial logged to MLflow."""

from __future__ import annotations

from pathlib import Path

from cellseg.registry import tracking


def tune_step(
    data: Path,
    model: Path,
    out: Path,
    pipeline_run_id: str,
    tags: dict,
    mlflow_uri: str | None,
    parent_run: str = "",
    budget_seconds: float = 0.0,
) -> dict:
    """Tune ``model`` on ``data``'s val split into ``out``; ``budget_seconds`` 0: the default."""
    from cellseg.evaluation.tune import params_dict, tune
    from cellseg.runtime import match_torch_threads

    with tracking.step_run(
        "tune", pipeline_run_id, tags, mlflow_uri or None, parent=parent_run
    ) as tracker:
        tracking.log_datasets(tracker.run_id, data, ("val",))
        match_torch_threads()  # the pod's CPU limit, not the node's core count
        budget = {"budget_seconds": budget_seconds} if budget_seconds > 0 else {}
        tuning = tune(model, data, out, **budget)
        tracker.log_params({f"postprocess.{k}": v for k, v in params_dict(tuning.chosen).items()})
        tracker.log_metrics({
            "val_box_map50_start": tuning.start_score,
            "val_box_map50_tuned": tuning.best_score,
            "tune_trials": len(tuning.trials),
            "tune_seconds": tuning.seconds,
        })  # fmt: skip
        for name in ("tuning.md", "tuning.json"):
            tracker.log_artifact(Path(out) / name, "tuning")
    return tuning.as_dict()
