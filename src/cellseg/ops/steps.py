"""Pipeline steps as plain functions of paths and strings: what each KFP component calls.

Each step reads its inputs from arguments and writes its outputs to the folder it is given;
MLflow runs are linked through the pipeline run id, never through another step's internals.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cellseg.cluster import names as cluster
from cellseg.errors import DataError, TrainingError
from cellseg.model.checkpoint import BEST, checkpoint_path, find_checkpoint
from cellseg.ops import tracking


def data_version_step(source: str, expected_md5: str = "") -> str:
    """DVC md5 of the VOC parts at ``source``; an error if it is not ``expected_md5`` (when set)."""
    from cellseg.data.source import voc_md5

    found = voc_md5(Path(source))
    if expected_md5 and found != expected_md5:
        raise DataError(f"{source}: data md5 is {found}, the pipeline asked for {expected_md5}")
    return found


def convert_step(source: str, data_md5: str, out: Path) -> dict:
    """Convert raw BCCD at ``source``; ``data_md5`` (from :func:`data_version_step`) is recorded."""
    from cellseg.data.convert import convert_dataset

    manifest = convert_dataset(Path(source), Path(out), preview=4)
    return {k: v["images"] for k, v in manifest["splits"].items()} | {"data_md5": data_md5}


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    """What a pipeline asks of one training phase."""

    phase: int
    profile: str
    epochs: int = 0  # 0: the profile's
    lora_rank: int = 0  # 0: the profile's
    lora_alpha: float = 0.0  # 0: the profile's (the adapter scale is alpha / rank)
    overrides: tuple[str, ...] = ()  # extra key=value
    gpus_per_node: int = 1  # processes per node (CPU processes locally)
    num_nodes: int = 1
    # on a cluster, the training job's pods:
    image: str = cluster.IMAGE
    node_selector: dict = field(default_factory=lambda: dict(cluster.GPU_NODE_SELECTOR))
    tolerations: tuple[dict, ...] = cluster.GPU_TOLERATIONS
    timeout_hours: float = 72.0  # running, after admission
    engine: str = "pytorchjob"  # or "trainjob" (Kubeflow Trainer v2)
    queue_name: str = ""  # a Kueue LocalQueue; "" = none
    cpu_per_node: str = "8"
    memory_per_node: str = "64Gi"
    shm_per_node: str = "16Gi"  # /dev/shm, where DataLoader workers pass tensors
    pending_timeout_minutes: float = 30.0  # an unschedulable pod fails the step after this

    def config_overrides(self) -> list[str]:
        extra = [f"epochs={self.epochs}"] if self.epochs > 0 else []
        extra += [f"lora_rank={self.lora_rank}"] if self.lora_rank > 0 else []
        extra += [f"lora_alpha={self.lora_alpha:g}"] if self.lora_alpha > 0 else []
        return [*extra, *map(str, self.overrides)]


def train_args(
    request: TrainRequest, data: Path, out: Path, init: Path | None, mlflow_run: str | None
) -> list[str]:
    """The arguments of ``cellseg train`` for one phase."""
    args = ["--phase", str(request.phase), "--data", str(data), "--out", str(out)]
    args += ["--profile", request.profile]
    args += [a for o in request.config_overrides() for a in ("--set", o)]
    if init is not None:
        args += ["--init", str(init)]
    if mlflow_run:
        args += ["--mlflow-run", mlflow_run]
    return args


def training_command(
    request: TrainRequest, data: Path, out: Path, init: Path | None, mlflow_run: str | None
) -> list[str]:
    """``cellseg train`` here, under torchrun for several processes: the same code path."""
    train = ["-m", "cellseg.cli", "train", *train_args(request, data, out, init, mlflow_run)]
    if request.gpus_per_node > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone"]
        return [sys.executable, *launcher, f"--nproc_per_node={request.gpus_per_node}", *train]
    return [sys.executable, *train]


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def pod_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else cluster.NAMESPACE


def stage_on_volume(data: Path, init: Path | None, run_root: Path) -> tuple[Path, Path | None]:
    """Copy the step's inputs onto the shared volume, where the job's pods can read them: the
    dataset once per pipeline run, and the input model (Phase 1's checkpoint for Phase 2)."""
    shared_data = run_root / "dataset"
    if not (shared_data / "manifest.json").is_file():
        shutil.copytree(data, shared_data, dirs_exist_ok=True)
    if init is None:
        return shared_data, None
    source = find_checkpoint(init)
    staged = run_root / "inputs" / source.name
    staged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, staged)
    return shared_data, staged


def train_step(
    request: TrainRequest,
    data: Path,
    out: Path,
    init: Path | None,
    pipeline_run_id: str,
    tags: dict,
    mlflow_uri: str | None,
) -> dict:
    """Train one phase from ``init`` (Phase 2: Phase 1's model); checkpoints end up in ``out``.

    On a cluster the phase runs as a PyTorchJob or TrainJob (``request.engine``) in
    ``/mnt/checkpoints/<pipeline run>/phase<N>`` (the ReadWriteMany volume the step and the
    job's pods mount), stable across retries, so a re-run step resumes from ``latest``.
    Elsewhere it runs here, under torchrun for several processes.
    """
    if request.phase == 2 and init is None:
        raise TrainingError("Phase 2 needs its input model (Phase 1's checkpoint)")
    run_root = Path(cluster.CHECKPOINTS_MOUNT) / pipeline_run_id if in_cluster() else None
    work = run_root / f"phase{request.phase}" if run_root else out
    work.mkdir(parents=True, exist_ok=True)
    step = f"phase{request.phase}"
    with tracking.step_run(step, pipeline_run_id, tags, mlflow_uri or None) as tracker:
        if run_root:
            data, init = stage_on_volume(data, init, run_root)
            args = train_args(request, data, work, init, tracker.run_id)
            run_on_cluster(request, args, pipeline_run_id, mlflow_uri)
        else:
            env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(mlflow_uri or None)}
            cmd = training_command(request, data, work, init, tracker.run_id)
            subprocess.run(cmd, check=True, env=env)
    if work != out:
        out.mkdir(parents=True, exist_ok=True)
        for ckpt in work.glob(f"*_phase{request.phase}.*"):
            shutil.copy2(ckpt, out / ckpt.name)
    best = checkpoint_path(out, request.phase, BEST).name
    return {"best": best, "phase": request.phase, "mlflow_run_id": tracker.run_id}


def run_on_cluster(
    request: TrainRequest, args: list[str], pipeline_run_id: str, mlflow_uri: str | None
) -> None:
    from cellseg.cluster.jobs import JobSpec, job_name
    from cellseg.cluster.launch import run_job
    from cellseg.cluster.pods import Limits

    spec = JobSpec(
        name=job_name(pipeline_run_id, request.phase),
        image=request.image,
        train_args=tuple(args),
        namespace=pod_namespace(),
        nodes=request.num_nodes,
        gpus_per_node=request.gpus_per_node,
        node_selector=dict(request.node_selector),
        tolerations=tuple(request.tolerations),
        mlflow_uri=mlflow_uri or "",
        queue_name=request.queue_name,
        timeout_seconds=int(request.timeout_hours * 3600),
        cpu=request.cpu_per_node,
        memory=request.memory_per_node,
        shm=request.shm_per_node,
        owner_pod=step_pod(),
    )
    limits = Limits(pending_timeout_seconds=request.pending_timeout_minutes * 60)
    run_job(request.engine, spec, limits=limits)


def step_pod() -> tuple[str, str]:
    """This step's pod (name, uid) from the downward API (``POD_NAME``/``POD_UID``, set by the
    pipeline), to own the training job; () when not set."""
    name, uid = os.environ.get("POD_NAME", ""), os.environ.get("POD_UID", "")
    return (name, uid) if name and uid else ()


def evaluate_step(
    data: Path, model: Path, out: Path, pipeline_run_id: str, tags: dict, mlflow_uri: str | None
) -> dict:
    from cellseg.evaluation.evaluate import evaluate
    from cellseg.ops.model_ref import load_predictor
    from cellseg.threads import match_torch_threads

    with tracking.step_run("evaluate", pipeline_run_id, tags, mlflow_uri or None) as tracker:
        match_torch_threads()  # the pod's CPU limit, not the node's core count
        predictor = load_predictor(str(model))  # auto: the GPU the step was given, if any
        metrics = evaluate(data, predictor, out, model_name=str(model))
        tracker.log_metrics(flat_metrics(metrics))
        if "chosen_phase" in metrics:
            tracker.set_tags({"cellseg.chosen_phase": metrics["chosen_phase"]})
        tracker.log_artifact(Path(out), "report")
    return metrics


def flat_metrics(metrics: dict) -> dict[str, float]:
    """``metrics.json`` as flat MLflow metric names: ``test_pq``, ``test_pq_RBC``, ..."""
    flat = {}
    for key in ("pq", "sq", "rq", "f1", "precision", "recall", "aji", "bpq", "mpq"):
        flat[f"test_{key}"] = metrics[key]
    for key in ("box_map50", "box_map", "mask_map50", "mask_map"):
        flat[f"test_{key}"] = metrics[key]
    for name, pc in metrics["per_class"].items():
        for key in ("pq", "f1", "box_ap50", "iou", "dice"):
            flat[f"test_{key}_{name}"] = pc[key]
    for key in ("pq", "f1", "box_map50", "mask_map50"):
        flat[f"test_void_{key}"] = metrics["void_aware"][key]
    return flat


def score_champion_step(
    data: Path, out: Path, pipeline_run_id: str, tags: dict, mlflow_uri: str | None
) -> dict:
    """The current champion scored on this run's test split; ``baseline.json`` in ``out``."""
    from cellseg.ops.baseline import score_champion
    from cellseg.ops.registry import MODEL_NAME

    with tracking.step_run("score-champion", pipeline_run_id, tags, mlflow_uri or None) as tracker:
        baseline = score_champion(Path(data), Path(out) / "report", MODEL_NAME)
        baseline.write(Path(out))
        tracker.set_tags({"cellseg.champion_version": baseline.version or "none"})
        if baseline.metrics:
            tracker.log_metrics(
                {f"champion_{k}": v for k, v in flat_metrics(baseline.metrics).items()}
            )
        elif baseline.error:
            tracker.set_tags({"cellseg.champion_error": baseline.error})
    print(baseline.describe())
    return {"version": baseline.version, "error": baseline.error}


def register_step(
    model: Path,
    metrics_path: Path,
    data: Path,
    pipeline_run_id: str,
    tags: dict,
    mlflow_uri: str | None,
    tolerance: float,
    force: bool,
    baseline_dir: Path | None = None,
    data_md5: str = "",
) -> dict:
    """Register the model as ``challenger`` and return the promotion decision, taken against
    the champion as scored on this run's split (``baseline_dir``, from the score-champion step)."""
    from cellseg.data.arrays import load_sample
    from cellseg.data.manifest import split_files
    from cellseg.ops.baseline import Baseline
    from cellseg.ops.registry import register

    metrics = json.loads(Path(metrics_path).read_text())
    baseline = Baseline.read(baseline_dir) if baseline_dir else Baseline()
    example = load_sample(Path(data), split_files(Path(data), "test", 1)[0])["image"]
    with tracking.step_run("register", pipeline_run_id, tags, mlflow_uri or None) as tracker:
        version, decision = register(
            tracker.run_id,
            find_checkpoint(Path(model)),
            metrics,
            example,
            tolerance=tolerance,
            force=force,
            baseline=baseline,
            data_md5=data_md5,
        )
        tracker.set_tags(
            {
                "cellseg.model_version": version,
                "cellseg.promote": decision.promote,
                "cellseg.data_md5": data_md5 or tags.get("cellseg.data_md5", ""),
            }
        )
    tracking.finish_parent(pipeline_run_id, mlflow_uri or None)
    return {
        "version": version,
        "promote": decision.promote,
        "forced": decision.forced,
        "reasons": decision.reasons,
        "data_md5": data_md5,
        "test_pq": metrics["pq"],
        "champion_version": baseline.version,
        "champion_test_pq": baseline.metrics["pq"] if baseline.metrics else None,
        "champion_error": baseline.error,
    }


def promote_step(
    version: str,
    compared_with: str,
    mlflow_uri: str | None,
    force: bool = False,
    inference_service: str = "",
    canary_percent: int = 0,
) -> str:
    """Move ``champion`` to ``version`` unless it moved away from ``compared_with`` (the version
    the gate compared against) meanwhile; then, with ``inference_service``, roll that KServe
    InferenceService (in this pod's namespace) to it, all traffic or a ``canary_percent``
    share. Returns the storageUri rolled to ("" when no service is named or nothing moved)."""
    from cellseg.ops.registry import MODEL_NAME, promote

    tracking.configure(mlflow_uri or None)
    decision = promote(version, compared_with, force=force)
    print("; ".join(decision.reasons))
    if not inference_service or not decision.promote:
        return ""
    from cellseg.serving.rollout import champion_storage_uri, roll_inference_service

    uri = champion_storage_uri(MODEL_NAME, version)
    from kubernetes import config

    if in_cluster():
        config.load_incluster_config()
    else:
        config.load_kube_config()
    roll_inference_service(inference_service, pod_namespace(), uri, canary_percent)
    return uri
