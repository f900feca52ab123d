"""Distributed training on Kubernetes: a PyTorchJob (Kubeflow Training Operator, kubeflow.org/v1).

Master x1 + Worker x(nodes - 1), each running ``torchrun -m cellseg.cli train ...`` in a
container named ``pytorch``; the operator sets the rendezvous (``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``/``PORT``) that torchrun reads, so
the training code path is the one ``torchrun --nproc_per_node=N`` runs locally.

The dataset and checkpoints live on a ReadWriteMany volume that the KFP step and the job's pods
both mount; a job name is fixed per pipeline run and phase, so a retried step finds its job (or
recreates a failed one) and training resumes from ``latest_phase{N}.pt`` on the volume.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field

from cellseg.errors import JobFailed
from cellseg.ops import cluster

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_LABEL = "training.kubeflow.org/job-name"


@dataclass(frozen=True)
class JobSpec:
    """Everything a PyTorchJob for one training phase needs."""

    name: str
    image: str
    train_args: tuple[str, ...]  # after `cellseg train`
    namespace: str = cluster.NAMESPACE
    nodes: int = 1
    gpus_per_node: int = 1
    node_selector: dict = field(default_factory=lambda: dict(cluster.GPU_NODE_SELECTOR))
    tolerations: tuple[dict, ...] = cluster.GPU_TOLERATIONS
    mlflow_uri: str = ""
    cpu: str = "8"
    memory: str = "64Gi"
    shm: str = "16Gi"  # DataLoader workers share tensors through /dev/shm
    backoff_limit: int = 3
    timeout_seconds: int = 3 * 24 * 3600  # the job's deadline and how long the launcher waits
    ttl_seconds_after_finished: int = 7 * 24 * 3600


def job_name(pipeline_run_id: str, phase: int) -> str:
    """A DNS-1123 name, distinct per pipeline run and phase, stable across retries."""
    slug = re.sub(r"[^a-z0-9-]", "-", pipeline_run_id.lower()).strip("-")[:40] or "run"
    return f"cellseg-{slug}-phase{phase}"


def _container(spec: JobSpec) -> dict:
    env = [
        {"name": "HF_HOME", "value": cluster.HF_CACHE_MOUNT},
        {
            "name": "HF_TOKEN",
            "valueFrom": {
                "secretKeyRef": {
                    "name": cluster.HF_TOKEN_SECRET,
                    "key": "HF_TOKEN",
                    "optional": True,
                }
            },
        },
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.mlflow_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": spec.mlflow_uri})
    gpus = str(spec.gpus_per_node)
    return {
        "name": "pytorch",  # the Training Operator finds the training container by this name
        "image": spec.image,
        "command": ["torchrun", "-m", "cellseg.cli", "train", *spec.train_args],
        "env": env,
        "resources": {
            "requests": {"cpu": spec.cpu, "memory": spec.memory, cluster.ACCELERATOR: gpus},
            "limits": {"memory": spec.memory, cluster.ACCELERATOR: gpus},
        },
        "volumeMounts": [
            {"name": "checkpoints", "mountPath": cluster.CHECKPOINTS_MOUNT},
            {"name": "hf-cache", "mountPath": cluster.HF_CACHE_MOUNT},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def _replica(spec: JobSpec, replicas: int) -> dict:
    return {
        "replicas": replicas,
        "restartPolicy": "OnFailure",
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/name": "cellseg-train"}},
            "spec": {
                "serviceAccountName": cluster.TRAIN_SERVICE_ACCOUNT,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
                "containers": [_container(spec)],
                "nodeSelector": dict(spec.node_selector),
                "tolerations": [dict(t) for t in spec.tolerations],
                "volumes": [
                    {
                        "name": "checkpoints",
                        "persistentVolumeClaim": {"claimName": cluster.CHECKPOINTS_PVC},
                    },
                    {
                        "name": "hf-cache",
                        "persistentVolumeClaim": {"claimName": cluster.HF_CACHE_PVC},
                    },
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm}},
                ],
            },
        },
    }


def build_pytorchjob(spec: JobSpec) -> dict:
    """The PyTorchJob manifest (a plain dict, ready for the API or ``yaml.safe_dump``)."""
    if spec.nodes < 1 or spec.gpus_per_node < 1:
        raise ValueError("nodes and gpus_per_node must be >= 1")
    replicas = {"Master": _replica(spec, 1)}
    if spec.nodes > 1:
        replicas["Worker"] = _replica(spec, spec.nodes - 1)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/part-of": "cellseg-kfp"},
        },
        "spec": {
            "nprocPerNode": str(spec.gpus_per_node),
            "runPolicy": {
                "cleanPodPolicy": "Running",  # finished pods stay for their logs until the TTL
                "backoffLimit": spec.backoff_limit,
                "activeDeadlineSeconds": spec.timeout_seconds,
                "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


def job_condition(job: dict) -> str | None:
    """``Succeeded`` / ``Failed`` once finished, else the latest condition type (or None)."""
    conditions = (job.get("status") or {}).get("conditions") or []
    done = [
        c["type"]
        for c in conditions
        if c.get("status") == "True" and c["type"] in ("Succeeded", "Failed")
    ]
    if done:
        return done[-1]
    return conditions[-1]["type"] if conditions else None


class JobRunner:
    """Create a PyTorchJob, follow its master's log, and wait for it to finish."""

    def __init__(self, api_client, poll_seconds: float = 10.0, out=sys.stdout):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.poll_seconds = poll_seconds
        self.out = out

    def get(self, name: str, namespace: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def submit(self, job: dict, delete_timeout: float = 300.0) -> None:
        """Create ``job``; a running one of that name (a retried step) is followed instead, a
        failed one is replaced (training resumes from the checkpoints on the volume)."""
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        existing = self.get(name, namespace)
        if existing is not None and job_condition(existing) in ("Failed", "Succeeded"):
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            deadline = time.monotonic() + delete_timeout
            while self.get(name, namespace) is not None:
                if time.monotonic() > deadline:
                    raise JobFailed(
                        f"PyTorchJob {namespace}/{name}: old job not deleted after "
                        f"{delete_timeout:.0f} s (a finalizer?); delete it by hand and retry"
                    )
                time.sleep(self.poll_seconds)
            existing = None
        if existing is None:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)

    def _pod_log(self, pod: str, namespace: str) -> list[str]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.core.read_namespaced_pod_log(
                pod, namespace, container="pytorch"
            ).splitlines()
        except ApiException:
            return []  # not started yet

    def last_lines(self, name: str, namespace: str, n: int = 20) -> str:
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={name}").items
        parts = []
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            lines = self._pod_log(pod.metadata.name, namespace)[-n:]
            parts.append(f"--- {pod.metadata.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def wait(self, name: str, namespace: str, timeout_seconds: float) -> None:
        """Stream the master's new log lines until the job succeeds.

        Raises:
            JobFailed: the job failed (with each pod's last lines).
            JobFailed: also when ``timeout_seconds`` of wall-clock time passed first.
        """
        deadline = time.monotonic() + timeout_seconds
        master, shown = f"{name}-master-0", 0
        while True:
            lines = self._pod_log(master, namespace)
            for line in lines[shown:]:
                print(line, file=self.out, flush=True)
            shown = max(shown, len(lines))
            job = self.get(name, namespace)
            state = job_condition(job) if job else "Deleted"
            if state == "Succeeded":
                return
            if state in ("Failed", "Deleted"):
                tails = self.last_lines(name, namespace)
                raise JobFailed(f"PyTorchJob {namespace}/{name} {state.lower()}:\n{tails}")
            if time.monotonic() > deadline:
                raise JobFailed(
                    f"PyTorchJob {namespace}/{name} not finished after {timeout_seconds:.0f} s"
                )
            time.sleep(self.poll_seconds)


def run_pytorchjob(spec: JobSpec, api_client=None) -> None:
    """Submit and wait (in-cluster credentials unless ``api_client`` is given)."""
    if api_client is None:
        from kubernetes import client, config

        config.load_incluster_config()
        api_client = client.ApiClient()
    runner = JobRunner(api_client)
    runner.submit(build_pytorchjob(spec))
    runner.wait(spec.name, spec.namespace, spec.timeout_seconds)
