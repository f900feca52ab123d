from kfp import dsl
from kfp.dsl import Input, Model

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(registered: Input[Model], mlflow_uri: str) -> bool:
    """Move ``champion`` to the registered version if it still points to the version the gate
    compared against; returns whether it moved."""
    from cellseg.ops.steps import promote_step

    meta = registered.metadata
    result = promote_step(
        meta["version"], meta["champion_version"], mlflow_uri, meta.get("forced", False)
    )
    return result["promoted"]
