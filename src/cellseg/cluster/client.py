"""Where this process reaches the cluster from: the pod's own account inside a cluster, your
kubeconfig outside it."""

from __future__ import annotations

import os
from pathlib import Path

from cellseg.errors import CellsegError
from cellseg.settings import CHECKPOINTS_MOUNT, NAMESPACE


class ClusterUnreachable(CellsegError):
    """No credentials to reach a cluster with."""


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


def kubeconfig_path() -> str:
    """The kubeconfig(s) the kubernetes client reads: ``$KUBECONFIG`` (a ``:``-separated list),
    else ``~/.kube/config``."""
    return os.path.expanduser(os.environ.get("KUBECONFIG") or "~/.kube/config")


def api_client():
    """A ``kubernetes.client.ApiClient``: in-cluster credentials, else the kubeconfig. Neither
    is one line (:class:`ClusterUnreachable`) naming where it looked and how to point it."""
    import yaml
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        path = kubeconfig_path()
        try:
            config.load_kube_config()  # the client's own lookup, which `path` names
        except (config.ConfigException, OSError, yaml.YAMLError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ClusterUnreachable(
                f"no cluster credentials: not in a pod (KUBERNETES_SERVICE_HOST unset) and "
                f"kubeconfig {path} unusable ({reason}); set KUBECONFIG=<file> or run "
                "`kubectl config use-context <cluster>`"
            ) from None
    return client.ApiClient()
