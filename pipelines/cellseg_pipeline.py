"""The DAG: data-version -> convert -> Phase 1 -> Phase 2 -> tune -> evaluate -> register ->
promote,
with score-champion (the current champion on this run's test split) beside training, feeding the
gate in register. start-run creates the run's parent MLflow run before any step logs and hands
it on; finish-run, the exit handler, ends it (FINISHED or FAILED) and removes the run's scratch
folder on the checkpoints volume, however the run ended.

The inference steps (evaluate, score-champion) get the accelerator type and one GPU, the node
selector and the tolerations. Training steps launch PyTorchJobs or TrainJobs that get the GPUs,
the node selector and the tolerations; the steps themselves only wait, on CPU. Other steps ask
for CPU and memory only. Conversion is cached on the data md5; training and evaluation never are (a
retraining run must retrain). Every step that talks to MLflow reads its credential from the
``cellseg-mlflow-auth`` Secret when there is one (the mlflow-team overlay's basic-auth).
"""

from kfp import dsl, kubernetes

from cellseg import settings
from cellseg.data.manifest import FORMAT as DATASET_FORMAT
from cellseg.settings import PROMOTION_TOLERANCE
from cellseg.settings import TRAINING_JOB as JOB
from components.convert.component import convert
from components.data_version.component import data_version
from components.evaluate.component import evaluate
from components.finish_run.component import finish_run
from components.promote.component import promote
from components.register.component import register
from components.score_champion.component import score_champion
from components.start_run.component import start_run
from components.train.component import train
from components.tune.component import tune

PIPELINE_NAME = "cellseg"
# What a training step reads of its own pod (the downward API): the job's owner, and the Argo
# Workflow whose termination deletes the job (Argo labels every step pod with it).
STEP_POD_FIELDS = {
    "POD_NAME": "metadata.name",
    "POD_UID": "metadata.uid",
    "WORKFLOW_NAME": "metadata.labels['workflows.argoproj.io/workflow']",
}


def on_gpu(task: dsl.PipelineTask, gpus, node_selector, tolerations) -> dsl.PipelineTask:
    task.set_accelerator_type(settings.ACCELERATOR).set_accelerator_limit(gpus)
    task.set_cpu_request("4").set_memory_request("32G").set_memory_limit("64G")
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    return task


def mlflow_login(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """MLflow's credentials where it authenticates (overlays/kubeflow); none elsewhere."""
    keys = {k: k for k in settings.MLFLOW_AUTH_KEYS}
    return kubernetes.use_secret_as_env(task, settings.MLFLOW_AUTH_SECRET, keys, optional=True)


def dvc_remote_login(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """The DVC remote's credentials where the data is pulled by revision from a private
    remote; none elsewhere."""
    keys = {k: k for k in settings.DVC_REMOTE_KEYS}
    return kubernetes.use_secret_as_env(task, settings.DVC_REMOTE_SECRET, keys, optional=True)


def on_cpu(task: dsl.PipelineTask, cpu: str = "1", memory: str = "4G") -> dsl.PipelineTask:
    return task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)


@dsl.pipeline(name=PIPELINE_NAME, description="BCCD blood-cell instance segmentation: UNI + HoVer")
def cellseg_pipeline(
    source: str = f"{settings.DATASETS_MOUNT}/BCCD",
    data_md5: str = "",  # "" = whatever revision is at source (scheduled retraining)
    data_repo: str = "",  # a DVC data repository (git URL): its data at data_rev, not source
    data_rev: str = "",  # a branch, tag or commit of data_repo ("": its default branch)
    profile: str = settings.CLUSTER_PROFILE,
    epochs: int = 0,
    lora_rank: int = 0,  # 0: the profile's
    lora_alpha: float = 0.0,  # 0: the profile's; the adapter scale is alpha / rank
    overrides: list = [],  # noqa: B006 (a KFP parameter default, never mutated)
    gpus_per_node: int = JOB.gpus_per_node,
    num_nodes: int = JOB.num_nodes,
    node_selector: dict = JOB.node_selector,
    tolerations: list = list(JOB.tolerations),  # noqa: B006 (never mutated)
    mlflow_uri: str = settings.MLFLOW_URI,
    image: str = JOB.image,
    train_timeout_hours: float = JOB.train_timeout_hours,  # running, after admission
    training_engine: str = JOB.training_engine,  # pytorchjob, or trainjob: Kubeflow Trainer v2
    queue_name: str = JOB.queue_name,  # a Kueue LocalQueue for the training jobs; "" = none
    train_cpu_per_node: str = JOB.train_cpu_per_node,
    train_memory_per_node: str = JOB.train_memory_per_node,
    train_shm_per_node: str = JOB.train_shm_per_node,  # /dev/shm of each training pod
    pending_timeout_minutes: float = JOB.pending_timeout_minutes,  # unschedulable pod: fail
    run_tags: dict = {},  # noqa: B006
    promotion_tolerance: float = PROMOTION_TOLERANCE,
    force_promote: bool = False,
    inference_service: str = "",  # a KServe InferenceService rolled to each new champion
    canary_traffic_percent: int = 0,  # 1..99: that share to the new champion first; 0: all
    # where KServe reads MLflow's proxied artifacts: the server's --artifacts-destination as a
    # storageUri (mlflow-team: s3://<bucket>/mlflow); "": manifests/base's pvc://mlflow-store
    serving_artifacts_root: str = "",
    tune_budget_seconds: float = 0.0,  # the post-processing search on val; 0: its default, 600
):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    finish = on_cpu(finish_run(pipeline_run_id=run_id, mlflow_uri=mlflow_uri))
    finish.set_caching_options(False)
    kubernetes.mount_pvc(
        finish, pvc_name=settings.CHECKPOINTS_PVC, mount_path=settings.CHECKPOINTS_MOUNT
    )
    mlflow_login(finish)
    with dsl.ExitHandler(finish, name="cellseg-run"):
        version = data_version(
            source=source, expected_md5=data_md5, data_repo=data_repo, data_rev=data_rev
        )
        on_cpu(version).set_caching_options(False)
        dvc_remote_login(version)
        started = start_run(
            pipeline_run_id=run_id,
            run_tags=run_tags,
            mlflow_uri=mlflow_uri,
            data_repo=data_repo,
            data_rev=data_rev,
            data_commit=version.outputs["commit"],
        )
        on_cpu(started).set_caching_options(False)
        mlflow_login(started)
        parent = started.output  # every step that logs waits for it
        converted = convert(
            source=version.outputs["source"],
            data_md5=version.outputs["md5"],
            dataset_format=DATASET_FORMAT,
        )
        data = on_cpu(converted, "2", "8G")
        # keyed on the data md5 and the converter's format: new data or converter, new conversion
        data.set_caching_options(True)
        for task in (version, data):
            kubernetes.mount_pvc(
                task, pvc_name=settings.DATASETS_PVC, mount_path=settings.DATASETS_MOUNT
            )
        dataset = data.outputs["dataset"]
        common = dict(
            dataset=dataset,
            profile=profile,
            epochs=epochs,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            overrides=overrides,
            gpus_per_node=gpus_per_node,
            num_nodes=num_nodes,
            pipeline_run_id=run_id,
            run_tags=run_tags,
            mlflow_uri=mlflow_uri,
            mlflow_parent_run=parent,
            image=image,
            node_selector=node_selector,
            tolerations=tolerations,
            train_timeout_hours=train_timeout_hours,
            training_engine=training_engine,
            queue_name=queue_name,
            train_cpu_per_node=train_cpu_per_node,
            train_memory_per_node=train_memory_per_node,
            train_shm_per_node=train_shm_per_node,
            pending_timeout_minutes=pending_timeout_minutes,
        )
        phase1 = train(phase=1, **common).set_display_name("train-phase1")
        phase2 = train(phase=2, init_model=phase1.outputs["model"], **common)
        phase2.set_display_name("train-phase2")
        tuned = tune(
            dataset=dataset,
            model=phase2.outputs["model"],
            pipeline_run_id=run_id,
            run_tags=run_tags,
            mlflow_uri=mlflow_uri,
            mlflow_parent_run=parent,
            budget_seconds=tune_budget_seconds,
        )
        # one model forward over val on a GPU, then a CPU search: memory for the cached maps
        on_gpu(tuned, settings.INFERENCE_GPUS, node_selector, tolerations)
        tuned.set_caching_options(False)
        model = tuned.outputs["tuned"]  # what is evaluated, registered and served
        scores = evaluate(
            dataset=dataset,
            model=model,
            pipeline_run_id=run_id,
            run_tags=run_tags,
            mlflow_uri=mlflow_uri,
            mlflow_parent_run=parent,
        )
        for task in (phase1, phase2):
            on_cpu(task).set_caching_options(False)
            # a retried step adopts its running job or resumes from `latest` on the volume
            task.set_retry(
                num_retries=settings.TRAIN_RETRIES,
                backoff_duration=f"{settings.TRAIN_RETRY_BACKOFF_SECONDS}s",
                backoff_factor=settings.TRAIN_RETRY_BACKOFF_FACTOR,
                backoff_max_duration=f"{settings.train_retry_window_seconds()}s",
            )
            for env, field_path in STEP_POD_FIELDS.items():
                kubernetes.use_field_path_as_env(task, env_name=env, field_path=field_path)
            kubernetes.mount_pvc(
                task, pvc_name=settings.CHECKPOINTS_PVC, mount_path=settings.CHECKPOINTS_MOUNT
            )
        on_gpu(scores, settings.INFERENCE_GPUS, node_selector, tolerations)
        scores.set_caching_options(False)
        champion = score_champion(
            dataset=dataset,
            pipeline_run_id=run_id,
            run_tags=run_tags,
            mlflow_uri=mlflow_uri,
            mlflow_parent_run=parent,
        )
        on_gpu(champion, settings.INFERENCE_GPUS, node_selector, tolerations)
        champion.set_caching_options(False)
        gate = on_cpu(
            register(
                model=model,
                report_files=scores.outputs["report_files"],
                champion_score=champion.outputs["champion_score"],
                dataset=dataset,
                pipeline_run_id=run_id,
                run_tags=run_tags,
                mlflow_uri=mlflow_uri,
                mlflow_parent_run=parent,
                tolerance=promotion_tolerance,
                force=force_promote,
            )
        ).set_caching_options(False)
        with dsl.If(gate.outputs["Output"] == True, name="promotion-gate"):  # noqa: E712
            promoted = on_cpu(
                promote(
                    registered=gate.outputs["registered"],
                    mlflow_uri=mlflow_uri,
                    inference_service=inference_service,
                    canary_traffic_percent=canary_traffic_percent,
                    serving_artifacts_root=serving_artifacts_root,
                )
            )
            promoted.set_caching_options(False)
        for task in (phase1, phase2, tuned, scores, champion, gate, promoted):  # MLflow callers
            mlflow_login(task)
