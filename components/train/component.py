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
    training_engine: str,
    queue_name: str,
    train_cpu_per_node: str,
    train_memory_per_node: str,
    train_shm_per_node: str,
    train_timeout_hours: float,
    pending_timeout_minutes: float,
    pipeline_run_id: str,
    run_tags: dict,
    mlflow_uri: str,
    mlflow_parent_run: str,
    model: Output[Model],
    init_model: Input[Model] = None,
):
    """One training phase (cellseg train): 1 = decoder, 2 = LoRA from ``init_model``.

    On a cluster it runs as a PyTorchJob or TrainJob (``training_engine``; ``num_nodes`` x
    ``gpus_per_node``, queued by Kueue in ``queue_name``) on the checkpoint volume; locally under
    torchrun."""
    from pathlib import Path

    from cellseg.settings import TrainingJobSettings
    from cellseg.steps.train import TrainRequest, train_step

    job = TrainingJobSettings(
        training_engine=training_engine,
        image=image,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        node_selector=node_selector,
        tolerations=tuple(tolerations),
        queue_name=queue_name,
        train_cpu_per_node=train_cpu_per_node,
        train_memory_per_node=train_memory_per_node,
        train_shm_per_node=train_shm_per_node,
        train_timeout_hours=train_timeout_hours,
        pending_timeout_minutes=pending_timeout_minutes,
    )
    request = TrainRequest(
        phase=phase,
        profile=profile,
        epochs=epochs,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        overrides=tuple(overrides),
        job=job,
    )
    info = train_step(
        request,
        data=Path(dataset.path),
        out=Path(model.path),
        init=Path(init_model.path) if init_model is not None else None,
        pipeline_run_id=pipeline_run_id,
        tags=run_tags,
        mlflow_uri=mlflow_uri,
        parent_run=mlflow_parent_run,
    )
    model.metadata.update(info)
