from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def convert(source: str, data_md5: str, dataset_format: str, dataset: Output[Dataset]):
    """Raw BCCD (VOC boxes) at ``source`` -> the instance-segmentation dataset.

    ``data_md5`` (data.dvc) is checked against the source; with ``dataset_format`` (the
    converter's output format) it keys the step's cache, so a new converter converts again.
    """
    from pathlib import Path

    from cellseg.steps.convert import convert_step

    dataset.metadata.update(convert_step(source=source, data_md5=data_md5, out=Path(dataset.path)))
