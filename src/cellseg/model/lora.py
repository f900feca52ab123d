"""Phase 2: LoRA adapters (peft) on the backbone's attention ``qkv`` projections."""

from __future__ import annotations

from torch import nn


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    """Wrap every ``qkv`` Linear of ``model.backbone`` with LoRA, in place.

    Afterwards only the adapters train in the backbone: its base weights are frozen.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=["qkv"])
    inject_adapter_in_model(config, model.backbone)
    for name, param in model.backbone.named_parameters():
        param.requires_grad = "lora_" in name
    return model
