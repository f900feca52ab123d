from kfp import dsl
from kfp.dsl import Input, Model

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(
    registered: Input[Model],
    mlflow_uri: str,
    inference_service: str = "",
    canary_traffic_percent: int = 0,
) -> str:
    """Move the ``champion`` alias to the version the register step created and, with
    ``inference_service``, roll that KServe InferenceService to it; returns its storageUri."""
    from cellseg.ops.steps import promote_step

    return promote_step(
        registered.metadata["version"], mlflow_uri, inference_service, canary_traffic_percent
    )
