"""Phase 2: LoRA adapters (peft) on the backbone: a ViT's attention ``qkv`` projections, or the
layers its registry entry names (``ModelSpec.lora_targets``)."""

from __future__ import annotations

from torch import nn


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    """Wrap the backbone's ``model.lora_targets`` layers (Linear or Conv2d) with LoRA, in place.

    Afterwards only the adapters train in the backbone: its base weights are frozen.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = model.lora_targets  # a regex (str) or module names
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
    )
    inject_adapter_in_model(config, model.backbone)
    for name, param in model.backbone.named_parameters():
        param.requires_grad = "lora_" in name
    return model
