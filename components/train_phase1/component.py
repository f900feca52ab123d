from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_phase1(
    dataset: Input[Dataset],
    profile: str,
    epochs: int,
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
    """Phase 1: decoder training, backbone frozen when pretrained (cellseg train --phase 1).

    On a cluster it runs as a PyTorchJob (``num_nodes`` x ``gpus_per_node``) on the checkpoint
    volume; locally under torchrun."""
    from pathlib import Path

    from cellseg.steps import TrainRequest, train_step

    request = TrainRequest(
        1,
        profile,
        epochs,
        0,
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
        None,
        checkpoint_root,
        pipeline_run_id,
        run_tags,
        mlflow_uri,
    )
    model.metadata.update(info)
