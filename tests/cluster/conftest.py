"""A real Kubernetes API server for the ``cluster`` tests, the envtest way.

``etcd`` and ``kube-apiserver`` from ``$KUBEBUILDER_ASSETS`` run on 127.0.0.1 with token
authentication and RBAC, and stop by PID when the session ends. There is no controller manager,
scheduler or kubelet: no pod ever runs, and the tests write job status the way the training
operators would. Without ``KUBEBUILDER_ASSETS`` the tests skip with the way to get the assets.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.crds import crd

REPO = Path(__file__).resolve().parents[2]
# The upstream CRDs in copies a 1.20 server accepts (tests/crds.py: CELLSEG_CRDS or `make crds`)
CRD_FILES = (
    "kubeflow.org_pytorchjobs.yaml",
    "trainer.kubeflow.org_trainjobs.yaml",
    "trainer.kubeflow.org_trainingruntimes.yaml",
    "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    "kubeflow.org_profiles.yaml",  # multi-user Kubeflow (overlays/kubeflow)
    "security.istio.io_authorizationpolicies.yaml",  # and PeerAuthentication
    "kueue/kueue.x-k8s.io_localqueues.yaml",  # Kueue v0.19.2
    "kueue/kueue.x-k8s.io_clusterqueues.yaml",
    "kueue/kueue.x-k8s.io_resourceflavors.yaml",
    "kueue/kueue.x-k8s.io_workloads.yaml",
    "serving.kserve.io_inferenceservices.yaml",  # KServe v0.20.0 (overlays/serving*)
    "serving.kserve.io_clusterservingruntimes.yaml",
    "argoproj.io_workflows.yaml",  # Argo v4.0.5 (KFP 2.17): the launcher reads its run's Workflow
)
NAMESPACE = "cellseg"
PIPELINE_SA = f"system:serviceaccount:{NAMESPACE}:cellseg-pipeline"
TRAIN_SA = f"system:serviceaccount:{NAMESPACE}:cellseg-train"
HOW_TO_GET = (
    "KUBEBUILDER_ASSETS is not set: with internet, "
    "`export KUBEBUILDER_ASSETS=$(setup-envtest use -p path)`; here, "
    '`export KUBEBUILDER_ASSETS="$(../shared/tools/envtest-assets.sh | tail -1)"`'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ApiServer:
    url: str
    root: Path
    tokens: dict[str, str]  # user -> bearer token
    kubectl_bin: str

    def client(self, user: str = "admin", url: str | None = None):
        """A kubernetes ApiClient authenticated as ``user`` (optionally through another URL)."""
        from kubernetes import client

        config = client.Configuration()
        config.host = url or self.url
        config.verify_ssl = False
        config.api_key = {"authorization": f"Bearer {self.tokens[user]}"}
        return client.ApiClient(config)

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.kubectl_bin, f"--kubeconfig={self.root / 'kubeconfig'}", *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check:
            assert result.returncode == 0, f"{' '.join(args)}:\n{result.stderr}"
        return result


def _write_credentials(root: Path) -> dict[str, str]:
    subprocess.run(
        ["openssl", "genrsa", "-out", str(root / "sa.key"), "2048"], check=True, capture_output=True
    )
    tokens = {"admin": "admin-token", PIPELINE_SA: "pipeline-token", TRAIN_SA: "train-token"}
    groups = {
        "admin": "system:masters",
        PIPELINE_SA: f"system:serviceaccounts,system:serviceaccounts:{NAMESPACE}",
        TRAIN_SA: f"system:serviceaccounts,system:serviceaccounts:{NAMESPACE}",
    }
    lines = [f'{tok},{user},{user},"{groups[user]}"' for user, tok in tokens.items()]
    (root / "tokens.csv").write_text("\n".join(lines) + "\n")
    return tokens


def _wait_ready(url: str, token: str, procs: list, seconds: float = 90) -> None:
    import ssl
    import urllib.request

    ctx = ssl._create_unverified_context()  # the server's self-signed certificate
    request = urllib.request.Request(f"{url}/readyz", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}")
        try:
            with urllib.request.urlopen(request, context=ctx, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"kube-apiserver not ready after {seconds:.0f} s")


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory):
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if not assets:
        if os.environ.get("CI"):  # .ci/run provides the assets: there these tests must run
            pytest.fail(HOW_TO_GET)
        pytest.skip(HOW_TO_GET)
    assets = Path(assets)
    root = tmp_path_factory.mktemp("envtest")
    tokens = _write_credentials(root)
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    logs = (root / "etcd.log").open("w"), (root / "apiserver.log").open("w")
    etcd = subprocess.Popen(
        [str(assets / "etcd"), f"--data-dir={root / 'etcd'}",
         f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
         f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
         f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
         f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
         f"--initial-cluster=default=http://127.0.0.1:{peer_port}", "--unsafe-no-fsync"],
        stdout=logs[0], stderr=subprocess.STDOUT,
    )  # fmt: skip
    apiserver = subprocess.Popen(
        [str(assets / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
         "--bind-address=127.0.0.1", f"--secure-port={api_port}", f"--cert-dir={root / 'certs'}",
         f"--token-auth-file={root / 'tokens.csv'}", "--authorization-mode=RBAC",
         f"--service-account-key-file={root / 'sa.key'}",
         f"--service-account-signing-key-file={root / 'sa.key'}",
         "--service-account-issuer=https://kubernetes.default.svc",
         "--service-cluster-ip-range=10.0.0.0/24", "--disable-admission-plugins=ServiceAccount",
         # watches go to etcd, compacted every 2 s: an old resourceVersion really expires (410)
         "--watch-cache=false", "--etcd-compaction-interval=2s"],
        stdout=logs[1], stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"https://127.0.0.1:{api_port}"
    try:
        _wait_ready(url, tokens["admin"], [etcd, apiserver])
        (root / "kubeconfig").write_text(yaml.safe_dump(kubeconfig(url, tokens["admin"])))
        yield ApiServer(url, root, tokens, find_kubectl(assets))
    finally:
        for proc in (apiserver, etcd):  # stop by PID, the server first
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def find_kubectl(assets: Path) -> str:
    """The project's kubectl (a test dependency), else the assets', else the one on PATH."""
    for candidate in (Path(sys.executable).parent / "kubectl", assets / "kubectl"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("kubectl") or "kubectl"


def kubeconfig(url: str, token: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "envtest", "cluster": {"server": url, "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "admin"}}],
        "current-context": "envtest",
    }


@pytest.fixture(scope="session")
def installed(apiserver):
    """The CRDs and the generic-gpu overlay (namespace, RBAC, runtime, ...) on the server."""
    crds = [crd(name, k8s_120=True) for name in CRD_FILES]
    for path in crds:
        # big CRDs: `create --validate=false` (apply's last-applied annotation exceeds 256 KiB)
        apiserver.kubectl("create", "--validate=false", "-f", str(path))
    names = [d["metadata"]["name"] for p in crds for d in yaml.safe_load_all(p.read_text()) if d]
    apiserver.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                      *[f"crd/{n}" for n in names])  # fmt: skip
    apiserver.kubectl("apply", "-k", str(REPO / "manifests" / "overlays" / "generic-gpu"))
    return apiserver
