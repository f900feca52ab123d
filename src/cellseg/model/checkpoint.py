"""Checkpoints: the one owner of their format, file names, safe reads and key layouts.

A checkpoint is a ``torch.save`` dict read back with ``weights_only=True``: the weights, a
:class:`CheckpointMeta` (how to rebuild the model and feed it), the epoch and best validation
loss, and, in ``latest`` files, the state to resume from. Its ``format`` tag is checked on read.

A ``latest`` file of a run with frozen weights (Phase 1's pretrained backbone, Phase 2's base
weights under the adapters) holds only what trains, plus a reference to ``frozen_phase<N>.pt``
beside it: those weights, written once per run, and their sha256. Reading such a checkpoint
reads both and checks the digest, so every reader sees the whole model; a missing or changed
frozen file is an error. ``best`` files are always whole (they are what ships).

Keys are compared in a canonical form: without DDP's ``module.``, ``torch.compile``'s
``_orig_mod.`` and peft's ``base_model.model.`` prefixes, and peft's ``.base_layer`` (the frozen
Linear a LoRA layer wraps). A LoRA checkpoint loaded into a model without adapters has its
adapters merged into the base weights (W + B·A·alpha/r); a plain checkpoint loaded into a LoRA
model leaves the fresh adapters as they are (B = 0, so the function is unchanged).
"""

from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cellseg.atomic import replacing
from cellseg.errors import CheckpointError

FORMAT = "cellseg-checkpoint/1"
FROZEN_FORMAT = "cellseg-frozen-weights/1"
BEST, LATEST, FROZEN = "best", "latest", "frozen"
_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
_LORA = re.compile(r"\.lora_(A|B)\.[^.]+\.weight$")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # how torch's weights_only names a refused global

if TYPE_CHECKING:  # torch is imported where tensors are read or written, so that the pipeline's
    import torch  # CPU steps can name and find checkpoints without it
    from torch import nn


def checkpoint_path(folder: Path, phase: int, kind: str = BEST) -> Path:
    """``<folder>/best_phase<N>.pt``, ``latest_phase<N>.pt`` or ``frozen_phase<N>.pt``."""
    return Path(folder) / f"{kind}_phase{phase}.pt"


def checkpoint_files(path: Path) -> list[Path]:
    """The files a checkpoint needs, to copy it elsewhere: ``path`` and, for a ``latest``
    file, the frozen weights beside it when there are any."""
    path = Path(path)
    frozen = path.with_name(path.name.replace(f"{LATEST}_", f"{FROZEN}_", 1))
    return [path, frozen] if path.name.startswith(f"{LATEST}_") and frozen.is_file() else [path]


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


def snapshot(value):
    """``value`` (tensors in dicts, lists and tuples) with every tensor copied to the CPU, so
    that it can be written while training goes on changing the originals."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(snapshot(v) for v in value)
    return value


def frozen_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the parameters that do not train."""
    return [name for name, p in model.named_parameters() if not p.requires_grad]


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, types, shapes and bytes, in key order."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_payload(
    weights: dict[str, torch.Tensor],
    meta: CheckpointMeta,
    epoch: int,
    best_metric: float,
    resume: dict | None = None,
    frozen: dict | None = None,
) -> dict:
    """What a checkpoint file holds.

    Args:
        weights: the model's state (CPU tensors); without the frozen keys when ``frozen``.
        resume: for ``latest`` files: optimizer, scheduler, early-stopping and RNG state.
        frozen: ``{"file": name, "sha256": digest}`` of the frozen weights beside it.
    """
    return {
        "format": FORMAT,
        **asdict(meta),
        "image_size": list(meta.image_size),
        "native_size": list(meta.native_size),
        "model": weights,
        "epoch": epoch,
        "best_metric": best_metric,
        **(resume or {}),
        **({"frozen": frozen} if frozen else {}),
    }


def write_payload(path: Path, payload: dict) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically and durably: a reader (or a run killed
    mid-write, or a node that loses power) sees the previous file or the new one, whole."""
    import torch

    with replacing(path, durable=True) as tmp:
        torch.save(payload, tmp)


def write_frozen(path: Path, weights: dict[str, torch.Tensor], digest: str = "") -> dict:
    """Write frozen ``weights`` (CPU tensors) to ``path``; returns the reference a ``latest``
    checkpoint keeps to them. ``digest``: their :func:`weights_digest`, if already known."""
    digest = digest or weights_digest(weights)
    write_payload(path, {"format": FROZEN_FORMAT, "sha256": digest, "weights": weights})
    return {"file": Path(path).name, "sha256": digest}


def read_frozen(checkpoint: Path, ref: dict) -> dict:
    """The frozen weights a ``latest`` checkpoint refers to, checked against its digest."""
    import torch

    path = Path(checkpoint).with_name(ref["file"])
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint}: its frozen weights {path.name} are missing (written once per run "
            "beside it: copy them with it)"
        )
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not readable frozen weights ({first})") from None
    if not isinstance(found, dict) or found.get("format") != FROZEN_FORMAT:
        raise CheckpointError(f"{path}: not a frozen-weights file ({FROZEN_FORMAT!r})")
    if weights_digest(found["weights"]) != ref["sha256"]:
        raise CheckpointError(
            f"{checkpoint}: {path.name} has changed since it was written (sha256 differs): "
            "it belongs to another run"
        )
    return found["weights"]


def save_checkpoint(
    path: Path,
    model: nn.Module,
    meta: CheckpointMeta,
    epoch: int,
    best_metric: float,
    resume: dict | None = None,
) -> None:
    """Write a whole checkpoint of ``model`` atomically (a reader never sees half a file).

    Args:
        resume: for ``latest`` files: optimizer, scheduler, early-stopping and RNG state.
    """
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_payload(path, checkpoint_payload(weights, meta, epoch, best_metric, resume))


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
    if ckpt.get("frozen"):
        ckpt["model"] = {**read_frozen(path, ckpt["frozen"]), **ckpt["model"]}
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
        # Linear: B (out, r) @ A (r, in); Conv2d: B (out, r, 1, 1) and A (r, in, k, k), whose
        # product over r is the same matrix product on their flattened forms
        update = lora_b.float().flatten(1) @ state[key].float().flatten(1)
        merged[f"{stem}.weight"] = base + update.view(base.shape).to(base.dtype) * scaling
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
