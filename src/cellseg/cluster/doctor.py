"""``cellseg doctor``: the cluster read against what a pipeline run needs, one line per
requirement, passed or failed with the fix.

It reads through the kubernetes client (your kubeconfig, or the pod's account in a cluster):
the KFP API's version when ``KFP_HOST`` is set (and, below 2.15, the steps' optional Secrets,
which those backends require), the training engine's CRD and served version, the
``cellseg-torch`` TrainingRuntime, the shared volumes, the HF token Secret, the launcher's rights
(``SelfSubjectAccessReview``, as the pipeline's account by impersonation), with a queue the
LocalQueue, its ClusterQueue, whether Kueue manages the engine's kind (its
``integrations.frameworks``) and, for TrainJobs, whether each ResourceFlavor keeps the GPU
toleration, with an InferenceService its KServe deployment mode, MLflow's ``/health``, and an
authenticated MLflow call with the steps' login. A failed requirement is a blocker; a WARN line
is one the doctor could not settle (e.g. not allowed to read it).
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

from cellseg import settings
from cellseg.cluster.api_calls import (
    KUEUE_CONFIG,
    KUEUE_GROUP,
    KUEUE_VERSION,
    ROLLOUT_CALLS,
    STEP_CALLS,
    ApiCall,
    launcher_calls,
)
from cellseg.cluster.jobs import ENGINES
from cellseg.cluster.jobs import TRAINING_RUNTIME as RUNTIME
from cellseg.errors import CellsegError
from cellseg.settings import PYTORCHJOB, TRAINJOB

KFP_MINIMUM = (2, 5, 0)  # nodeSelectorJson, tolerationJson, pvcNameParameter in the spec
# Below this, the driver builds a step's Secret env without `optional` (kubeflow/pipelines
# 2.15.0 backend/src/v2/driver/k8s.go): the steps' optional Secrets must exist, keys and all.
KFP_OPTIONAL_SECRETS = (2, 15, 0)
STEP_SECRETS = {  # what the pipeline reads with use_secret_as_env(optional=True)
    settings.MLFLOW_AUTH_SECRET: settings.MLFLOW_AUTH_KEYS,
    settings.DVC_REMOTE_SECRET: settings.DVC_REMOTE_KEYS,
}
REQUIRED_FIELD = {TRAINJOB: "runtimePatches"}  # Trainer v2.3: node selector, tolerations
MINIMUM = {TRAINJOB: "Kubeflow Trainer v2.3", PYTORCHJOB: "Training Operator 1.9"}
DEPLOY = "kubectl apply -k manifests/overlays/<overlay>"


@dataclass(frozen=True)
class Result:
    requirement: str
    ok: bool
    detail: str
    fix: str = ""
    blocker: bool = True  # False: a warning (the doctor could not settle it)

    def line(self) -> str:
        status = "PASS" if self.ok else "FAIL" if self.blocker else "WARN"
        fix = f"  -> fix: {self.fix}" if self.fix and not self.ok else ""
        return f"{status}  {self.requirement}: {self.detail}{fix}"


@dataclass(frozen=True)
class DoctorOptions:
    """The cluster to check and what the runs there will use."""

    namespace: str = settings.NAMESPACE
    engine: str = settings.TRAINING_JOB.training_engine
    queue_name: str = settings.TRAINING_JOB.queue_name
    mlflow_uri: str = settings.MLFLOW_URI
    kfp_host: str = ""
    kfp_token: str = ""
    account: str | None = None  # whose rights to check; None: the pipeline's; "": yours
    inference_service: str = ""  # the InferenceService the promote step rolls; "" = none

    @property
    def pipeline_account(self) -> str:
        if self.account is not None:
            return self.account
        return f"system:serviceaccount:{self.namespace}:{settings.PIPELINE_SERVICE_ACCOUNT}"


def _status(err: Exception) -> int | None:
    return getattr(err, "status", None)


def _forbidden(requirement: str, what: str, err: Exception) -> Result:
    return Result(
        requirement,
        False,
        f"cannot read {what} ({_status(err)} {getattr(err, 'reason', err)})",
        fix="run `make doctor` with an account that may read it",
        blocker=False,
    )


def _read(call: Callable, requirement: str, what: str, missing: Result):
    """``(call(), None)``, or ``(None, a Result)``: ``missing`` on 404, a warning on 403."""
    try:
        return call(), None
    except Exception as err:
        if _status(err) == 404:
            return None, missing
        if _status(err) == 403:
            return None, _forbidden(requirement, what, err)
        raise


def check_engine_crd(api, s: DoctorOptions) -> Result:
    from kubernetes import client

    engine = ENGINES[s.engine]
    name = f"{engine.plural}.{engine.group}"
    requirement = f"{engine.kind} CRD {name} {engine.version}"
    install = f"install {MINIMUM[s.engine]} or later"
    read = client.ApiextensionsV1Api(api).read_custom_resource_definition
    response, failed = _read(
        lambda: read(name, _preload_content=False), requirement, "CustomResourceDefinitions",
        Result(requirement, False, "not installed", fix=install),
    )  # fmt: skip
    if failed:
        return failed
    crd = json.loads(response.data)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    version = versions.get(engine.version)
    if not version or not version.get("served"):
        served = ", ".join(n for n, v in versions.items() if v.get("served")) or "none"
        return Result(requirement, False, f"not served (serves {served})", fix=install)
    field = REQUIRED_FIELD.get(s.engine)
    if field:
        spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        if field not in spec:
            return Result(
                requirement,
                False,
                f"served, but its schema has no spec.{field}",
                fix=f"upgrade to {MINIMUM[s.engine]} or later",
            )
        return Result(requirement, True, f"served, with spec.{field}")
    return Result(requirement, True, "served")


def check_training_runtime(api, s: DoctorOptions) -> Result | None:
    from kubernetes import client

    if s.engine != TRAINJOB:
        return None
    requirement = f"TrainingRuntime {s.namespace}/{RUNTIME}"
    engine = ENGINES[TRAINJOB]
    get = client.CustomObjectsApi(api).get_namespaced_custom_object
    runtime, failed = _read(
        lambda: get(engine.group, engine.version, s.namespace, "trainingruntimes", RUNTIME),
        requirement, "TrainingRuntimes",
        Result(requirement, False, "missing", fix=f"{DEPLOY} (components/trainer-v2)"),
    )  # fmt: skip
    if failed:
        return failed
    jobs = [j.get("name") for j in runtime["spec"]["template"]["spec"].get("replicatedJobs", [])]
    if "node" not in jobs:  # the launcher's runtimePatches address this job by name
        return Result(requirement, False, f"no replicated job 'node' ({jobs})", fix=DEPLOY)
    return Result(requirement, True, "present")


def check_volumes(api, s: DoctorOptions) -> list[Result]:
    from kubernetes import client

    core = client.CoreV1Api(api)
    results = []
    for claim in (settings.DATASETS_PVC, settings.CHECKPOINTS_PVC, settings.HF_CACHE_PVC):
        requirement = f"PersistentVolumeClaim {s.namespace}/{claim}"
        pvc, failed = _read(
            lambda c=claim: core.read_namespaced_persistent_volume_claim(c, s.namespace),
            requirement, "PersistentVolumeClaims",
            Result(requirement, False, "missing", fix=DEPLOY),
        )  # fmt: skip
        if failed:
            results.append(failed)
            continue
        phase = (pvc.status and pvc.status.phase) or "Pending"
        modes = pvc.spec.access_modes or []
        if "ReadWriteMany" not in modes:
            results.append(
                Result(
                    requirement,
                    False,
                    f"access modes {modes}",
                    fix="recreate it ReadWriteMany (steps and jobs share it)",
                )
            )
        elif phase == "Bound":
            results.append(Result(requirement, True, "Bound, ReadWriteMany"))
        else:
            results.append(
                Result(
                    requirement,
                    False,
                    f"{phase} (a class that waits for the first pod binds it then)",
                    fix="check its storageClassName: a ReadWriteMany class (NFS, Filestore, ...)",
                    blocker=phase != "Pending",
                )
            )
    return results


def check_hf_secret(api, s: DoctorOptions) -> Result:
    from kubernetes import client

    requirement = f"Secret {s.namespace}/{settings.HF_TOKEN_SECRET} (key HF_TOKEN)"
    fix = (
        f"kubectl -n {s.namespace} create secret generic {settings.HF_TOKEN_SECRET} "
        "--from-literal=HF_TOKEN=hf_... (UNI is gated; the uni-gpu profile needs it)"
    )
    read = client.CoreV1Api(api).read_namespaced_secret
    secret, failed = _read(
        lambda: read(settings.HF_TOKEN_SECRET, s.namespace), requirement, "Secrets",
        Result(requirement, False, "missing", fix=fix),
    )  # fmt: skip
    if failed:
        return failed
    if not (secret.data or {}).get("HF_TOKEN"):
        return Result(requirement, False, "has no HF_TOKEN key", fix=fix)
    return Result(requirement, True, "present")


def allowed(api, namespace: str, call: ApiCall) -> bool:
    """Whether ``api``'s user may make ``call`` in ``namespace`` (a SelfSubjectAccessReview)."""
    from kubernetes import client

    attributes = client.V1ResourceAttributes(
        namespace=namespace, group=call.group, resource=call.resource,
        subresource=call.subresource or None, verb=call.verb,
    )  # fmt: skip
    review = client.V1SelfSubjectAccessReview(
        spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes)
    )
    answer = client.AuthorizationV1Api(api).create_self_subject_access_review(review)
    return bool(answer.status.allowed)


def as_user(api, user: str):
    """``api`` impersonating ``user`` (needs the impersonate verb, as cluster admins have)."""
    from kubernetes import client

    return client.ApiClient(api.configuration, header_name="Impersonate-User", header_value=user)


def check_rbac(api, s: DoctorOptions) -> list[Result]:
    account = s.pipeline_account
    who = account.rsplit(":", 1)[-1] if account else "you"
    reviewer = as_user(api, account) if account else api
    results = []
    try:
        allowed(reviewer, s.namespace, ApiCall("get", "pods"))
    except Exception as err:
        if not account or _status(err) != 403:
            raise
        results.append(Result(
            f"RBAC as {who}", False, f"may not impersonate {account}; checked as you instead",
            fix="run `make doctor` as a cluster admin to check the pipeline's account",
            blocker=False,
        ))  # fmt: skip
        who, reviewer = "you", api
    needs = (
        ("what the launcher does", launcher_calls(s.engine), "base/rbac.yaml"),
        ("what KFP does in a step", STEP_CALLS, "base/kfp-steps-rbac.yaml"),
    )
    if s.inference_service:
        needs += (("what the promote step does", ROLLOUT_CALLS, "components/kserve/rbac.yaml"),)
    for what, calls, manifest in needs:
        requirement = f"RBAC: {what}, as {who} in {s.namespace}"
        denied = [c for c in calls if not allowed(reviewer, s.namespace, c)]
        if denied:
            detail = "denied: " + ", ".join(c.show() for c in denied)
            fix = f"{DEPLOY} (manifests/{manifest} binds {who})"
            results.append(Result(requirement, False, detail, fix=fix))
        else:
            results.append(Result(requirement, True, ", ".join(c.show() for c in calls)))
    return results


def check_queue(api, s: DoctorOptions) -> list[Result]:
    from kubernetes import client

    if not s.queue_name:
        return []
    custom = client.CustomObjectsApi(api)
    group, version = KUEUE_GROUP, KUEUE_VERSION
    requirement = f"LocalQueue {s.namespace}/{s.queue_name} ({group}/{version})"
    queue, failed = _read(
        lambda: custom.get_namespaced_custom_object(
            group, version, s.namespace, "localqueues", s.queue_name
        ),
        requirement, "LocalQueues",
        Result(requirement, False, "missing (or Kueue older than v0.16 serves no v1beta2)",
               fix=f"{DEPLOY} (the kueue overlay); Kueue v0.17 or later"),
    )  # fmt: skip
    if failed:
        return [failed]
    cq = queue["spec"]["clusterQueue"]
    cq_requirement = f"ClusterQueue {cq}"
    _, cq_failed = _read(
        lambda: custom.get_cluster_custom_object(group, version, "clusterqueues", cq),
        cq_requirement, "ClusterQueues",
        Result(cq_requirement, False, "missing: nothing is ever admitted",
               fix="ask the platform team, or point the LocalQueue at theirs"),
    )  # fmt: skip
    return [
        Result(requirement, True, f"present, ClusterQueue {cq}"),
        cq_failed or Result(cq_requirement, True, "present"),
    ]


def _get(url: str, headers: dict | None = None, timeout: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read().decode(errors="replace")


def _service_in_cluster(uri: str) -> tuple[str, str, int] | None:
    """(service, namespace, port) of an in-cluster URI such as http://mlflow.cellseg.svc:5000."""
    parsed = urlparse(uri)
    match = re.fullmatch(
        r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.cluster\.local)?", parsed.hostname or ""
    )
    return (match[1], match[2], parsed.port or 80) if match else None


def check_mlflow(api, s: DoctorOptions, get: Callable = _get) -> Result:
    from kubernetes import client

    requirement = f"MLflow {s.mlflow_uri}/health"
    fix = "kubectl -n <namespace> get pods -l app.kubernetes.io/name=mlflow; its logs"
    try:
        status, body = get(s.mlflow_uri.rstrip("/") + "/health")
        if status == 200:
            return Result(requirement, True, body.strip() or "OK")
        return Result(requirement, False, f"HTTP {status}", fix=fix)
    except urllib.error.HTTPError as err:
        return Result(requirement, False, f"HTTP {err.code}", fix=fix)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        service = _service_in_cluster(s.mlflow_uri)
        if not (isinstance(reason, socket.gaierror) and service):
            return Result(requirement, False, f"unreachable ({reason})", fix=fix)
    name, namespace, port = service  # outside the cluster: through the API server's proxy
    try:
        body = client.CoreV1Api(api).connect_get_namespaced_service_proxy_with_path(
            f"{name}:{port}", namespace, "health"
        )
        return Result(requirement, True, f"{str(body).strip() or 'OK'} (through the API server)")
    except Exception as err:
        return Result(
            requirement,
            False,
            f"via the API server: {_status(err)} {getattr(err, 'reason', err)}",
            fix=fix,
        )


MLFLOW_AUTHENTICATED_CALL = "/api/2.0/mlflow/experiments/search?max_results=1"


def mlflow_login_result(uri: str, login, get: Callable = _get) -> Result:
    """An authenticated MLflow call with the steps' login (``login``: a
    :class:`cellseg.registry.users.Login` from their Secret, or None without one)."""
    import base64

    who = f"as {login.username}" if login else "without a login (no Secret)"
    requirement = f"MLflow login {who}"
    headers = {}
    if login:
        token = base64.b64encode(f"{login.username}:{login.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        status, _ = get(uri.rstrip("/") + MLFLOW_AUTHENTICATED_CALL, headers)
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError) as err:
        return Result(requirement, False, f"not checked: {getattr(err, 'reason', err)}",
                      fix="kubectl -n <namespace> port-forward svc/mlflow 5000 and rerun with "
                      "--mlflow-uri http://localhost:5000", blocker=False)  # fmt: skip
    if status == 200:
        return Result(requirement, True, "an authenticated call answered 200")
    if status in (401, 403) and login:
        fix = "make mlflow-user (mlflow-team: the admin creates it), or fix the Secret"
        return Result(requirement, False, f"HTTP {status}: every step would fail", fix=fix)
    if status in (401, 403):
        fix = (f"create the {settings.MLFLOW_AUTH_SECRET} Secret "
               "(manifests/secrets/mlflow-auth.template.yaml), then make mlflow-user")  # fmt: skip
        return Result(requirement, False, f"HTTP {status}: MLflow asks for a login", fix=fix)
    return Result(requirement, False, f"HTTP {status}", fix="its logs")


def check_mlflow_login(api, s: DoctorOptions, get: Callable = _get) -> Result:
    from cellseg.registry.users import SecretUnreadable, secret_login

    requirement = f"MLflow login (Secret {settings.MLFLOW_AUTH_SECRET})"
    fix = "manifests/secrets/mlflow-auth.template.yaml"
    try:
        login = secret_login(
            api, s.namespace, settings.MLFLOW_AUTH_SECRET, settings.MLFLOW_AUTH_KEYS
        )
    except SecretUnreadable as err:
        if err.status != 404:
            return Result(requirement, False, str(err), fix=fix, blocker=err.status != 403)
        login = None  # no Secret: the steps send no login
    except CellsegError as err:
        return Result(requirement, False, str(err), fix=fix)
    return mlflow_login_result(s.mlflow_uri, login, get)


def parse_version(tag: str) -> tuple[int, ...] | None:
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", tag or "")
    return tuple(int(x) for x in match.groups()) if match else None


@dataclass(frozen=True)
class KfpBackend:
    tag: str
    version: tuple[int, ...] | None
    multi_user: bool


def read_kfp(s: DoctorOptions, get: Callable = _get) -> KfpBackend | Result | None:
    """The KFP backend's version and mode from its healthz; a Result when unreachable; None
    without ``KFP_HOST``."""
    if not s.kfp_host:
        return None
    headers = {"Authorization": f"Bearer {s.kfp_token}"} if s.kfp_token else {}
    try:
        status, body = get(s.kfp_host.rstrip("/") + "/apis/v2beta1/healthz", headers)
        health = json.loads(body) if status == 200 else {}
    except (OSError, ValueError) as err:
        requirement = f"KFP API {s.kfp_host} >= {'.'.join(map(str, KFP_MINIMUM))}"
        return Result(requirement, False, f"unreachable ({err})", fix="check KFP_HOST, KFP_TOKEN")
    tag = health.get("tag_name", "")
    return KfpBackend(tag, parse_version(tag), bool(health.get("multi_user")))


def check_kfp(s: DoctorOptions, get: Callable = _get, backend=None) -> Result | None:
    backend = backend if backend is not None else read_kfp(s, get)
    if backend is None or isinstance(backend, Result):
        return backend
    minimum = ".".join(map(str, KFP_MINIMUM))
    requirement = f"KFP API {s.kfp_host} >= {minimum}"
    tag, version = backend.tag, backend.version
    mode = "multi-user" if backend.multi_user else "standalone"
    if version is None:
        return Result(
            requirement,
            False,
            f"version {tag!r} unknown ({mode})",
            blocker=False,
            fix=f"make sure the backend is {minimum} or later",
        )
    if version < KFP_MINIMUM:
        return Result(
            requirement,
            False,
            f"{tag} ({mode}) ignores the spec's node selector, tolerations and volumes",
            fix=f"upgrade KFP to {minimum} or later",
        )
    return Result(requirement, True, f"{tag} ({mode})")


def check_step_secrets(api, s: DoctorOptions, backend) -> list[Result]:
    """On a KFP backend older than 2.15 the steps' optional Secrets are required: each must
    exist with its keys (empty values: no login), or every step that reads one waits in
    CreateContainerConfigError, a Pending pod Argo never fails."""
    from kubernetes import client

    if not isinstance(backend, KfpBackend) or not backend.version:
        return []
    if backend.version >= KFP_OPTIONAL_SECRETS:
        return []
    floor = ".".join(map(str, KFP_OPTIONAL_SECRETS))
    read = client.CoreV1Api(api).read_namespaced_secret
    results = []
    for secret, keys in STEP_SECRETS.items():
        requirement = f"Secret {s.namespace}/{secret} (KFP {backend.tag} < {floor} requires it)"
        literals = " ".join(f"--from-literal={k}=" for k in keys)
        fix = (
            f"kubectl -n {s.namespace} create secret generic {secret} {literals} (empty: no "
            f"login; real values where needed), or upgrade KFP to {floor}+"
        )
        found, failed = _read(
            lambda name=secret: read(name, s.namespace), requirement, "Secrets",
            Result(requirement, False, "missing: every step that reads it never starts", fix=fix),
        )  # fmt: skip
        if failed:
            results.append(failed)
            continue
        missing = [k for k in keys if k not in (found.data or {})]
        if missing:
            results.append(Result(requirement, False, f"has no {', '.join(missing)}", fix=fix))
        else:
            results.append(Result(requirement, True, "present with its keys"))
    return results


def check_kueue_integration(api, s: DoctorOptions) -> Result | None:
    """Kueue makes Workloads only for the frameworks its configuration enables; a queued job of
    another kind is never admitted."""
    from kubernetes import client

    if not s.queue_name:
        return None
    engine = ENGINES[s.engine]
    namespace, name, key = KUEUE_CONFIG
    requirement = f"Kueue manages {engine.kueue_framework} (ConfigMap {namespace}/{name})"
    read = client.CoreV1Api(api).read_namespaced_config_map
    config, failed = _read(
        lambda: read(name, namespace), requirement, "ConfigMaps",
        Result(requirement, False, "not found: cannot tell (Kueue installed under another name?)",
               fix="check integrations.frameworks of Kueue's configuration by hand",
               blocker=False),
    )  # fmt: skip
    if failed:
        return failed
    import yaml

    parsed = yaml.safe_load((config.data or {}).get(key) or "") or {}
    frameworks = (parsed.get("integrations") or {}).get("frameworks") or []
    if engine.kueue_framework in frameworks:
        return Result(requirement, True, "enabled in integrations.frameworks")
    return Result(
        requirement, False, f"not in integrations.frameworks ({', '.join(frameworks) or 'none'})",
        fix=f"add {engine.kueue_framework} to integrations.frameworks in {key} and restart "
        "kueue-controller-manager",
    )  # fmt: skip


def tolerated(toleration: dict, by: list[dict]) -> bool:
    """Whether a list of tolerations covers ``toleration``'s taint (key, value, effect), as the
    scheduler matches them: ``Exists`` any value, ``Equal`` (the default) the same value."""
    for t in by:
        exists = t.get("operator") == "Exists"
        same_key = (exists and not t.get("key")) or t.get("key") == toleration.get("key")
        same_value = exists or t.get("value", "") == toleration.get("value", "")
        same_effect = not t.get("effect") or t.get("effect") == toleration.get("effect")
        if same_key and same_value and same_effect:
            return True
    return False


def check_flavor_tolerations(api, s: DoctorOptions) -> list[Result]:
    """A TrainJob's pods get the tolerations of Kueue's runtime patch, applied after the
    launcher's: a strategic merge replaces the whole list (``tolerations`` has no merge key), so
    a ResourceFlavor with tolerations of its own drops the GPU toleration."""
    from kubernetes import client

    if not s.queue_name or s.engine != TRAINJOB:
        return []
    custom = client.CustomObjectsApi(api)
    try:
        queue = custom.get_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, s.namespace, "localqueues", s.queue_name
        )
        cq = custom.get_cluster_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, "clusterqueues", queue["spec"]["clusterQueue"]
        )
    except Exception as err:
        if _status(err) in (403, 404):
            return []  # check_queue says what is missing or unreadable
        raise
    flavors = sorted({
        f["name"] for group in cq["spec"].get("resourceGroups") or []
        for f in group.get("flavors") or []
    })  # fmt: skip
    results = []
    for flavor in flavors:
        requirement = f"ResourceFlavor {flavor} keeps the GPU toleration (trainjob)"
        found, failed = _read(
            lambda f=flavor: custom.get_cluster_custom_object(
                KUEUE_GROUP, KUEUE_VERSION, "resourceflavors", f
            ),
            requirement, "ResourceFlavors",
            Result(requirement, False, "missing: nothing is admitted on it",
                   fix="ask the platform team"),
        )  # fmt: skip
        if failed:
            results.append(failed)
            continue
        own = (found.get("spec") or {}).get("tolerations") or []
        lost = [t for t in settings.TRAINING_JOB.tolerations if not tolerated(t, own)]
        if own and lost:
            missing = ", ".join(f"{t.get('key', '*')}:{t.get('effect', '*')}" for t in lost)
            results.append(Result(
                requirement, False,
                f"its tolerations replace the job's, and lack {missing}: pods go Unschedulable",
                fix=f"add {json.dumps(lost[0])} to its spec.tolerations, or use "
                f"training_engine={PYTORCHJOB}",
            ))  # fmt: skip
        else:
            why = "tolerates the GPU taint" if own else "adds no tolerations"
            results.append(Result(requirement, True, why))
    return results


def check_serving_mode(api, s: DoctorOptions) -> Result | None:
    """The InferenceService's KServe deployment mode, which decides whether a canary can be
    honoured (the promote step refuses one in the Standard mode)."""
    from cellseg.serving import rollout

    if not s.inference_service:
        return None
    requirement = f"InferenceService {s.namespace}/{s.inference_service} deployment mode"
    try:
        service, config = rollout.read_service(s.inference_service, s.namespace, api)
    except rollout.RolloutRefused as err:
        return Result(requirement, False, str(err), fix=f"{DEPLOY} (the serving overlay)")
    except Exception as err:
        if _status(err) == 403:
            return _forbidden(requirement, "InferenceServices", err)
        raise
    mode, source = rollout.deployment_mode(service, config)
    if not mode:
        return Result(requirement, False, f"unknown ({source}): a canary would be refused",
                      fix=f"annotate it {rollout.MODE_ANNOTATION}=Knative or Standard",
                      blocker=False)  # fmt: skip
    canary = "works" if mode in rollout.CANARY_MODES else "is refused (all traffic only)"
    return Result(requirement, True, f"{mode}, from {source}: canary_traffic_percent {canary}")


def run_checks(api, s: DoctorOptions, get: Callable = _get) -> list[Result]:
    """Every requirement for ``s``, in the order a run meets them."""
    if s.engine not in ENGINES:
        raise ValueError(f"training engine {s.engine!r}: expected one of {', '.join(ENGINES)}")
    backend = read_kfp(s, get)
    results = [
        check_kfp(s, get, backend),
        *check_step_secrets(api, s, backend),
        check_engine_crd(api, s),
        check_training_runtime(api, s),
        *check_volumes(api, s),
        check_hf_secret(api, s),
        *check_rbac(api, s),
        *check_queue(api, s),
        check_kueue_integration(api, s),
        *check_flavor_tolerations(api, s),
        check_serving_mode(api, s),
        check_mlflow(api, s, get),
        check_mlflow_login(api, s, get),
    ]
    return [r for r in results if r is not None]


def blockers(results: list[Result]) -> list[Result]:
    return [r for r in results if not r.ok and r.blocker]
