from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    report_files: Input[Artifact],
    champion_score: Input[Artifact],
    dataset: Input[Dataset],
    pipeline_run_id: str,
    run_tags: dict,
    mlflow_uri: str,
    mlflow_parent_run: str,
    tolerance: float,
    force: bool,
    registered: Output[Model],
    decision: Output[Markdown],
) -> bool:
    """Register the model in MLflow as ``challenger``; returns whether it should be champion
    (the gate against the champion as scored in this run); the decision as Markdown."""
    from pathlib import Path

    from cellseg.registry.gate import decision_markdown
    from cellseg.steps.register import register_step

    result = register_step(
        model=Path(model.path),
        metrics_path=Path(report_files.path) / "metrics.json",
        data=Path(dataset.path),
        pipeline_run_id=pipeline_run_id,
        tags=run_tags,
        mlflow_uri=mlflow_uri,
        parent_run=mlflow_parent_run,
        tolerance=tolerance,
        force=force,
        champion_dir=Path(champion_score.path),
        data_md5=dataset.metadata.get("data_md5", ""),
    )
    registered.metadata.update(result)
    Path(decision.path).write_text(decision_markdown(result))
    return result["promote"]
