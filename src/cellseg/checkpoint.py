"""Checkpoints: atomic writes, safe reads, and loading across LoRA / non-LoRA key layouts.

Keys are compared in a canonical form: without DDP's ``module.``, ``torch.compile``'s
``_orig_mod.`` and peft's ``base_model.model.`` prefixes, and peft's ``.base_layer`` (the frozen
Linear a LoRA layer wraps). A LoRA checkpoint loaded into a model without adapters has its
adapters merged into the base weights (W + B·A·alpha/r); a plain checkpoint loaded into a LoRA
model leaves the fresh adapters as they are (B = 0, so the function is unchanged).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
_LORA = re.compile(r"\.lora_(A|B)\.[^.]+\.weight$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not fit the model; the message names the file."""


def atomic_save(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint on the CPU with ``weights_only=True`` (no arbitrary code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None


def canonical_key(key: str) -> str:
    for prefix in _PREFIXES:
        key = key.replace(prefix, "")
    return key.replace(".base_layer.", ".")


def is_lora_key(key: str) -> bool:
    return bool(_LORA.search(key))


def merge_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Fold LoRA adapters into their base weights; returns a state without LoRA keys."""
    merged = {k: v for k, v in state.items() if not is_lora_key(k)}
    for key in state:
        m = _LORA.search(key)
        if not m or m.group(1) != "A":
            continue
        stem = key[: m.start()]
        lora_b = state[key.replace(".lora_A.", ".lora_B.")]
        base = merged[f"{stem}.weight"]
        merged[f"{stem}.weight"] = (
            base + (lora_b.float() @ state[key].float()).to(base.dtype) * scaling
        )
    return merged


def load_model_state(
    model: nn.Module, state: dict[str, torch.Tensor], lora_scaling: float | None, source: str
) -> None:
    """Load ``state`` into ``model`` whatever the two key layouts (see the module docstring).

    Args:
        lora_scaling: alpha / rank of the LoRA the checkpoint was trained with (None: no LoRA).
        source: the file, for error messages.
    """
    ckpt = {canonical_key(k): v for k, v in state.items()}
    targets = {canonical_key(k): k for k in model.state_dict()}
    model_lora = any(is_lora_key(k) for k in targets)
    if any(is_lora_key(k) for k in ckpt) and not model_lora:
        if lora_scaling is None:
            raise CheckpointError(f"{source}: LoRA weights without their scaling (lora_alpha/rank)")
        ckpt = merge_lora(ckpt, lora_scaling)
    missing = [k for k in targets if k not in ckpt and not is_lora_key(k)]
    unexpected = [k for k in ckpt if k not in targets]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.load_state_dict({targets[k]: v for k, v in ckpt.items()}, strict=False)
