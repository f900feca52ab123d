"""The train step: one phase, here (under torchrun for several processes) or, in a cluster, as a
PyTorchJob or TrainJob on the shared checkpoints volume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cellseg.errors import TrainingError
from cellseg.model.checkpoint import BEST, checkpoint_files, checkpoint_path, find_checkpoint
from cellseg.registry import tracking
from cellseg.settings import TrainingJobSettings


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    """What a pipeline asks of one training phase."""

    phase: int
    profile: str
    epochs: int = 0  # 0: the profile's
    lora_rank: int = 0  # 0: the profile's
    lora_alpha: float = 0.0  # 0: the profile's (the adapter scale is alpha / rank)
    overrides: tuple[str, ...] = ()  # extra key=value
    job: TrainingJobSettings = field(default_factory=TrainingJobSettings)

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
    if request.job.gpus_per_node > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone"]
        return [sys.executable, *launcher, f"--nproc_per_node={request.job.gpus_per_node}", *train]
    return [sys.executable, *train]


def stage_on_volume(data: Path, init: Path | None, run_root: Path) -> tuple[Path, Path | None]:
    """Copy the step's inputs onto the shared volume, where the job's pods can read them: the
    dataset once per pipeline run, and the input model (Phase 1's checkpoint for Phase 2)."""
    shared_data = run_root / "dataset"
    if not (shared_data / "manifest.json").is_file():
        shutil.copytree(data, shared_data, dirs_exist_ok=True)
    if init is None:
        return shared_data, None
    source = find_checkpoint(init)
    inputs = run_root / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for path in checkpoint_files(source):  # a `latest` and its frozen weights
        shutil.copy2(path, inputs / path.name)
    return shared_data, inputs / source.name


def train_step(
    request: TrainRequest,
    *,
    data: Path,
    out: Path,
    init: Path | None,
    pipeline_run_id: str,
    tags: dict,
    mlflow_uri: str | None,
    parent_run: str = "",
) -> dict:
    """Train one phase from ``init`` (Phase 2: Phase 1's model); checkpoints end up in ``out``.

    On a cluster the phase runs as a job of ``request.job.training_engine`` in
    ``/mnt/checkpoints/<pipeline run>/phase<N>`` (the ReadWriteMany volume the step and the
    job's pods mount), stable across retries, so a re-run step resumes from ``latest``.
    Elsewhere it runs here, under torchrun for several processes.
    """
    from cellseg.cluster.client import run_scratch

    if request.phase == 2 and init is None:
        raise TrainingError("Phase 2 needs its input model (Phase 1's checkpoint)")
    run_root = run_scratch(pipeline_run_id)
    work = run_root / f"phase{request.phase}" if run_root else out
    work.mkdir(parents=True, exist_ok=True)
    step = f"phase{request.phase}"
    with tracking.step_run(
        step, pipeline_run_id, tags, mlflow_uri or None, parent=parent_run
    ) as tracker:
        tracking.log_datasets(tracker.run_id, data, ("train", "val"))
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
    from cellseg.cluster.client import pod_namespace
    from cellseg.cluster.jobs import JobSpec, job_name
    from cellseg.cluster.launch import run_job

    spec = JobSpec(
        name=job_name(pipeline_run_id, request.phase),
        train_args=tuple(args),
        job=request.job,
        namespace=pod_namespace(),
        mlflow_uri=mlflow_uri or "",
        owner_pod=step_pod(),
        workflow=os.environ.get("WORKFLOW_NAME", ""),  # the pipeline sets it (downward API)
    )
    run_job(spec)


def step_pod() -> tuple[str, str]:
    """This step's pod (name, uid) from the downward API (``POD_NAME``/``POD_UID``, set by the
    pipeline), to own the training job; () when not set."""
    name, uid = os.environ.get("POD_NAME", ""), os.environ.get("POD_UID", "")
    return (name, uid) if name and uid else ()
