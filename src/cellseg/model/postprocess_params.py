"""The post-processing settings a checkpoint carries: network outputs -> classified instances.

Part of the checkpoint format: the training configuration extends this class (so a profile sets
them and ``--set`` overrides them), each checkpoint saves them with its config, and the predictor
reads them back, so a model is always post-processed the way it was chosen on val. What each
setting does: ``cellseg.evaluation.postprocess``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from cellseg.classes import CLASS_NAMES

ClassName = Literal[CLASS_NAMES]  # the tuple's items


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class PostprocessParams:
    np_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5  # cell probability = foreground
    markers: Literal["sobel", "slope"] = "sobel"  # watershed markers: HoVer-Net's, or HV slopes
    boundary_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.4  # sobel: energy = boundary
    slope_sigma: Annotated[float, Field(gt=0)] = 2.0  # slope: Gaussian on the HV maps, pixels
    sobel_ksize: Annotated[int, Field(ge=1)] = 21
    min_marker_area: Annotated[int, Field(ge=1)] = 10  # pixels, at the working resolution
    min_instance_area: Annotated[int, Field(ge=1)] = 10
    # Classes whose cells lie apart (white cells: about one per field, two touch in 2 of BCCD's
    # 364 images): touching instances of such a class are pieces of one cell, a lobed nucleus
    # that the HV maps split, and are merged (class from the merged cell's mean softmax).
    merge_touching: tuple[ClassName, ...] = ()
    # Score factor for instances touching the image border. BCCD's annotators left most cut-off
    # cells unboxed (78% of the val split's unlabelled regions touch the border, 11% of its
    # boxed cells), so a border cell is a doubtful detection: ranking it lower raises strict AP
    # without dropping it. 1.0 = off.
    border_score: Annotated[float, Field(gt=0, le=1)] = 1.0
    # A foreground region whose markers all fell under min_marker_area (a small cell: a 4 px-
    # radius platelet's marker is under 30 px) becomes one instance of its own instead of
    # vanishing. Off by default, so checkpoints and profiles without the key behave as before.
    keep_markerless: bool = False


POSTPROCESS_KEYS = tuple(PostprocessParams.__dataclass_fields__)


def with_overrides(params: PostprocessParams, items: list[str]) -> PostprocessParams:
    """``params`` with ``key=value`` items applied (values read as YAML: ``border_score=0.8``,
    ``merge_touching=[WBC]``); an unknown key or a bad value is one line."""
    import dataclasses

    import yaml
    from pydantic import ValidationError

    from cellseg.errors import ConfigError

    values = dataclasses.asdict(params)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in POSTPROCESS_KEYS:
            raise ConfigError(
                f"--set {item!r}: expected key=value with a post-processing key "
                f"({', '.join(POSTPROCESS_KEYS)})"
            )
        values[key] = yaml.safe_load(value)
    try:
        return PostprocessParams(**values)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"--set {first['loc'][0]}: {first['msg']}") from None


def postprocess_params(saved_config: dict) -> PostprocessParams:
    """The settings saved in a checkpoint's config; a key an older checkpoint lacks keeps its
    default."""
    return PostprocessParams(**{k: saved_config[k] for k in POSTPROCESS_KEYS if k in saved_config})
