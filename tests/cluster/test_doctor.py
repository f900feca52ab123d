"""`cellseg doctor` against a real API server: it names what a namespace lacks (the Secret,
the TrainingRuntime, the volumes, the launcher's rights, the queue) and passes once it is there.
MLflow is a real HTTP server on 127.0.0.1 answering /health."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import yaml

from cellseg import settings as cluster
from cellseg.cluster.doctor import (
    MLFLOW_AUTHENTICATED_CALL,
    DoctorOptions,
    blockers,
    run_checks,
)
from tests.cluster.conftest import NAMESPACE, REPO

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def mlflow_uri():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # an MLflow without authentication: /health and a search answer
            ok = self.path in ("/health", MLFLOW_AUTHENTICATED_CALL)
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


# kubernetes-sigs/kueue v0.19.2 config/components/manager/controller_manager_config.yaml: the
# frameworks its default configuration enables (kubeflow.org/pytorchjob is commented out there)
KUEUE_DEFAULT_FRAMEWORKS = [
    "batch/job", "kubeflow.org/mpijob", "ray.io/rayjob", "ray.io/raycluster", "ray.io/rayservice",
    "jobset.x-k8s.io/jobset", "workload.codeflare.dev/appwrapper", "trainer.kubeflow.org/trainjob",
    "pod", "deployment", "statefulset", "leaderworkerset.x-k8s.io/leaderworkerset",
]  # fmt: skip


def test_a_queue_needs_kueue_to_manage_the_engines_kind(installed, mlflow_uri, tmp_path):
    """Kueue creates Workloads only for ``integrations.frameworks`` of its configuration, the
    ConfigMap ``kueue-system/kueue-manager-config`` (key ``controller_manager_config.yaml``,
    kubernetes-sigs/kueue v0.19.2 config/components/manager/kustomization.yaml)."""
    api = installed.client("admin")
    installed.kubectl("create", "namespace", "kueue-system", check=False)
    config = {"apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
              "integrations": {"frameworks": KUEUE_DEFAULT_FRAMEWORKS}}  # fmt: skip
    path = tmp_path / "kueue.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kueue-manager-config", "namespace": "kueue-system"},
        "data": {"controller_manager_config.yaml": yaml.safe_dump(config)},
    }))  # fmt: skip
    installed.kubectl("apply", "-f", str(path))
    options = dict(namespace=NAMESPACE, queue_name="cellseg-gpu", mlflow_uri=mlflow_uri)
    pytorchjob = failed(run_checks(api, DoctorOptions(engine="pytorchjob", **options)))
    line = pytorchjob[
        "Kueue manages kubeflow.org/pytorchjob (ConfigMap kueue-system/kueue-manager-config)"
    ]
    assert line.startswith("not in integrations.frameworks (batch/job,"), line
    trainjob = run_checks(api, DoctorOptions(engine="trainjob", **options))
    passed = {r.requirement for r in trainjob if r.ok}
    assert (
        "Kueue manages trainer.kubeflow.org/trainjob (ConfigMap kueue-system/kueue-manager-config)"
        in passed
    )
    installed.kubectl("delete", "-f", str(path))


def test_a_flavor_whose_tolerations_lack_the_gpu_one_fails_for_trainjobs(
    installed, mlflow_uri, tmp_path
):
    """Kueue writes the ResourceFlavor's tolerations into the TrainJob's runtime patch of
    manager ``kueue.x-k8s.io/manager`` (kubernetes-sigs/kueue v0.19.2
    pkg/controller/jobs/trainjob/trainjob_controller.go, ``RunWithPodSetsInfo``; the values from
    pkg/podset/podset.go ``FromAssignment``). kubeflow/trainer v2.3.0
    pkg/runtime/core/trainingruntime.go ``mergeRuntimePatches`` applies the patches in order as
    strategic merge patches, and PodSpec ``tolerations`` has no patch strategy: the flavor's
    list replaces the launcher's, GPU toleration and all."""
    api = installed.client("admin")
    local_queue = REPO / "manifests" / "components" / "kueue" / "local-queue.yaml"
    installed.kubectl("apply", "-n", NAMESPACE, "-f", str(local_queue))
    spot = {"key": "cloud.example/spot", "operator": "Exists", "effect": "NoSchedule"}
    objects = [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
         "metadata": {"name": "h100-spot"}, "spec": {"tolerations": [spot]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue",
         "metadata": {"name": "gpu-cluster-queue"},
         "spec": {"namespaceSelector": {}, "resourceGroups": [{
             "coveredResources": ["nvidia.com/gpu"],
             "flavors": [{"name": "h100-spot",
                          "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 8}]}]}]}},
    ]  # fmt: skip
    path = tmp_path / "flavor.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    installed.kubectl("apply", "-f", str(path))
    options = dict(namespace=NAMESPACE, queue_name="cellseg-gpu", mlflow_uri=mlflow_uri)
    requirement = "ResourceFlavor h100-spot keeps the GPU toleration (trainjob)"
    missing = failed(run_checks(api, DoctorOptions(engine="trainjob", **options)))
    assert "lack nvidia.com/gpu:NoSchedule: pods go Unschedulable" in missing[requirement]
    objects[0]["spec"]["tolerations"].append(dict(cluster.GPU_TOLERATIONS[0]))
    path.write_text(yaml.safe_dump_all(objects))
    installed.kubectl("apply", "-f", str(path))
    results = run_checks(api, DoctorOptions(engine="trainjob", **options))
    assert requirement in {r.requirement for r in results if r.ok}, lines(results)


@pytest.mark.parametrize(("tag", "required"), [("2.14.4", True), ("2.15.0", False)])
def test_before_kfp_2_15_the_steps_optional_secrets_must_exist(
    installed, mlflow_uri, tag, required
):
    """KFP's driver sets ``optional`` on a Secret env var only from 2.15.0 (kubeflow/pipelines
    2.15.0 backend/src/v2/driver/k8s.go; 2.5.0 backend/src/v2/driver/driver.go builds the
    ``SecretKeySelector`` without it, as 2.14.x's k8s.go): before that a missing Secret or key
    keeps the step's pod in CreateContainerConfigError, which Argo never fails."""
    namespace = f"doctor-kfp-{tag.replace('.', '-')}"
    installed.kubectl("create", "namespace", namespace)
    health = json.dumps({"tag_name": tag, "multi_user": False})

    def get(url, headers=None, timeout=10):
        if url.endswith("/apis/v2beta1/healthz"):
            return 200, health
        return 200, "OK"  # MLflow

    api = installed.client("admin")
    options = DoctorOptions(namespace=namespace, mlflow_uri=mlflow_uri, kfp_host="http://kfp")
    names = {f"Secret {namespace}/{secret} (KFP {tag} < 2.15.0 requires it)"
             for secret in (cluster.MLFLOW_AUTH_SECRET, cluster.DVC_REMOTE_SECRET)}  # fmt: skip
    missing = failed(run_checks(api, options, get))
    if not required:
        assert not names & set(missing)
        return
    assert names <= set(missing), lines(run_checks(api, options, get))
    assert all(missing[n].startswith("missing: every step") for n in names)
    installed.kubectl("-n", namespace, "create", "secret", "generic", cluster.MLFLOW_AUTH_SECRET,
                      "--from-literal=MLFLOW_TRACKING_USERNAME=",
                      "--from-literal=MLFLOW_TRACKING_PASSWORD=")  # fmt: skip
    installed.kubectl("-n", namespace, "create", "secret", "generic", cluster.DVC_REMOTE_SECRET,
                      "--from-literal=AWS_ACCESS_KEY_ID=")  # fmt: skip
    missing = failed(run_checks(api, options, get))
    dvc = f"Secret {namespace}/{cluster.DVC_REMOTE_SECRET} (KFP {tag} < 2.15.0 requires it)"
    assert missing[dvc] == "has no AWS_SECRET_ACCESS_KEY"
    assert (
        f"Secret {namespace}/{cluster.MLFLOW_AUTH_SECRET} (KFP {tag} < 2.15.0 requires it)"
        not in missing
    )


def test_the_serving_mode_is_reported_and_a_canary_said_to_be_refused(installed, mlflow_uri):
    api = installed.client("admin")
    installed.kubectl("apply", "-k", str(REPO / "manifests" / "overlays" / "serving"))
    installed.kubectl("annotate", "--overwrite", "inferenceservice", "cellseg", "-n", NAMESPACE,
                      "serving.kserve.io/deploymentMode=RawDeployment")  # fmt: skip
    options = DoctorOptions(namespace=NAMESPACE, mlflow_uri=mlflow_uri, inference_service="cellseg")
    (mode,) = [r for r in run_checks(api, options) if "deployment mode" in r.requirement]
    assert mode.ok and mode.detail.startswith("Standard, from its serving.kserve.io/deploymentMode")
    assert "canary_traffic_percent is refused" in mode.detail
    installed.kubectl("annotate", "inferenceservice", "cellseg", "-n", NAMESPACE,
                      "serving.kserve.io/deploymentMode-")  # fmt: skip


def test_mlflow_user_reads_both_logins_from_their_secrets_in_one_line_errors(installed):
    """`make mlflow-user` takes the admin's login from ``mlflow-admin`` and the pipeline's from
    ``cellseg-mlflow-auth`` (manifests/secrets/*.template.yaml), never from a command line."""
    from cellseg.errors import CellsegError
    from cellseg.registry.users import ADMIN_KEYS, ADMIN_SECRET, secret_login

    namespace = "doctor-mlflow-user"
    installed.kubectl("create", "namespace", namespace)
    api = installed.client("admin")
    with pytest.raises(CellsegError, match=f"Secret {namespace}/{ADMIN_SECRET}: 404"):
        secret_login(api, namespace, ADMIN_SECRET, ADMIN_KEYS)
    installed.kubectl("-n", namespace, "create", "secret", "generic", ADMIN_SECRET,
                      "--from-literal=username=admin")  # fmt: skip
    with pytest.raises(CellsegError, match="has no password"):
        secret_login(api, namespace, ADMIN_SECRET, ADMIN_KEYS)
    installed.kubectl("-n", namespace, "create", "secret", "generic", cluster.MLFLOW_AUTH_SECRET,
                      "--from-literal=MLFLOW_TRACKING_USERNAME=cellseg",
                      "--from-literal=MLFLOW_TRACKING_PASSWORD=pipeline-secret")  # fmt: skip
    login = secret_login(api, namespace, cluster.MLFLOW_AUTH_SECRET, cluster.MLFLOW_AUTH_KEYS)
    assert (login.username, login.password) == ("cellseg", "pipeline-secret")
    assert "pipeline-secret" not in repr(login)
    # the empty Secret an old KFP backend needs (check_step_secrets) is "no login", not an error
    installed.kubectl("-n", namespace, "create", "secret", "generic", "empty-login",
                      "--from-literal=MLFLOW_TRACKING_USERNAME=",
                      "--from-literal=MLFLOW_TRACKING_PASSWORD=")  # fmt: skip
    assert secret_login(api, namespace, "empty-login", cluster.MLFLOW_AUTH_KEYS) is None
