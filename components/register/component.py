from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    report_files: Input[Artifact],
    dataset: Input[Dataset],
    pipeline_run_id: str,
    run_tags: dict,
    mlflow_uri: str,
    tolerance: float,
    force: bool,
    registered: Output[Model],
) -> bool:
    """Register the model in MLflow as ``challenger``; returns whether it should be champion."""
    from pathlib import Path

    from cellseg.ops.steps import register_step

    result = register_step(
        Path(model.path),
        Path(report_files.path) / "metrics.json",
        Path(dataset.path),
        pipeline_run_id,
        run_tags,
        mlflow_uri,
        tolerance,
        force,
    )
    registered.metadata.update(result)
    return result["promote"]
