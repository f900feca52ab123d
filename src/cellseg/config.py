"""One typed training configuration, from an annotated YAML profile plus ``key=value`` overrides.

A profile holds shared keys at the top and per-phase keys under ``phase1:`` / ``phase2:``; the
resolved config for one phase is flat, frozen, and saved beside the checkpoints. Unknown keys are
errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A profile or override that does not fit :class:`TrainConfig`."""


@dataclass(frozen=True)
class TrainConfig:
    # model
    backbone: str = "vit_tiny"  # a cellseg.model registry entry or any timm ViT name
    weights: str | None = None  # None: random init; "default", an hf-hub: id or a local file
    decoder_width: int = 0  # 0: the backbone entry's own
    image_size: tuple[int, int] = (240, 320)  # (H, W), multiples of 16
    # optimisation
    epochs: int = 10
    batch_size: int = 4  # per process
    grad_accum: int = 4  # effective batch = batch_size x grad_accum x processes
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    patience: int = 10  # epochs without validation improvement before stopping
    min_delta: float = 0.0
    # Phase 2 LoRA on the backbone's attention qkv (the decoder's LR there is fixed at 1e-4)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    # runtime
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPU) | bf16 | none
    compile: bool = False
    num_workers: int = 2
    seed: int = 0
    deterministic: bool = False
    limit_train_images: int = 0  # 0 = all; for quick tries
    limit_val_images: int = 0

    def __post_init__(self):
        if any(s % 16 or s <= 0 for s in self.image_size):
            raise ConfigError(f"image_size must be positive multiples of 16, got {self.image_size}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 0:
            raise ConfigError("batch_size and grad_accum must be >= 1, epochs >= 0")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
PROFILES = ("local", "uni-gpu")


def _coerce(key: str, value, source: str):
    kind = typing.get_type_hints(TrainConfig)[key]
    try:
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # str | None
            return None if value in (None, "null", "None", "") else str(value)
        if kind == tuple[int, int]:
            parts = value.split(",") if isinstance(value, str) else list(value)
            if len(parts) != 2:
                raise ValueError("expected H,W")
            return (int(parts[0]), int(parts[1]))
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return value.lower() in ("true", "1", "yes")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("expected an integer")
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {key}={value!r}: {err}") from None


def _check_keys(mapping: dict, source: str) -> None:
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")


def profile_path(profile: str | Path) -> Path:
    if profile in PROFILES:
        return Path(str(files("cellseg") / "profiles" / f"{profile}.yaml"))
    path = Path(profile)
    if not path.is_file():
        raise ConfigError(f"{profile}: not a profile ({', '.join(PROFILES)}) nor a YAML file")
    return path


def load_config(profile: str | Path, phase: int, overrides: list[str] = ()) -> TrainConfig:
    """Resolve ``profile`` for ``phase`` (1 or 2), then apply ``key=value`` overrides."""
    path = profile_path(profile)
    raw = yaml.safe_load(path.read_text()) or {}
    phases = {p: raw.pop(f"phase{p}", None) or {} for p in (1, 2)}
    _check_keys(raw, str(path))
    for p, section in phases.items():
        _check_keys(section, f"{path} phase{p}")
    values = {**raw, **phases[phase]}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value")
        _check_keys({key: None}, "override")
        values[key] = yaml.safe_load(value) if value else value
    return TrainConfig(**{k: _coerce(k, v, str(path)) for k, v in values.items()})


def config_to_dict(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["image_size"] = list(config.image_size)
    return d


def config_from_dict(values: dict) -> TrainConfig:
    _check_keys(values, "saved config")
    return TrainConfig(**{k: _coerce(k, v, "saved config") for k, v in values.items()})
