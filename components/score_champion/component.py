from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def score_champion(
    dataset: Input[Dataset],
    pipeline_run_id: str,
    run_tags: dict,
    mlflow_uri: str,
    baseline: Output[Artifact],
):
    """The current champion, loaded with its own post-processing, scored on this run's test
    split (baseline.json, and its report), so the gate compares two fresh results."""
    from pathlib import Path

    from cellseg.ops.steps import score_champion_step

    result = score_champion_step(
        Path(dataset.path), Path(baseline.path), pipeline_run_id, run_tags, mlflow_uri
    )
    baseline.metadata.update(result)
