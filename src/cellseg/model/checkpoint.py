"""Checkpoints: the one owner of their format, file names, safe reads and key layouts.

A checkpoint is a ``torch.save`` dict read back with ``weights_only=True``: the weights, a
:class:`CheckpointMeta` (how to rebuild the model and feed it), the epoch and best validation
loss, and, in ``latest`` files, the state to resume from. Its ``format`` tag is checked on read.

Keys are compared in a canonical form: without DDP's ``module.``, ``torch.compile``'s
``_orig_mod.`` and peft's ``base_model.model.`` prefixes, and peft's ``.base_layer`` (the frozen
Linear a LoRA layer wraps). A LoRA checkpoint loaded into a model without adapters has its
adapters merged into the base weights (W + B·A·alpha/r); a plain checkpoint loaded into a LoRA
model leaves the fresh adapters as they are (B = 0, so the function is unchanged).
"""

from __future__ import annotations

import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cellseg.atomic import replacing
from cellseg.errors import CheckpointError

FORMAT = "cellseg-checkpoint/1"
BEST, LATEST = "best", "latest"
_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
_LORA = re.compile(r"\.lora_(A|B)\.[^.]+\.weight$")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # how torch's weights_only names a refused global

if TYPE_CHECKING:  # torch is imported where tensors are read or written, so that the pipeline's
    import torch  # CPU steps can name and find checkpoints without it
    from torch import nn


def checkpoint_path(folder: Path, phase: int, kind: str = BEST) -> Path:
    """``<folder>/best_phase<N>.pt`` or ``latest_phase<N>.pt``."""
    return Path(folder) / f"{kind}_phase{phase}.pt"


def find_checkpoint(path: Path, phases: tuple[int, ...] = (2, 1)) -> Path:
    """A checkpoint file as given, or the most advanced one in a training folder: for each
    phase in ``phases``, its best, else its latest."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for phase in phases:
            for kind in (BEST, LATEST):
                if checkpoint_path(path, phase, kind).is_file():
                    return checkpoint_path(path, phase, kind)
    names = ", ".join(f"{k}_phase{p}.pt" for p in phases for k in (BEST, LATEST))
    raise CheckpointError(f"{path}: no checkpoint (a .pt file, or a folder holding {names})")


def lora_scaling(rank: int, alpha: float) -> float:
    """The factor peft applies to a LoRA update B·A."""
    return alpha / rank


@dataclass(frozen=True)
class CheckpointMeta:
    """What rebuilds the model and feeds it images as in training."""

    phase: int
    model_name: str  # a cellseg.model registry entry or a timm ViT name
    decoder_width: int
    image_size: tuple[int, int]  # (H, W) trained at
    native_size: tuple[int, int]  # (H, W) of the dataset's frames
    lora: dict | None  # {"rank": r, "alpha": a} when the backbone carries adapters
    config: dict  # the resolved training config, for the record
    # the phase whose training produced these weights: a Phase 2 run keeps Phase 1's model as
    # its best until it beats it on val (0 here: the checkpoint's ``phase``)
    chosen_phase: int = 0

    def __post_init__(self):
        if not self.chosen_phase:
            object.__setattr__(self, "chosen_phase", self.phase)

    @property
    def lora_scaling(self) -> float | None:
        return lora_scaling(self.lora["rank"], self.lora["alpha"]) if self.lora else None

    @property
    def scale(self) -> float:
        """Working resolution / native resolution."""
        return self.image_size[0] / self.native_size[0]

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> CheckpointMeta:
        # checkpoints written before chosen_phase existed hold their own phase's weights
        values = {name: ckpt.get(name, 0) for name in cls.__dataclass_fields__}
        values["image_size"] = tuple(values["image_size"])
        values["native_size"] = tuple(values["native_size"])
        return cls(**values)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    meta: CheckpointMeta,
    epoch: int,
    best_metric: float,
    resume: dict | None = None,
) -> None:
    """Write the checkpoint atomically (a reader never sees half a file).

    Args:
        resume: for ``latest`` files: optimizer, scheduler, early-stopping and RNG state.
    """
    import torch

    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        **asdict(meta),
        "image_size": list(meta.image_size),
        "native_size": list(meta.native_size),
        "model": weights,
        "epoch": epoch,
        "best_metric": best_metric,
        **(resume or {}),
    }
    with replacing(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint on the CPU with ``weights_only=True`` (no arbitrary code)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused it: say why, in one line
        found = _GLOBAL.search(str(err))
        names = [found.group(1)] if found else foreign_globals(path)
        what = f" ({', '.join(names)})" if names else ""
        raise CheckpointError(
            f"{path}: not a checkpoint this tool can load safely: it holds code{what}"
        ) from None
    except Exception as err:  # a truncated or foreign file: say which
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found != FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {found!r}, this cellseg reads {FORMAT!r} "
            "(a backbone weights file goes in the config's `weights`, not here)"
        )
    return ckpt


def foreign_globals(path: Path) -> list[str]:
    """The functions and classes a pickle (bare, or a torch zip's ``data.pkl``) names outside
    torch and collections, read from its opcodes without running any of them."""
    import pickletools
    import zipfile

    data = Path(path).read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
            data = archive.read(pkl[0]) if pkl else b""
    names, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a damaged pickle: what was read so far
        pass
    own = ("torch.", "collections.")
    return sorted({n for n in names if not n.startswith(own)})


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


def load_into(model: nn.Module, path: Path) -> dict:
    """Load the checkpoint at ``path`` into ``model`` (any key layout); returns the checkpoint."""
    ckpt = load_checkpoint(path)
    meta = CheckpointMeta.from_checkpoint(ckpt)
    load_model_state(model, ckpt["model"], meta.lora_scaling, str(path))
    return ckpt


def model_from_checkpoint(path: Path):
    """The model a checkpoint describes (LoRA merged into the backbone), in eval mode, and its
    :class:`CheckpointMeta`."""
    from cellseg.model.factory import create_model

    ckpt = load_checkpoint(path)
    meta = CheckpointMeta.from_checkpoint(ckpt)
    model = create_model(meta.model_name, weights=None, decoder_width=meta.decoder_width)
    load_model_state(model, ckpt["model"], meta.lora_scaling, str(path))
    return model.eval(), meta
