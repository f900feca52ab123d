from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish_run(pipeline_run_id: str, mlflow_uri: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """The exit handler: the parent MLflow run FINISHED or FAILED (failed steps, error), the
    run's scratch folder on the checkpoints volume removed; a one-line summary."""
    from cellseg.steps.finish_run import finish_run_step

    return finish_run_step(
        pipeline_run_id=pipeline_run_id,
        state=status.state,
        error=status.error_message or "",
        mlflow_uri=mlflow_uri,
    )
