"""The promote step: ``champion`` moved to the registered version (compare-and-set), and a KServe
InferenceService rolled to it when one is named."""

from __future__ import annotations

from cellseg.registry import tracking
from cellseg.settings import REGISTERED_MODEL


def promote_step(
    *,
    version: str,
    compared_with: str,
    mlflow_uri: str | None,
    force: bool = False,
    inference_service: str = "",
    canary_traffic_percent: int = 0,
    serving_artifacts_root: str = "",
) -> str:
    """Move ``champion`` to ``version`` unless it moved away from ``compared_with`` (the version
    the gate compared against) meanwhile; then, with ``inference_service``, roll that KServe
    InferenceService (in this pod's namespace) to it, all traffic or a ``canary_traffic_percent``
    share. ``serving_artifacts_root`` is where KServe reads the MLflow server's proxied
    artifacts ("": manifests/base's volume). A rollout the service cannot take (a canary in
    KServe's Standard mode) is refused before ``champion`` moves. Returns the storageUri rolled
    to ("" when no service is named or nothing moved)."""
    from cellseg.registry.promotion import promote

    api = None
    if inference_service:
        from cellseg.cluster.client import api_client, pod_namespace
        from cellseg.serving.rollout import plan_rollout

        api, namespace = api_client(), pod_namespace()
        plan_rollout(inference_service, namespace, canary_traffic_percent, api)
    tracking.configure(mlflow_uri or None)
    decision = promote(version, compared_with, force=force)
    print("; ".join(decision.reasons))
    if not inference_service or not decision.promote:
        return ""
    from cellseg.registry.champion import storage_uri_of
    from cellseg.serving.rollout import patch_inference_service

    uri = storage_uri_of(REGISTERED_MODEL, version, serving_artifacts_root)
    patch_inference_service(inference_service, namespace, uri, canary_traffic_percent, api)
    return uri
