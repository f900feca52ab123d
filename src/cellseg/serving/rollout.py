"""The cluster side of a promotion: an MLflow artifact location as a KServe storageUri, and the
InferenceService rolled to it (all traffic, or a canary share).

KServe's storage initializer reads ``s3://``, ``gs://``, ``pvc://``, ``https://`` and more; an
MLflow server that proxies artifacts (``mlflow-artifacts:/...``, as manifests/base runs it)
keeps them under ``--artifacts-destination`` on its volume, so those become ``pvc://`` URIs.
"""

from __future__ import annotations

from urllib.parse import urlparse

from cellseg.errors import CellsegError

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
# manifests/base/mlflow.yaml: --artifacts-destination=/mlflow/artifacts on the mlflow-store claim
PROXIED_ARTIFACTS = "pvc://mlflow-store/artifacts"
KSERVE_SCHEMES = ("s3", "gs", "pvc", "http", "https", "hf", "hdfs", "webhdfs", "oci")


def storage_uri(artifact_location: str, proxied_root: str = PROXIED_ARTIFACTS) -> str:
    """An MLflow model's artifact location as an InferenceService ``storageUri``."""
    parsed = urlparse(artifact_location)
    if parsed.scheme == "mlflow-artifacts":
        return f"{proxied_root.rstrip('/')}/{parsed.path.lstrip('/')}"
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


def roll_inference_service(
    name: str, namespace: str, uri: str, canary_percent: int = 0, api_client=None
) -> dict:
    """Patch InferenceService ``name`` to serve ``uri``; returns the patched object."""
    from kubernetes import client

    api = client.CustomObjectsApi(api_client)  # a dict body goes as a JSON merge patch
    patch = rollout_patch(uri, canary_percent)
    return api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)
