"""Where this process reaches the cluster from: the pod's own account inside a cluster, your
kubeconfig outside it."""

from __future__ import annotations

import os
from pathlib import Path

from cellseg.settings import CHECKPOINTS_MOUNT, NAMESPACE

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def run_scratch(pipeline_run_id: str) -> Path | None:
    """A pipeline run's folder on the checkpoints volume, which the training steps and their
    jobs' pods share (staged dataset, checkpoints); None outside a cluster (no such volume)."""
    return Path(CHECKPOINTS_MOUNT) / pipeline_run_id if in_cluster() else None


def pod_namespace() -> str:
    """This pod's namespace; :data:`cellseg.settings.NAMESPACE` outside a cluster."""
    path = SERVICE_ACCOUNT / "namespace"
    return path.read_text().strip() if path.is_file() else NAMESPACE


def api_client():
    """A ``kubernetes.client.ApiClient``: in-cluster credentials, else the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()
