from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def score_champion(
    dataset: Input[Dataset],
    pipeline_run_id: str,
    run_tags: dict,
    mlflow_uri: str,
    mlflow_parent_run: str,
    champion_score: Output[Artifact],
):
    """The current champion, loaded with its own post-processing, scored on this run's test
    split (champion_score.json, and its report), so the gate compares two fresh results."""
    from pathlib import Path

    from cellseg.steps.score_champion import score_champion_step

    result = score_champion_step(
        data=Path(dataset.path),
        out=Path(champion_score.path),
        pipeline_run_id=pipeline_run_id,
        tags=run_tags,
        mlflow_uri=mlflow_uri,
        parent_run=mlflow_parent_run,
    )
    champion_score.metadata.update(result)
