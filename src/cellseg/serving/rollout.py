"""The cluster side of a promotion: the champion's storageUri, and the InferenceService rolled
to it (all traffic, or a canary share).

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


def champion_storage_uri(name: str, alias_or_version: str = "champion") -> str:
    """The storageUri of a registered version (by alias, or by number)."""
    import mlflow

    client = mlflow.MlflowClient()
    if alias_or_version.isdigit():
        mv = client.get_model_version(name, alias_or_version)
    else:
        mv = client.get_model_version_by_alias(name, alias_or_version)
    if getattr(mv, "model_id", None):  # MLflow 3: the version is a logged model
        return storage_uri(client.get_logged_model(mv.model_id).artifact_location)
    return storage_uri(client.get_model_version_download_uri(name, mv.version))


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
