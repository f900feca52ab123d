from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_phase2(
    dataset: Input[Dataset],
    phase1: Input[Model],
    profile: str,
    epochs: int,
    lora_rank: int,
    overrides: list,
    gpus_per_node: int,
    num_nodes: int,
    image: str,
    node_selector: dict,
    tolerations: list,
    timeout_hours: float,
    checkpoint_root: str,
    pipeline_run_id: str,
    run_tags: dict,
    mlflow_uri: str,
    model: Output[Model],
):
    """Phase 2: LoRA on the backbone's qkv, from Phase 1's best (else latest) checkpoint."""
    from pathlib import Path

    from cellseg.steps import TrainRequest, train_step

    request = TrainRequest(
        2,
        profile,
        epochs,
        lora_rank,
        overrides,
        gpus_per_node,
        num_nodes,
        image,
        node_selector,
        tolerations,
        timeout_hours,
    )
    info = train_step(
        request,
        Path(dataset.path),
        Path(model.path),
        Path(phase1.path),
        checkpoint_root,
        pipeline_run_id,
        run_tags,
        mlflow_uri,
    )
    model.metadata.update(info)
