"""`cellseg doctor` against a real API server: it names what a namespace lacks (the Secret,
the TrainingRuntime, the volumes, the launcher's rights, the queue) and passes once it is there.
MLflow is a real HTTP server on 127.0.0.1 answering /health."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest

from cellseg import settings as cluster
from cellseg.cluster.doctor import DoctorOptions, blockers, run_checks
from tests.cluster.conftest import NAMESPACE, REPO

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def mlflow_uri():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/health"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b"OK" if ok else b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def lines(results) -> str:
    return "\n".join(r.line() for r in results)


def failed(results) -> dict[str, str]:
    return {r.requirement: r.detail for r in blockers(results)}


def test_a_bare_namespace_fails_and_each_missing_piece_is_named(installed, mlflow_uri):
    installed.kubectl("create", "namespace", "doctor-bare")
    settings = DoctorOptions(namespace="doctor-bare", engine="trainjob", mlflow_uri=mlflow_uri)
    results = run_checks(installed.client("admin"), settings)
    missing = failed(results)
    assert missing["TrainingRuntime doctor-bare/cellseg-torch"] == "missing", lines(results)
    assert missing[f"Secret doctor-bare/{cluster.HF_TOKEN_SECRET} (key HF_TOKEN)"] == "missing"
    assert missing[f"PersistentVolumeClaim doctor-bare/{cluster.CHECKPOINTS_PVC}"] == "missing"
    rbac = missing["RBAC: what the launcher does, as cellseg-pipeline in doctor-bare"]
    assert "create trainjobs.trainer.kubeflow.org" in rbac and "get pods/log" in rbac
    steps = missing["RBAC: what KFP does in a step, as cellseg-pipeline in doctor-bare"]
    assert "create workflowtaskresults.argoproj.io" in steps
    rolling = DoctorOptions(namespace="doctor-bare", engine="trainjob", mlflow_uri=mlflow_uri,
                            inference_service="cellseg")  # fmt: skip
    rollout = failed(run_checks(installed.client("admin"), rolling))
    assert rollout["RBAC: what the promote step does, as cellseg-pipeline in doctor-bare"] == (
        "denied: get inferenceservices.serving.kserve.io, patch inferenceservices.serving.kserve.io"
    )
    passed = {r.requirement for r in results if r.ok}
    assert "TrainJob CRD trainjobs.trainer.kubeflow.org v1alpha1" in passed  # with runtimePatches
    assert f"MLflow {mlflow_uri}/health" in passed


def test_the_deployed_namespace_passes_once_its_secret_exists_and_volumes_bind(
    installed, mlflow_uri
):
    api = installed.client("admin")
    settings = DoctorOptions(namespace=NAMESPACE, engine="trainjob", mlflow_uri=mlflow_uri)
    before = failed(run_checks(api, settings))
    assert f"Secret {NAMESPACE}/{cluster.HF_TOKEN_SECRET} (key HF_TOKEN)" in before
    installed.kubectl("-n", NAMESPACE, "create", "secret", "generic", cluster.HF_TOKEN_SECRET,
                      "--from-literal=HF_TOKEN=hf_test")  # fmt: skip
    from kubernetes import client

    core = client.CoreV1Api(api)
    for claim in (cluster.DATASETS_PVC, cluster.CHECKPOINTS_PVC, cluster.HF_CACHE_PVC):
        # what the volume controller writes once a volume is provisioned (none runs here)
        core.patch_namespaced_persistent_volume_claim_status(
            claim, NAMESPACE, {"status": {"phase": "Bound"}}
        )
    for engine in ("trainjob", "pytorchjob"):
        results = run_checks(
            api, DoctorOptions(namespace=NAMESPACE, engine=engine, mlflow_uri=mlflow_uri)
        )
        assert [r for r in results if not r.ok] == [], lines(results)


def test_a_queue_needs_its_local_queue_and_its_cluster_queue(installed, mlflow_uri, tmp_path):
    api = installed.client("admin")
    settings = DoctorOptions(namespace=NAMESPACE, queue_name="cellseg-gpu", mlflow_uri=mlflow_uri)
    queue = "LocalQueue cellseg/cellseg-gpu (kueue.x-k8s.io/v1beta2)"
    assert queue in failed(run_checks(api, settings))
    local_queue = REPO / "manifests" / "components" / "kueue" / "local-queue.yaml"
    installed.kubectl("apply", "-n", NAMESPACE, "-f", str(local_queue))
    missing = failed(run_checks(api, settings))
    assert queue not in missing
    assert missing["ClusterQueue gpu-cluster-queue"].startswith("missing")
    path = tmp_path / "cq.yaml"
    path.write_text(
        "apiVersion: kueue.x-k8s.io/v1beta2\nkind: ClusterQueue\n"
        "metadata: {name: gpu-cluster-queue}\nspec: {namespaceSelector: {}}\n"
    )
    installed.kubectl("apply", "-f", str(path))
    assert "ClusterQueue gpu-cluster-queue" not in failed(run_checks(api, settings))


def test_cellseg_doctor_exits_non_zero_and_prints_one_line_per_requirement(installed, mlflow_uri):
    installed.kubectl("create", "namespace", "doctor-cli")
    env = {
        **os.environ,
        "KUBECONFIG": str(installed.root / "kubeconfig"),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    env.pop("KFP_HOST", None)
    result = subprocess.run(
        [sys.executable, "-m", "cellseg.cli", "doctor", "--namespace", "doctor-cli",
         "--training-engine", "trainjob", "--mlflow-uri", mlflow_uri],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert all(line.split()[0] in ("PASS", "FAIL", "WARN") for line in out), out
    assert "FAIL  TrainingRuntime doctor-cli/cellseg-torch: missing  -> fix:" in result.stdout
    assert "requirement(s) failed" in result.stderr


@pytest.mark.parametrize("kubeconfig", ["absent", "garbled"])
def test_doctor_without_usable_cluster_credentials_is_one_line_naming_where_it_looked(
    tmp_path, kubeconfig
):
    """Not in a pod and no usable kubeconfig: one line with the path it read and how to point
    it at a cluster, exit 2, no traceback (the kubernetes client raises ConfigException or a
    YAML error)."""
    path = tmp_path / "config"
    if kubeconfig == "garbled":
        path.write_text("clusters: [\n")
    env = {**os.environ, "KUBECONFIG": str(path), "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    result = subprocess.run(
        [sys.executable, "-m", "cellseg.cli", "doctor"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(path) in err[0] and "KUBECONFIG" in err[0], err[0]
