"""HoVer-Net losses: NP = CE + Dice, HV = MSE + MSGE, NC = weighted CE + Dice.

Every term is averaged per image, then over the batch. That makes a batch's loss the mean of its
images' losses, so gradient accumulation and DDP (which average over micro-batches and ranks)
give the same update as one big batch. Pixels marked *ignore* (unlabelled cells) count in no term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLASS_WEIGHTS = (0.05, 0.5, 5.0, 8.0)  # background, RBC, WBC, Platelets
BRANCH_WEIGHTS = {"np": 1.0, "hv": 2.0, "nc": 2.0}
_EPS = 1e-6


def _per_image_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B, H, W) over ``valid`` pixels, per image -> (B,)."""
    valid = valid.to(values.dtype)
    return (values * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image (optionally class-weighted) cross-entropy over valid pixels -> (B,).

    With weights, each image's loss is sum(w_t * ce) / sum(w_t) over its pixels, as in
    ``F.cross_entropy(weight=...)``.
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    if class_weights is None:
        return _per_image_mean(ce, valid)
    w = class_weights.to(logits.device)[target] * valid
    return (ce * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(_EPS)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice, averaged over the classes present in the image or predicted -> (B,)."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    mask = valid.unsqueeze(1).to(probs.dtype)
    inter = (probs * onehot * mask).flatten(2).sum(2)
    total = ((probs + onehot) * mask).flatten(2).sum(2)
    dice = (2 * inter + _EPS) / (total + _EPS)  # an absent, unpredicted class scores 1
    return 1 - dice.mean(1)


def sobel_kernels(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """HoVer-Net's normalised Sobel-like kernels, shape (2, 1, size, size): d/dx, d/dy."""
    r = torch.arange(-(size // 2), size // 2 + 1, device=device, dtype=dtype)
    v, h = torch.meshgrid(r, r, indexing="ij")
    kernel_h = h / (h * h + v * v).clamp_min(1e-15)
    kernel_v = v / (h * h + v * v).clamp_min(1e-15)
    return torch.stack([kernel_h, kernel_v]).unsqueeze(1)


def hv_gradients(hv: torch.Tensor) -> torch.Tensor:
    """d(h-map)/dx and d(v-map)/dy, (B, 2, H, W); kernels built on the input's device."""
    k = sobel_kernels(5, hv.device, hv.dtype)
    return torch.cat(
        [F.conv2d(hv[:, :1], k[:1], padding=2), F.conv2d(hv[:, 1:], k[1:], padding=2)], dim=1
    )


def hv_loss(
    pred: torch.Tensor, target: torch.Tensor, cells: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE over valid pixels, MSGE over valid cell pixels), each (B,)."""
    pred = pred.float()
    mse = _per_image_mean(((pred - target) ** 2).mean(1), valid)
    grad_err = ((hv_gradients(pred) - hv_gradients(target)) ** 2).mean(1)
    msge = _per_image_mean(grad_err, valid & cells)
    return mse, msge


def hovernet_loss(
    outputs: dict[str, torch.Tensor],
    np_target: torch.Tensor,
    hv_target: torch.Tensor,
    nc_target: torch.Tensor,
    ignore: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """All terms (batch means) and ``total`` = 1·NP + 2·HV + 2·NC.

    Args:
        outputs: logits ``np`` (B, 2, H, W), ``hv`` (B, 2, H, W), ``nc`` (B, 4, H, W).
        np_target: (B, H, W) long, 1 on cell pixels.
        hv_target: (B, 2, H, W) float.
        nc_target: (B, H, W) long class ids.
        ignore: (B, H, W) bool, pixels no term may see.
    """
    valid = ~ignore
    weights = torch.tensor(CLASS_WEIGHTS, device=nc_target.device)
    terms = {
        "np_ce": cross_entropy(outputs["np"], np_target, valid),
        "np_dice": dice_loss(outputs["np"], np_target, valid),
        "nc_ce": cross_entropy(outputs["nc"], nc_target, valid, weights),
        "nc_dice": dice_loss(outputs["nc"], nc_target, valid),
    }
    terms["hv_mse"], terms["hv_msge"] = hv_loss(outputs["hv"], hv_target, np_target > 0, valid)
    terms = {k: v.mean() for k, v in terms.items()}
    terms["np"] = terms["np_ce"] + terms["np_dice"]
    terms["hv"] = terms["hv_mse"] + terms["hv_msge"]
    terms["nc"] = terms["nc_ce"] + terms["nc_dice"]
    terms["total"] = sum(BRANCH_WEIGHTS[b] * terms[b] for b in BRANCH_WEIGHTS)
    return terms
