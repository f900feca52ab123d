"""The evaluate step: test-split metrics, report and figures of the trained model, logged to
MLflow."""

from __future__ import annotations

from pathlib import Path

from cellseg.registry import tracking


def evaluate_step(
    data: Path,
    model: Path,
    out: Path,
    pipeline_run_id: str,
    tags: dict,
    mlflow_uri: str | None,
    parent_run: str = "",
) -> dict:
    from cellseg.evaluation.evaluate import evaluate
    from cellseg.evaluation.inference import load_predictor
    from cellseg.runtime import match_torch_threads

    with tracking.step_run(
        "evaluate", pipeline_run_id, tags, mlflow_uri or None, parent=parent_run
    ) as tracker:
        tracking.log_datasets(tracker.run_id, data, ("test",))
        match_torch_threads()  # the pod's CPU limit, not the node's core count
        predictor = load_predictor(model)  # auto: the GPU the step was given, if any
        metrics = evaluate(data, predictor, out, model_name=str(model))
        tracker.log_metrics(tracking.flat_metrics(metrics))
        if "chosen_phase" in metrics:
            tracker.set_tags({"cellseg.chosen_phase": metrics["chosen_phase"]})
        tracker.log_artifact(Path(out), "report")
    return metrics
