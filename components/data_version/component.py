from typing import NamedTuple

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def data_version(source: str, expected_md5: str, data_repo: str, data_rev: str) -> NamedTuple(
    "DataVersion", md5=str, source=str, commit=str
):
    """The raw data this run trains on (never cached): ``data_repo`` at ``data_rev`` pulled
    onto the datasets volume, else the folder ``source``; its DVC md5, checked against
    ``expected_md5`` when given. Conversion is cached on the md5: new data, new conversion."""
    from cellseg.steps.data_version import data_version_step

    found = data_version_step(
        source=source, expected_md5=expected_md5, data_repo=data_repo, data_rev=data_rev
    )
    return (found.md5, found.source, found.commit)
