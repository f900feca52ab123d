from kfp import dsl
from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    pipeline_run_id: str,
    run_tags: dict,
    mlflow_uri: str,
    mlflow_parent_run: str,
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[Markdown],
    report_html: Output[HTML],
    report_files: Output[Artifact],
):
    """Test-split metrics, confusion matrix, report (Markdown, and HTML with the best and worst
    overlays embedded), figures and overlays (cellseg evaluate)."""
    from pathlib import Path

    from cellseg.evaluation.report import square_confusion
    from cellseg.registry.tracking import flat_metrics
    from cellseg.steps.evaluate import evaluate_step

    result = evaluate_step(
        data=Path(dataset.path),
        model=Path(model.path),
        out=Path(report_files.path),
        pipeline_run_id=pipeline_run_id,
        tags=run_tags,
        mlflow_uri=mlflow_uri,
        parent_run=mlflow_parent_run,
    )
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)
    confusion.log_confusion_matrix(*square_confusion(result))
    files = Path(report_files.path)
    Path(report.path).write_text((files / "report.md").read_text())
    Path(report_html.path).write_text((files / "report.html").read_text())
