"""One typed training configuration, from an annotated YAML profile plus ``key=value`` overrides.

A profile holds shared keys at the top and per-phase keys under ``phase1:`` / ``phase2:``; the
resolved config for one phase is flat, frozen, and saved beside the checkpoints. Unknown keys are
errors, never ignored.
"""

from __future__ import annotations

import dataclasses
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass

from cellseg.errors import ConfigError
from cellseg.model.postprocess_params import PostprocessParams


def _pair(value):
    """``"480,640"`` (an override) or ``[480, 640]`` (YAML) -> a two-item sequence."""
    return value.split(",") if isinstance(value, str) else value


Side = Annotated[int, Field(gt=0, multiple_of=16)]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class TrainConfig(PostprocessParams):
    """Everything one training phase reads, and the post-processing its checkpoint carries
    (the inherited :class:`~cellseg.model.postprocess_params.PostprocessParams` keys)."""

    # model
    backbone: str = "vit_tiny"  # a cellseg.model.factory registry entry or any timm ViT name
    weights: str | None = None  # None: random init; "default", an hf-hub: id or a local file
    decoder_width: Annotated[int, Field(ge=0, multiple_of=16)] = 0  # 0: the backbone entry's
    image_size: Annotated[tuple[Side, Side], BeforeValidator(_pair)] = (240, 320)  # (H, W)
    # training samples: 0 = whole frames; N = N x N crops at the inference scale, a share
    # crop_focus of them placed on a cell drawn by the class weights (training/augment.py)
    train_crop: Annotated[int, Field(ge=0, multiple_of=16)] = 0
    crop_focus: Annotated[float, Field(ge=0, le=1)] = 0.0
    degrade: Annotated[float, Field(ge=0, le=1)] = 0.0  # P(blur or noise) of a training sample
    # optimisation
    epochs: Annotated[int, Field(ge=0)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 4  # per process
    grad_accum: Annotated[int, Field(ge=1)] = 4  # effective batch = batch x accum x processes
    lr: Annotated[float, Field(gt=0)] = 3e-4
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    warmup_epochs: Annotated[int, Field(ge=0)] = 1
    patience: Annotated[int, Field(ge=1)] = 10  # epochs without val improvement before stopping
    min_delta: float = 0.0
    # Phase 2: LoRA on the backbone (a ViT's attention qkv); the decoder at its own, lower LR (the
    # notebook's fix: whatever lr the adapters get, the trained decoder moves slowly)
    decoder_lr: Annotated[float, Field(gt=0)] = 1e-4  # Phase 1 trains the decoder at lr
    lora_rank: Annotated[int, Field(ge=1)] = 8
    lora_alpha: Annotated[float, Field(gt=0)] = 16.0  # adapter scale = alpha / rank
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    # runtime
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "none"] = "auto"  # auto: bf16 on GPU
    compile: bool = False
    num_workers: Annotated[int, Field(ge=0)] = 2
    seed: int = 0
    deterministic: bool = False
    limit_train_images: Annotated[int, Field(ge=0)] = 0  # 0 = all; for quick tries
    limit_val_images: Annotated[int, Field(ge=0)] = 0

    @field_validator("train_crop")
    @classmethod
    def _crop_fits(cls, crop: int, info: ValidationInfo) -> int:
        size = info.data.get("image_size")
        if size and crop > min(size):
            raise ValueError(f"a crop must fit the image_size {list(size)}")
        return crop


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
PROFILES_DIR = "profiles"  # the package's named profiles: <name>.yaml beside this module
_VALIDATOR = TypeAdapter(TrainConfig)


def _build(values: dict, source: str, overridden: frozenset = frozenset()) -> TrainConfig:
    """Validate ``values`` into a config; the first problem as one line naming the key and
    where it came from (``source``, or ``override`` for the keys in ``overridden``)."""
    try:
        return _VALIDATOR.validate_python(values)
    except ValidationError as err:
        first = err.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else "?"
        shown = values.get(key, first.get("input"))
        where = "override" if key in overridden else source
        raise ConfigError(f"{where}: {key}={shown!r}: {first['msg']}") from None


def _check_keys(mapping: dict, source: str) -> None:
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")


def profile_names() -> list[str]:
    """The named profiles that ship with the package (``local``, ``uni-gpu``, ...)."""
    folder = files("cellseg.training") / PROFILES_DIR
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def profile_path(profile: str | Path) -> Path:
    if str(profile) in profile_names():
        return Path(str(files("cellseg.training") / PROFILES_DIR / f"{profile}.yaml"))
    path = Path(profile)
    if not path.is_file():
        raise ConfigError(
            f"{profile}: not a profile ({', '.join(profile_names())}) nor a YAML file"
        )
    return path


def load_config(profile: str | Path, phase: int, overrides: list[str] = ()) -> TrainConfig:
    """Resolve ``profile`` for ``phase`` (1 or 2), then apply ``key=value`` overrides."""
    path = profile_path(profile)
    raw = yaml.safe_load(path.read_text()) or {}
    phases = {p: raw.pop(f"phase{p}", None) or {} for p in (1, 2)}
    _check_keys(raw, str(path))
    for p, section in phases.items():
        _check_keys(section, f"{path} phase{p}")
    values, overridden = {**raw, **phases[phase]}, set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value")
        _check_keys({key: None}, "override")
        values[key] = yaml.safe_load(value) if value else value
        overridden.add(key)
    return _build(values, str(path), frozenset(overridden))


def config_to_dict(config: TrainConfig) -> dict:
    """Plain YAML-safe values (tuples as lists)."""
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_from_dict(values: dict) -> TrainConfig:
    _check_keys(values, "saved config")
    return _build(values, "saved config")
