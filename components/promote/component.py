from kfp import dsl
from kfp.dsl import Input, Model

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(registered: Input[Model], mlflow_uri: str):
    """Move the ``champion`` alias to the version the register step created."""
    from cellseg.ops.steps import promote_step

    promote_step(registered.metadata["version"], mlflow_uri)
