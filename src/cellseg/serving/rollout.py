"""The cluster side of a promotion: an MLflow artifact location as a KServe storageUri, and the
InferenceService rolled to it (all traffic, or a canary share where KServe honours one).

KServe's storage initializer reads ``s3://``, ``gs://``, ``pvc://``, ``https://`` and more; an
MLflow server that proxies artifacts (``mlflow-artifacts:/...``) keeps them under its
``--artifacts-destination``, so those become URIs under that root: ``pvc://mlflow-store/artifacts``
for manifests/base, the bucket for the mlflow-team overlay (``serving_artifacts_root``).

A canary share (``canaryTrafficPercent``) is read only by KServe's Knative reconciler; in the
Standard mode (formerly RawDeployment), KServe's default, it is accepted and ignored, and all
traffic would move at once. The rollout reads the service's mode and refuses a canary it cannot
honour, before anything moves.
"""

from __future__ import annotations

import json
from urllib.parse import urlparse

from cellseg.errors import CellsegError

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
# manifests/base/mlflow.yaml: --artifacts-destination=/mlflow/artifacts on the mlflow-store claim
PROXIED_ARTIFACTS = "pvc://mlflow-store/artifacts"
KSERVE_SCHEMES = ("s3", "gs", "pvc", "http", "https", "hf", "hdfs", "webhdfs", "oci")
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
KSERVE_CONFIG = ("kserve", "inferenceservice-config")  # namespace, ConfigMap (key "deploy")
LEGACY_MODES = {"Serverless": "Knative", "RawDeployment": "Standard"}  # KServe's renames
CANARY_MODES = ("Knative",)  # where canaryTrafficPercent splits traffic


class RolloutRefused(CellsegError):
    """A rollout KServe would not carry out as asked."""


def storage_uri(artifact_location: str, proxied_root: str = PROXIED_ARTIFACTS) -> str:
    """An MLflow model's artifact location as an InferenceService ``storageUri``;
    ``proxied_root`` is where the MLflow server keeps proxied artifacts, as KServe reads it."""
    parsed = urlparse(artifact_location)
    if parsed.scheme == "mlflow-artifacts":
        root = proxied_root or PROXIED_ARTIFACTS
        if urlparse(root).scheme not in KSERVE_SCHEMES:
            raise CellsegError(
                f"serving artifacts root {root!r}: KServe reads {', '.join(KSERVE_SCHEMES)} "
                "URIs (the MLflow server's --artifacts-destination, e.g. s3://bucket/mlflow)"
            )
        return f"{root.rstrip('/')}/{parsed.path.lstrip('/')}"
    if parsed.scheme in KSERVE_SCHEMES:
        return artifact_location
    raise CellsegError(
        f"{artifact_location}: KServe cannot read this artifact location; log models to S3/GCS "
        "or through an MLflow server that proxies artifacts (manifests/base)"
    )


def rollout_patch(uri: str, canary_percent: int = 0) -> dict:
    """A merge patch: the predictor serves ``uri``; with ``canary_percent`` (1..99) that share
    of the traffic goes to it and the rest stays on the previous revision, else all of it."""
    if not 0 <= canary_percent <= 100:
        raise CellsegError(f"canary traffic percent {canary_percent}: expected 0..100")
    canary = canary_percent if 0 < canary_percent < 100 else None  # None: the field removed
    return {"spec": {"predictor": {"model": {"storageUri": uri}, "canaryTrafficPercent": canary}}}


def normal_mode(mode: str) -> str:
    return LEGACY_MODES.get(mode, mode)


def deployment_mode(service: dict, kserve_config: dict | None) -> tuple[str, str]:
    """The service's mode and where it was read, in KServe's order: the controller's
    ``status.deploymentMode``, the annotation, the ``deploy`` default of
    ``inferenceservice-config``; ("", why) when none says."""
    status = (service.get("status") or {}).get("deploymentMode")
    if status:
        return normal_mode(status), "its status"
    annotation = (service["metadata"].get("annotations") or {}).get(MODE_ANNOTATION)
    if annotation:
        return normal_mode(annotation), f"its {MODE_ANNOTATION} annotation"
    deploy = ((kserve_config or {}).get("data") or {}).get("deploy")
    try:
        default = json.loads(deploy).get("defaultDeploymentMode", "") if deploy else ""
    except (ValueError, AttributeError):
        default = ""  # not KServe's JSON: unknown, as without the ConfigMap
    if default:
        return normal_mode(default), f"{'/'.join(KSERVE_CONFIG)} defaultDeploymentMode"
    return "", "no status, annotation or readable inferenceservice-config"


def check_canary(name: str, mode: str, source: str, canary_percent: int) -> None:
    """Refuse a canary share the service's mode would ignore (one line)."""
    if not 0 < canary_percent < 100 or mode in CANARY_MODES:
        return
    where = f"InferenceService {name}"
    if not mode:
        raise RolloutRefused(
            f"{where}: canary {canary_percent}% asked, but its deployment mode is unknown "
            f"({source}); only the Knative mode splits traffic: set the {MODE_ANNOTATION} "
            "annotation, or canary_traffic_percent=0"
        )
    raise RolloutRefused(
        f"{where} runs in KServe's {mode} mode ({source}), which ignores canaryTrafficPercent: "
        f"a {canary_percent}% canary would take all traffic; use canary_traffic_percent=0 "
        "or serve it in the Knative mode"
    )


def read_service(name: str, namespace: str, api_client=None) -> tuple[dict, dict | None]:
    """The InferenceService and, when readable, KServe's ``inferenceservice-config``."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api_client)
    try:
        service = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as err:
        if err.status == 404:
            raise RolloutRefused(
                f"InferenceService {namespace}/{name} does not exist (manifests/overlays/serving)"
            ) from None
        raise
    try:
        config = client.CoreV1Api(api_client).read_namespaced_config_map(
            KSERVE_CONFIG[1], KSERVE_CONFIG[0]
        )
        config = api_client.sanitize_for_serialization(config) if api_client else config.to_dict()
    except ApiException:
        config = None  # another namespace, no rights: the status or the annotation decides
    return service, config


def plan_rollout(name: str, namespace: str, canary_percent: int = 0, api_client=None) -> str:
    """Check, before anything moves, that ``name`` can take the rollout; returns its mode."""
    service, config = read_service(name, namespace, api_client)
    mode, source = deployment_mode(service, config)
    check_canary(f"{namespace}/{name}", mode, source, canary_percent)
    return mode


def patch_inference_service(
    name: str, namespace: str, uri: str, canary_percent: int = 0, api_client=None
) -> dict:
    """Patch InferenceService ``name`` to serve ``uri``, as :func:`plan_rollout` checked it
    can; returns the patched object."""
    from kubernetes import client

    api = client.CustomObjectsApi(api_client)  # a dict body goes as a JSON merge patch
    patch = rollout_patch(uri, canary_percent)
    return api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)


def roll_inference_service(
    name: str, namespace: str, uri: str, canary_percent: int = 0, api_client=None
) -> dict:
    """:func:`plan_rollout`, then :func:`patch_inference_service`."""
    plan_rollout(name, namespace, canary_percent, api_client)
    return patch_inference_service(name, namespace, uri, canary_percent, api_client)
