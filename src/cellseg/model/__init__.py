"""Stage 2, the network: timm ViT backbone + HoVer decoder (``factory.create_model``), LoRA, and
the checkpoint format (``checkpoint``, importable without torch for file names and lookup)."""
