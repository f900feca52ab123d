"""Training jobs on Kubernetes, as manifests: a Kubeflow Trainer v2 ``TrainJob`` or a Training
Operator v1 ``PyTorchJob``, from one :class:`JobSpec`.

Both run ``torchrun -m cellseg.cli train ...`` on every node; the operator sets the rendezvous
environment (``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``/
``PORT``) that torchrun reads, so the code path is the one ``torchrun --nproc_per_node=N`` runs
locally. The dataset and checkpoints live on a ReadWriteMany volume that the pipeline step and
the job's pods share; the job name is fixed per pipeline run and phase, so a retried step finds
its job and training resumes from ``latest_phase{N}.pt`` on the volume.

Trainer v2 (``trainer.kubeflow.org/v1alpha1``) is the maintained engine; the Training Operator
v1 is deprecated upstream and kept for clusters that still run it. Static pod settings
(volumes, security context, service account) live in the namespaced ``TrainingRuntime`` of
``manifests/base/training-runtime.yaml``; per-run ones (node selector, tolerations) go in the
TrainJob's ``runtimePatches``. Processes per node follow the GPUs requested.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from cellseg import settings
from cellseg.settings import PYTORCHJOB as PYTORCHJOB_NAME
from cellseg.settings import TRAINJOB as TRAINJOB_NAME
from cellseg.settings import TrainingJobSettings

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KEY_ANNOTATION = "cellseg.kfp/job-key"  # what a retried step compares to adopt a job
TRAINING_RUNTIME = "cellseg-torch"  # manifests/base/training-runtime.yaml
LAUNCHER = "cellseg.kfp/launcher"  # the manager of our runtime patch


@dataclass(frozen=True)
class Engine:
    """How one job kind is addressed and read."""

    name: str  # the pipeline's / CLI's `training_engine` value
    kind: str
    group: str
    version: str
    plural: str
    pod_label: str  # pods carry <pod_label>=<job name>
    succeeded: str  # the condition type that means done
    container: str  # the training container's name
    kueue_framework: str  # its name in Kueue's integrations.frameworks


PYTORCHJOB = Engine(
    PYTORCHJOB_NAME, "PyTorchJob", "kubeflow.org", "v1", "pytorchjobs",
    "training.kubeflow.org/job-name", "Succeeded", "pytorch", "kubeflow.org/pytorchjob",
)  # fmt: skip
TRAINJOB = Engine(
    TRAINJOB_NAME, "TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs",
    "jobset.sigs.k8s.io/jobset-name", "Complete", "node", "trainer.kubeflow.org/trainjob",
)  # fmt: skip
ENGINES = {e.name: e for e in (PYTORCHJOB, TRAINJOB)}


@dataclass(frozen=True)
class JobSpec:
    """Everything a training job for one phase needs, whichever engine runs it."""

    name: str
    train_args: tuple[str, ...]  # after `cellseg train`
    job: TrainingJobSettings = field(default_factory=TrainingJobSettings)
    namespace: str = settings.NAMESPACE
    mlflow_uri: str = ""
    backoff_limit: int = 3
    ttl_seconds_after_finished: int = 7 * 24 * 3600
    owner_pod: tuple[str, str] = ()  # (name, uid) of the step's pod: the job goes with it
    workflow: str = ""  # the step's Argo Workflow: a terminated run deletes the job

    @property
    def timeout_seconds(self) -> int:
        """The job's deadline and the launcher's wait, counted from admission."""
        return int(self.job.train_timeout_hours * 3600)


def job_name(pipeline_run_id: str, phase: int) -> str:
    """A DNS-1123 name, distinct per pipeline run and phase, stable across retries."""
    slug = re.sub(r"[^a-z0-9-]", "-", pipeline_run_id.lower()).strip("-")[:40] or "run"
    return f"cellseg-{slug}-phase{phase}"


def job_key(spec: JobSpec) -> str:
    """What makes two submissions the same job: everything but the MLflow run, which a
    retried step creates anew."""
    args = list(spec.train_args)
    if "--mlflow-run" in args:
        i = args.index("--mlflow-run")
        del args[i : i + 2]
    j = spec.job
    identity = [j.image, args, j.num_nodes, j.gpus_per_node, spec.namespace, spec.name]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def _metadata(spec: JobSpec) -> dict:
    labels = {"app.kubernetes.io/part-of": "cellseg-kfp"}
    if spec.job.queue_name:
        labels[QUEUE_LABEL] = spec.job.queue_name
    metadata = {
        "name": spec.name,
        "namespace": spec.namespace,
        "labels": labels,
        "annotations": {KEY_ANNOTATION: job_key(spec)},
    }
    if spec.owner_pod:  # Kubernetes' garbage collector deletes the job when this pod goes
        name, uid = spec.owner_pod
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}
        ]
    return metadata


def _env(spec: JobSpec) -> list[dict]:
    env = [
        {"name": "HF_HOME", "value": settings.HF_CACHE_MOUNT},
        {
            "name": "HF_TOKEN",  # from its Secret, never in the manifest
            "valueFrom": {
                "secretKeyRef": {
                    "name": settings.HF_TOKEN_SECRET,
                    "key": "HF_TOKEN",
                    "optional": True,
                }
            },
        },
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *MLFLOW_CREDENTIALS,
    ]
    if spec.mlflow_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": spec.mlflow_uri})
    return env


# MLflow's own login where it runs with authentication (overlays/kubeflow); optional elsewhere.
MLFLOW_CREDENTIALS = [
    {
        "name": key,
        "valueFrom": {
            "secretKeyRef": {"name": settings.MLFLOW_AUTH_SECRET, "key": key, "optional": True}
        },
    }
    for key in settings.MLFLOW_AUTH_KEYS
]


def _resources(spec: JobSpec) -> dict:
    j = spec.job
    gpus, memory = str(j.gpus_per_node), j.train_memory_per_node
    return {
        "requests": {"cpu": j.train_cpu_per_node, "memory": memory, settings.ACCELERATOR: gpus},
        "limits": {"memory": memory, settings.ACCELERATOR: gpus},
    }


def _command(spec: JobSpec) -> list[str]:
    return ["torchrun", "-m", "cellseg.cli", "train", *spec.train_args]


def pod_volumes(shm: str) -> list[dict]:
    return [
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": settings.CHECKPOINTS_PVC}},
        {"name": "hf-cache", "persistentVolumeClaim": {"claimName": settings.HF_CACHE_PVC}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
    ]


VOLUME_MOUNTS = [
    {"name": "checkpoints", "mountPath": settings.CHECKPOINTS_MOUNT},
    {"name": "hf-cache", "mountPath": settings.HF_CACHE_MOUNT},
    {"name": "dshm", "mountPath": "/dev/shm"},
]
CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY = {  # Pod Security "restricted"
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
# SIGTERM (a Kueue preemption, a node drain) gives training this long to finish its step and
# write `latest` (cellseg.training.loop) before the kubelet kills it; Kubernetes' default is 30 s.
TERMINATION_GRACE_SECONDS = 120
# Istio would inject a sidecar in a Kubeflow profile namespace; it keeps a finished pod running.
POD_LABELS = {"app.kubernetes.io/name": "cellseg-train", "sidecar.istio.io/inject": "false"}


def _replica(spec: JobSpec, replicas: int) -> dict:
    container = {
        "name": PYTORCHJOB.container,  # the Training Operator finds the container by this name
        "image": spec.job.image,
        "command": _command(spec),
        "env": _env(spec),
        "resources": _resources(spec),
        "volumeMounts": VOLUME_MOUNTS,
        "securityContext": CONTAINER_SECURITY,
    }
    return {
        "replicas": replicas,
        "restartPolicy": "OnFailure",
        "template": {
            "metadata": {"labels": dict(POD_LABELS)},
            "spec": {
                "serviceAccountName": settings.TRAIN_SERVICE_ACCOUNT,
                "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
                "securityContext": POD_SECURITY,
                "containers": [container],
                "nodeSelector": dict(spec.job.node_selector),
                "tolerations": [dict(t) for t in spec.job.tolerations],
                "volumes": pod_volumes(spec.job.train_shm_per_node),
            },
        },
    }


def build_pytorchjob(spec: JobSpec) -> dict:
    """The PyTorchJob manifest (Training Operator v1): Master x1 + Worker x(nodes - 1)."""
    replicas = {"Master": _replica(spec, 1)}
    if spec.job.num_nodes > 1:
        replicas["Worker"] = _replica(spec, spec.job.num_nodes - 1)
    run_policy = {
        "cleanPodPolicy": "Running",  # finished pods stay for their logs until the TTL
        "backoffLimit": spec.backoff_limit,
        "activeDeadlineSeconds": spec.timeout_seconds,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
    }
    if spec.job.queue_name:
        run_policy["suspend"] = True  # Kueue admits it by resuming it
    return {
        "apiVersion": f"{PYTORCHJOB.group}/{PYTORCHJOB.version}",
        "kind": PYTORCHJOB.kind,
        "metadata": _metadata(spec),
        "spec": {
            "nprocPerNode": str(spec.job.gpus_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }


def build_trainjob(spec: JobSpec) -> dict:
    """The TrainJob manifest (Trainer v2) on the project's ``TrainingRuntime``."""
    pod_patch = {
        "securityContext": POD_SECURITY,  # as the runtime's, should another runtime lack it
        "nodeSelector": dict(spec.job.node_selector),
        "tolerations": [dict(t) for t in spec.job.tolerations],
        "volumes": [v for v in pod_volumes(spec.job.train_shm_per_node) if v["name"] == "dshm"],
    }
    pod = {"metadata": {"labels": dict(POD_LABELS)}, "spec": pod_patch}
    node_patch = {"name": "node", "template": {"spec": {"template": pod}}}
    job = {
        "apiVersion": f"{TRAINJOB.group}/{TRAINJOB.version}",
        "kind": TRAINJOB.kind,
        "metadata": _metadata(spec),
        "spec": {
            "runtimeRef": {
                "apiGroup": TRAINJOB.group,
                "kind": "TrainingRuntime",
                "name": TRAINING_RUNTIME,
            },
            "activeDeadlineSeconds": spec.timeout_seconds,
            "trainer": {
                "image": spec.job.image,
                "command": _command(spec),
                "env": _env(spec),
                "numNodes": spec.job.num_nodes,
                "resourcesPerNode": _resources(spec),
            },
            "runtimePatches": [
                {
                    "manager": LAUNCHER,
                    "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node_patch]}}},
                }
            ],
        },
    }
    if spec.job.queue_name:
        job["spec"]["suspend"] = True  # Kueue admits it by resuming it
    return job


BUILDERS = {PYTORCHJOB.name: build_pytorchjob, TRAINJOB.name: build_trainjob}


def build_job(spec: JobSpec) -> dict:
    """The manifest of ``spec``'s engine (``spec.job.training_engine``)."""
    return BUILDERS[spec.job.training_engine](spec)
