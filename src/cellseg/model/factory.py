"""The segmentation model: a timm ViT backbone and the HoVer decoder, behind ``create_model``.

Model variants are registry entries of a few lines (timm's ``_registry`` pattern)::

    model = create_model("uni")                      # UNI ViT-L/16 from hf-hub (HF_TOKEN)
    model = create_model("uni", weights="/models/uni/pytorch_model.bin")  # air-gapped
    model = create_model("vit_tiny")                 # random init, for CPU runs
    model = create_model("vit_base_patch16_224")     # any timm ViT by name
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from cellseg.errors import CheckpointError
from cellseg.model.decoder import HoverDecoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNI_HUB_ID = "hf-hub:MahmoodLab/UNI"


@dataclass(frozen=True)
class ModelSpec:
    """How to build one variant: the timm architecture, its options and the decoder's width and
    layout (``shared_decoder``: one upsampling path for the three branches; ``image_skips``: a
    convolutional encoder of the image feeds the skips, see ``cellseg.model.decoder``)."""

    timm_name: str
    decoder_width: int = 256
    default_weights: str | None = None
    timm_kwargs: tuple[tuple[str, object], ...] = ()
    shared_decoder: bool = False
    image_skips: bool = False


_REGISTRY: dict[str, Callable[[], ModelSpec]] = {}


def register_model(fn: Callable[[], ModelSpec]) -> Callable[[], ModelSpec]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


@register_model
def uni() -> ModelSpec:
    """UNI (Chen et al. 2024): ViT-L/16 pretrained on 100M pathology patches; gated on HF."""
    return ModelSpec(
        "vit_large_patch16_224",
        decoder_width=512,
        default_weights=UNI_HUB_ID,
        timm_kwargs=(("init_values", 1e-5),),
    )


@register_model
def vit_small() -> ModelSpec:
    return ModelSpec("vit_small_patch16_224", decoder_width=256)


@register_model
def vit_tiny() -> ModelSpec:
    return ModelSpec("vit_tiny_patch16_224", decoder_width=128)


@register_model
def vit_tiny_shared() -> ModelSpec:
    """ViT-Tiny with one decoder path for NP, HV and NC (``local`` before issue 23)."""
    return ModelSpec("vit_tiny_patch16_224", decoder_width=128, shared_decoder=True)


@register_model
def vit_tiny_image_skips() -> ModelSpec:
    """``vit_tiny_shared`` whose skips also see the image through a small convolutional encoder:
    the ``local`` profile's CPU model."""
    return ModelSpec(
        "vit_tiny_patch16_224", decoder_width=128, shared_decoder=True, image_skips=True
    )


@register_model
def test_vit() -> ModelSpec:
    """A 4-block, 32-wide ViT: the test suite's model (a forward pass takes milliseconds)."""
    return ModelSpec(
        "vit_tiny_patch16_224",
        decoder_width=32,
        timm_kwargs=(("embed_dim", 32), ("depth", 4), ("num_heads", 2), ("mlp_ratio", 2.0)),
    )


def skip_indices(depth: int, n: int = 4) -> list[int]:
    """``n`` evenly spaced block indices ending at the last (ViT-L: 5, 11, 17, 23)."""
    return [depth * (i + 1) // n - 1 for i in range(n)]


class CellSegModel(nn.Module):
    """Image in [0, 1], (B, 3, H, W) with H and W multiples of 16 -> NP, HV, NC logits."""

    def __init__(
        self,
        backbone: nn.Module,
        decoder_width: int,
        shared_decoder: bool = False,
        image_skips: bool = False,
    ):
        super().__init__()
        self.skip_indices = skip_indices(len(backbone.blocks))
        # The final norm and head are unused (we read intermediate blocks): drop them, so every
        # parameter gets a gradient and DDP reduces every bucket.
        backbone.prune_intermediate_layers(self.skip_indices, prune_norm=True, prune_head=True)
        self.backbone = backbone
        self.decoder = HoverDecoder(backbone.embed_dim, decoder_width, shared_decoder, image_skips)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = image.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"image sides must be multiples of 16, got {h}x{w}")
        x = (image - self.mean) / self.std
        features = self.backbone.forward_intermediates(
            x, indices=self.skip_indices, output_fmt="NCHW", intermediates_only=True
        )
        return self.decoder(x, features)


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file, read safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found (config key `weights`)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, foreign, or pickled code refused by weights_only
        raise CheckpointError(f"{path}: not a readable weights file ({err})") from None
    return state.get("state_dict", state.get("model", state))


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local backbone weights file; only the final norm and head may be missing
    (CellSegModel prunes them)."""
    state = load_state_file(path)
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(
            f"{path}: does not fit the backbone ({str(err).splitlines()[-1]}); "
            "check that `backbone` names the architecture these weights were trained as"
        ) from None
    missing = [k for k in missing if not k.startswith(("head", "norm", "fc_norm"))]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not fit the backbone "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def create_backbone(spec: ModelSpec, weights: str | None) -> nn.Module:
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **dict(spec.timm_kwargs)}
    if weights and weights.startswith("hf-hub:"):
        # huggingface_hub reads HF_TOKEN from the environment; it is never passed or logged here.
        return timm.create_model(weights, pretrained=True, **kwargs)
    backbone = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    if weights:
        load_backbone_weights(backbone, weights)
    return backbone


def create_model(
    name: str, weights: str | None = "default", decoder_width: int | None = None
) -> CellSegModel:
    """Build a registered variant, or any timm ViT by name.

    Args:
        name: a registry entry (``list_models()``) or a timm ViT architecture name.
        weights: ``"default"`` (the entry's own: hf-hub for ``uni``, none otherwise), ``None``
            (random init), an ``hf-hub:`` id or a local ``.safetensors`` / ``.pth`` file.
        decoder_width: overrides the entry's decoder width.
    """
    spec = _REGISTRY[name]() if name in _REGISTRY else ModelSpec(name)
    if weights == "default":
        weights = spec.default_weights
    backbone = create_backbone(spec, weights)
    return CellSegModel(
        backbone, decoder_width or spec.decoder_width, spec.shared_decoder, spec.image_skips
    )
