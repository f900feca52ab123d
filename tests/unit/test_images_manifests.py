"""Dockerfiles and Kubernetes manifests, validated for real: hadolint, kustomize, the Kubernetes
OpenAPI schemas (kubernetes-validate), and the security rules for every container."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cellseg import settings as cluster

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILES = sorted((REPO / "images").glob("*Dockerfile"))
OVERLAYS = sorted(p.name for p in (REPO / "manifests" / "overlays").iterdir())
K8S_VERSION = "1.30.0"
LAUNCHER, STEPS = "cellseg-training-jobs", "cellseg-kfp-steps"  # the two Roles


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or pytest.fail(f"{name} missing")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_its_base_installs_only_the_lock_and_runs_as_non_root(dockerfile):
    text = dockerfile.read_text()
    # the base is a build argument (BASE_IMAGE) whose default is pinned by digest
    defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    bases = [defaults.get(b.strip("${}"), b) for b in re.findall(r"^FROM\s+(\S+)", text, re.M)]
    external = [b for b in bases if ":" in b or "/" in b]
    assert external and all(re.search(r":[\w.-]+@sha256:[0-9a-f]{64}$", b) for b in external)
    assert not any(b.split("@")[0].endswith(":latest") for b in external)
    for line in re.findall(r"pip install[^\n]*", text):
        assert "-r /tmp/requirements.lock" in line or "--no-deps" in line, line
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert not re.search(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY)\S*\s*=", text)


def test_dockerignore_keeps_data_and_outputs_out():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    rules = [x.strip() for x in lines if x.strip() and not x.startswith("#")]
    assert rules[0] == "*" and "!data/" not in rules and "!mlruns/" not in rules


def render(overlay: str) -> list[dict]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(REPO / "manifests" / "overlays" / overlay)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request):
    return render(request.param)


CUSTOM_KINDS = {
    "TrainingRuntime",
    "LocalQueue",
    "Profile",
    "ClusterServingRuntime",
    "InferenceService",
}  # the real API server: tests/cluster
NAMESPACE_KINDS = {"Namespace", "Profile"}  # the project's namespace, bare or a Profile
# kustomize stamps its namespace on kinds it does not know, ClusterServingRuntime too; the API
# server drops it for a cluster-scoped object (tests/cluster applies the serving overlays)
CLUSTER_SCOPED = NAMESPACE_KINDS | {"ClusterServingRuntime"}


def test_every_object_validates_against_the_kubernetes_schemas(objects):
    kinds = {o["kind"] for o in objects}
    assert {"PersistentVolumeClaim", "Deployment", "Service", "Role"} <= kinds
    assert len(kinds & NAMESPACE_KINDS) == 1  # the namespace: bare (standalone) or a Profile
    assert "TrainingRuntime" in kinds  # every overlay ships the Trainer v2 runtime
    for obj in objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        if obj["kind"] in NAMESPACE_KINDS:
            assert obj["metadata"]["name"] == "cellseg" and "namespace" not in obj["metadata"]
        elif obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == "cellseg", obj["metadata"]["name"]


def pod_specs(objects):
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def test_every_container_is_limited_non_root_and_unprivileged(objects):
    specs = list(pod_specs(objects))
    assert specs
    for name, pod in specs:
        pod_ctx = pod.get("securityContext", {})
        for c in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{c['name']}"
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})), where
            assert {"cpu", "memory"} <= set(res.get("limits", {})), where
            ctx = c.get("securityContext", {})
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), where


def test_rbac_allows_training_jobs_and_pod_logs_in_the_namespace_only(objects):
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (role,) = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == LAUNCHER]
    rules = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert rules == {
        ("trainer.kubeflow.org", "trainjobs"): {
            "create",
            "get",
            "list",
            "watch",
            "patch",
            "delete",
        },
        ("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "watch", "patch", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
        ("", "events"): {"get", "list", "watch"},
        ("kueue.x-k8s.io", "workloads"): {"get", "list"},
        ("argoproj.io", "workflows"): {"get"},  # is the step's run being terminated?
    }
    assert role["metadata"]["namespace"] == "cellseg"


def test_kfp_steps_get_their_own_role_bound_to_the_runs_account(objects):
    """What Argo's executor and KFP's launcher need in a step's pod, for cellseg-pipeline (the
    account pipelines/submit.py runs as), and no more: one secret by name, no pods written."""
    (role,) = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == STEPS]
    rules = {
        (g, r): rule for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert set(rules["argoproj.io", "workflowtaskresults"]["verbs"]) == {"create", "patch"}
    assert rules["", "secrets"]["resourceNames"] == ["mlpipeline-minio-artifact"]
    assert ("", "pods") not in rules
    (binding,) = [
        o for o in objects if o["kind"] == "RoleBinding" and o["metadata"]["name"] == STEPS
    ]
    assert binding["roleRef"]["name"] == STEPS
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": cluster.PIPELINE_SERVICE_ACCOUNT, "namespace": "cellseg"}
    ]


def test_every_pod_template_stays_out_of_the_mesh_with_a_seccomp_profile(objects):
    """Deployments, the TrainingRuntime's JobSet: each pod template the overlay describes."""
    from tests.pods import mesh_and_seccomp_problems, pod_templates

    described = [o for o in objects if list(pod_templates(o))]
    kinds = {o["kind"] for o in described}
    assert {"Deployment", "TrainingRuntime"} <= kinds <= {"Deployment", "TrainingRuntime",
                                                          "StatefulSet"}  # fmt: skip
    assert [p for o in described for p in mesh_and_seccomp_problems(o)] == []


def test_a_bare_namespace_warns_and_audits_against_restricted(objects):
    """Its pods comply (the pod templates above), so "restricted" is what it checks them by;
    enforcing is left to the cluster (KFP's own step pods share the namespace)."""
    for ns in [o for o in objects if o["kind"] == "Namespace"]:
        labels = ns["metadata"]["labels"]
        for mode in ("warn", "audit"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode


def test_the_kubeflow_overlay_is_a_profile_with_mlflow_behind_its_own_login():
    objects = render("kubeflow")
    (profile,) = [o for o in objects if o["kind"] == "Profile"]
    assert profile["apiVersion"] == "kubeflow.org/v1" and profile["spec"]["owner"]["kind"] == "User"
    assert not [o for o in objects if o["kind"] == "Namespace"]  # the profile controller's job
    assert "kfp-launcher" not in {
        o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"
    }
    (mlflow,) = [o for o in objects if o["kind"] == "Deployment"]
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
        cluster.MLFLOW_AUTH_SECRET
    )
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mlflow"}
    assert policy["spec"]["ingress"] == [
        {"from": [{"podSelector": {}}], "ports": [{"port": "http", "protocol": "TCP"}]}
    ]  # this namespace's pods only
    bound = {s["name"] for o in objects if o["kind"] == "RoleBinding" for s in o["subjects"]}
    assert "default-editor" in bound  # the account Kubeflow runs steps as by default


def test_the_local_queue_is_kueue_v1beta2():
    (queue,) = [o for o in render("kueue") if o["kind"] == "LocalQueue"]
    assert queue["apiVersion"] == "kueue.x-k8s.io/v1beta2"  # v1beta1: deprecated in Kueue 0.16


def test_the_serving_overlays_serve_the_champion_on_cpu_or_on_a_gpu():
    for overlay, gpus in (("serving", 0), ("serving-gpu", 1)):
        objects = render(overlay)
        (isvc,) = [o for o in objects if o["kind"] == "InferenceService"]
        (runtime,) = [o for o in objects if o["kind"] == "ClusterServingRuntime"]
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"], overlay
        limits = model["resources"]["limits"]
        assert int(limits.get(cluster.ACCELERATOR, 0)) == gpus, overlay
        assert f"--threads={limits['cpu']}" in model["args"], overlay  # threads = CPU limit
        assert ("--device=cuda" in model["args"]) == bool(gpus), overlay
        roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
        (rule,) = roles["cellseg-rollout"]["rules"]  # the promote step: roll, nothing more
        assert rule["resources"] == ["inferenceservices"] and rule["verbs"] == ["get", "patch"]


def test_shared_volumes_are_read_write_many(objects):
    pvcs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for name in (cluster.DATASETS_PVC, cluster.CHECKPOINTS_PVC, cluster.HF_CACHE_PVC):
        assert pvcs[name]["spec"]["accessModes"] == ["ReadWriteMany"], name


def test_the_training_runtime_mounts_what_the_pytorchjob_mounts(objects):
    """The TrainingRuntime (YAML) and the PyTorchJob builder (code) describe the same pods:
    same volumes, mounts, service account and security, from the names in cellseg.settings."""
    from cellseg.cluster.jobs import (
        CONTAINER_SECURITY,
        POD_LABELS,
        POD_SECURITY,
        TERMINATION_GRACE_SECONDS,
        VOLUME_MOUNTS,
        JobSpec,
        _replica,
        pod_volumes,
    )

    def spec_for_grace():
        return JobSpec(name="grace", train_args=())

    def template_labels(node):
        return node["template"]["spec"]["template"]["metadata"]["labels"]

    (runtime,) = [o for o in objects if o["kind"] == "TrainingRuntime"]
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["volumes"] == pod_volumes("16Gi")
    assert pod["containers"][0]["volumeMounts"] == VOLUME_MOUNTS
    assert pod["containers"][0]["securityContext"] == CONTAINER_SECURITY
    assert pod["securityContext"] == POD_SECURITY
    assert template_labels(node) == POD_LABELS
    assert pod["serviceAccountName"] == cluster.TRAIN_SERVICE_ACCOUNT
    # time to save `latest` on SIGTERM, the same for both engines' pods
    assert pod["terminationGracePeriodSeconds"] == TERMINATION_GRACE_SECONDS
    assert _replica(spec_for_grace(), 1)["template"]["spec"]["terminationGracePeriodSeconds"] == (
        TERMINATION_GRACE_SECONDS
    )
    accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    assert cluster.TRAIN_SERVICE_ACCOUNT in accounts


def test_mlflow_accepts_its_in_cluster_service_names(objects):
    (mlflow,) = [
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow"
    ]
    args = " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["args"])
    hosts = re.search(r"--allowed-hosts=(\S+)", args).group(1).split(",")
    assert "mlflow.cellseg.svc.cluster.local:*" in hosts and "mlflow:*" in hosts


def test_secret_templates_hold_placeholders_only():
    templates = sorted((REPO / "manifests" / "secrets").glob("*.yaml"))
    assert templates
    for path in templates:
        secret = yaml.safe_load(path.read_text())
        kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
        assert secret["kind"] == "Secret"
        assert all(str(v).startswith("REPLACE_WITH_") for v in secret["stringData"].values()), path


def secret_refs(pod: dict) -> set[str]:
    names = set()
    for c in pod["containers"] + pod.get("initContainers", []):
        names |= {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
    return names


def test_the_team_mlflow_uses_postgres_s3_and_basic_auth_with_secrets_from_the_templates():
    objects = render("mlflow-team")
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    mlflow = by_kind[("Deployment", "mlflow")]["spec"]["template"]["spec"]
    args = mlflow["containers"][0]["args"]
    assert "--app-name=basic-auth" in args
    assert "--backend-store-uri=postgresql+psycopg2://mlflow@mlflow-postgres:5432/mlflow" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert not [a for a in args if "sqlite" in a or "password" in a.lower()]
    assert ("StatefulSet", "mlflow-postgres") in by_kind and (
        "Service",
        "mlflow-postgres",
    ) in by_kind
    assert ("PersistentVolumeClaim", "mlflow-store") not in by_kind  # no SQLite volume left
    templates = {
        yaml.safe_load(p.read_text())["metadata"]["name"]
        for p in (REPO / "manifests" / "secrets").glob("*.template.yaml")
    }
    postgres = by_kind[("StatefulSet", "mlflow-postgres")]["spec"]["template"]["spec"]
    used = secret_refs(mlflow) | secret_refs(postgres)
    assert used == {"cellseg-s3", "mlflow-postgres", "mlflow-admin"} and used <= templates
    assert cluster.MLFLOW_AUTH_SECRET in templates  # what the pipeline's steps read
    ini = by_kind[("ConfigMap", next(n for k, n in by_kind if n.startswith("mlflow-auth-config")))]
    assert "database_uri = postgresql+psycopg2://" in ini["data"]["basic_auth.ini"]


@pytest.mark.parametrize("overlay", ["kubeflow", "mlflow-team"])
def test_an_mlflow_with_basic_auth_runs_the_image_that_has_the_auth_extra(overlay):
    """``--app-name basic-auth`` imports Flask-WTF (mlflow 3.17.2 mlflow/server/auth/__init__.py,
    ``from flask_wtf.csrf import CSRFProtect``; the ``auth`` extra). mlflow/mlflow's
    docker/Dockerfile builds ``ghcr.io/mlflow/mlflow:vX`` with a bare ``pip install mlflow``;
    docker/Dockerfile.full builds ``vX-full`` with ``mlflow[extras,...,auth]`` (read through the
    search index; the repository is too large to fetch here). The plain image crash-loops."""
    import importlib.metadata

    pinned = importlib.metadata.version("mlflow")
    servers = [
        c
        for o in render(overlay)
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
        if "--app-name=basic-auth" in c.get("args", [])
    ]
    assert servers, overlay
    for container in servers:
        assert container["image"] == f"ghcr.io/mlflow/mlflow:v{pinned}-full", container["image"]


def test_the_docs_say_which_kfp_backends_harden_their_step_pods():
    """kubeflow/pipelines backend/src/v2/compiler/argocompiler/security_context.go appears in
    2.16.0: from then on step pods get seccomp RuntimeDefault, drop ALL capabilities and no
    privilege escalation; runAsNonRoot on the main container only where the admin sets
    DEFAULT_SECURITY_CONTEXT_RUN_AS_NON_ROOT. The docs once said every KFP step pod ran without
    a seccomp profile."""
    text = " ".join((REPO / "docs" / "cluster.md").read_text().split())
    assert "without a seccomp profile" not in text
    assert "only backends from 2.16.0 give them `seccompProfile: RuntimeDefault`" in text
    assert "DEFAULT_SECURITY_CONTEXT_RUN_AS_NON_ROOT" in text
