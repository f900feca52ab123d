from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    pipeline_run_id: str,
    run_tags: dict,
    mlflow_uri: str,
    metrics: Output[Metrics],
    report: Output[Markdown],
    report_files: Output[Artifact],
):
    """Test-split metrics, report, figures and overlays (cellseg evaluate)."""
    from pathlib import Path

    from cellseg.ops.steps import evaluate_step, flat_metrics

    result = evaluate_step(
        Path(dataset.path),
        Path(model.path),
        Path(report_files.path),
        pipeline_run_id,
        run_tags,
        mlflow_uri,
    )
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)
    Path(report.path).write_text((Path(report_files.path) / "report.md").read_text())
