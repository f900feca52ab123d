"""Stage 3, Phase 1 and Phase 2 training: config, targets, augmentation, losses, the loop, DDP."""
