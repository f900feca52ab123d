from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def start_run(
    pipeline_run_id: str,
    run_tags: dict,
    mlflow_uri: str,
    data_repo: str,
    data_rev: str,
    data_commit: str,
) -> str:
    """The pipeline run's parent MLflow run, created before any other step logs and handed on
    to each of them; tagged with the data's repository, revision and resolved commit."""
    from cellseg.steps.start_run import start_run_step

    return start_run_step(
        pipeline_run_id=pipeline_run_id,
        tags=run_tags,
        mlflow_uri=mlflow_uri,
        data_repo=data_repo,
        data_rev=data_rev,
        data_commit=data_commit,
    )
