from kfp import dsl
from kfp.dsl import Input, Model

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(
    registered: Input[Model],
    mlflow_uri: str,
    inference_service: str = "",
    canary_traffic_percent: int = 0,
    serving_artifacts_root: str = "",
) -> str:
    """Move ``champion`` to the registered version if it still points to the version the gate
    compared against and, with ``inference_service``, roll that KServe InferenceService to it;
    returns its storageUri ("" when none, or when ``champion`` moved during the run)."""
    from cellseg.steps.promote import promote_step

    meta = registered.metadata
    return promote_step(
        version=meta["version"],
        compared_with=meta["champion_version"],
        mlflow_uri=mlflow_uri,
        force=meta.get("forced", False),
        inference_service=inference_service,
        canary_traffic_percent=canary_traffic_percent,
        serving_artifacts_root=serving_artifacts_root,
    )
