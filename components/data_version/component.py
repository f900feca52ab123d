from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def data_version(source: str, expected_md5: str) -> str:
    """The DVC md5 of the raw data at ``source`` (never cached), checked against
    ``expected_md5`` when given. Conversion is cached on it: new data, new conversion."""
    from cellseg.steps.data_version import data_version_step

    return data_version_step(source=source, expected_md5=expected_md5)
