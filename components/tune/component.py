from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(
    dataset: Input[Dataset],
    model: Input[Model],
    pipeline_run_id: str,
    run_tags: dict,
    mlflow_uri: str,
    mlflow_parent_run: str,
    budget_seconds: float,
    tuned: Output[Model],
    tuning: Output[Markdown],
):
    """The post-processing chosen on the val split (cellseg tune), written into the model that
    evaluation, registration and serving use; the search's table as Markdown."""
    from pathlib import Path

    from cellseg.steps.tune import tune_step

    result = tune_step(
        data=Path(dataset.path),
        model=Path(model.path),
        out=Path(tuned.path),
        pipeline_run_id=pipeline_run_id,
        tags=run_tags,
        mlflow_uri=mlflow_uri,
        parent_run=mlflow_parent_run,
        budget_seconds=budget_seconds,
    )
    tuned.metadata.update(model.metadata)
    tuned.metadata.update({k: result[k] for k in ("changed", "start_score", "best_score")})
    Path(tuning.path).write_text((Path(tuned.path) / "tuning.md").read_text())
