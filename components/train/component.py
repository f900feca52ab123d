from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    phase: int,
    dataset: Input[Dataset],
    profile: str,
    epochs: int,
    lora_rank: int,
    lora_alpha: float,
    overrides: list,
    gpus_per_node: int,
    num_nodes: int,
    image: str,
    node_selector: dict,
    tolerations: list,
    timeout_hours: float,
    training_engine: str,
    queue_name: str,
    cpu_per_node: str,
    memory_per_node: str,
    shm_per_node: str,
    pending_timeout_minutes: float,
    pipeline_run_id: str,
    run_tags: dict,
    mlflow_uri: str,
    model: Output[Model],
    init_model: Input[Model] = None,
):
    """One training phase (cellseg train): 1 = decoder, 2 = LoRA on qkv from ``init_model``.

    On a cluster it runs as a PyTorchJob or TrainJob (``training_engine``; ``num_nodes`` x
    ``gpus_per_node``, queued by Kueue in ``queue_name``) on the checkpoint volume; locally under
    torchrun."""
    from pathlib import Path

    from cellseg.ops.steps import TrainRequest, train_step

    request = TrainRequest(
        phase=phase,
        profile=profile,
        epochs=epochs,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        overrides=tuple(overrides),
        gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        image=image,
        node_selector=node_selector,
        tolerations=tuple(tolerations),
        timeout_hours=timeout_hours,
        engine=training_engine,
        queue_name=queue_name,
        cpu_per_node=cpu_per_node,
        memory_per_node=memory_per_node,
        shm_per_node=shm_per_node,
        pending_timeout_minutes=pending_timeout_minutes,
    )
    init = Path(init_model.path) if init_model is not None else None
    info = train_step(
        request,
        Path(dataset.path),
        Path(model.path),
        init,
        pipeline_run_id,
        run_tags,
        mlflow_uri,
    )
    model.metadata.update(info)
