"""HoVer-Net losses: NP = CE + Dice, HV = MSE + MSGE, NC = weighted CE + Dice.

As vqdang/hover_net computes them: the Dice terms sum 1 - Dice over the classes, each Dice
taken over the whole batch's pixels (a class absent from the batch's targets adds nothing), and
MSGE is averaged over the batch's cell pixels, so crops without cells do not dilute it. The
cross-entropy and MSE terms are averaged per image, then over the batch. The HV terms are
computed in fp32 outside autocast (bf16 Sobel gradients are too coarse).

The batch-level terms are ratios of sums over the batch. Under DDP each rank holds a part of
the batch, so those sums go through ``total`` (a sum over ranks, :func:`~cellseg.training.
distributed.global_sum`): every rank then sees the global batch's ratio, and DDP's averaged
gradient is that of one process on the global batch. Pixels marked *ignore* (void) count in no
term.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

CLASS_WEIGHTS = (0.05, 0.5, 5.0, 8.0)  # background, RBC, WBC, Platelets
BRANCH_WEIGHTS = {"np": 1.0, "hv": 2.0, "nc": 2.0}
DICE_SMOOTH = 1e-3  # HoVer-Net's
_EPS = 1e-6

Total = Callable[[torch.Tensor], torch.Tensor]


@functools.cache
def class_weight_tensor(device: torch.device) -> torch.Tensor:
    """:data:`CLASS_WEIGHTS` on ``device``, copied there once per process: a tensor built from
    Python numbers inside the step is a host-to-device copy, and the host waits for it."""
    return torch.tensor(CLASS_WEIGHTS, device=device)


def local_total(values: torch.Tensor) -> torch.Tensor:
    """One process holds the whole batch: its sums are the batch's."""
    return values


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
    w = class_weights[target] * valid
    return (ce * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(_EPS)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, total: Total = local_total
) -> torch.Tensor:
    """Sum over the classes in the batch's targets of 1 - soft Dice over the batch -> scalar.

    Dice of class c: (2·Σ p_c·t_c + s) / (Σ p_c + Σ t_c + s), sums over every valid pixel of
    the batch, s = ``DICE_SMOOTH``.
    """
    probs = logits.float().softmax(1)
    # a one-hot by comparison: F.one_hot reads the targets' range back to the host on every
    # device but CUDA, so the step would not measure sync-free on a CPU
    classes = torch.arange(probs.shape[1], device=target.device).view(1, -1, 1, 1)
    onehot = (target.unsqueeze(1) == classes).to(probs.dtype)
    mask = valid.unsqueeze(1).to(probs.dtype)
    inter = (probs * onehot * mask).sum((0, 2, 3))
    sizes = ((probs + onehot) * mask).sum((0, 2, 3))
    present = (onehot * mask).sum((0, 2, 3))
    inter, sizes, present = total(torch.stack([inter, sizes, present]))
    dice = (2 * inter + DICE_SMOOTH) / (sizes + DICE_SMOOTH)
    return ((1 - dice) * (present > 0)).sum()


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
    pred: torch.Tensor,
    target: torch.Tensor,
    cells: torch.Tensor,
    valid: torch.Tensor,
    total: Total = local_total,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE over valid pixels, per image then batch mean; MSGE over the batch's valid cell
    pixels), both scalars, in fp32 whatever autocast is active."""
    with torch.autocast(pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        mse = _per_image_mean(((pred - target) ** 2).mean(1), valid).mean()
        grad_err = ((hv_gradients(pred) - hv_gradients(target)) ** 2).mean(1)
        focus = (valid & cells).float()
        err_sum, n_cells = total(torch.stack([(grad_err * focus).sum(), focus.sum()]))
        return mse, err_sum / n_cells.clamp_min(1)


def hovernet_loss(
    outputs: dict[str, torch.Tensor],
    np_target: torch.Tensor,
    hv_target: torch.Tensor,
    nc_target: torch.Tensor,
    ignore: torch.Tensor,
    total: Total = local_total,
) -> dict[str, torch.Tensor]:
    """All terms (scalars) and ``total`` = 1·NP + 2·HV + 2·NC.

    Args:
        outputs: logits ``np`` (B, 2, H, W), ``hv`` (B, 2, H, W), ``nc`` (B, 4, H, W).
        np_target: (B, H, W) long, 1 on cell pixels.
        hv_target: (B, 2, H, W) float.
        nc_target: (B, H, W) long class ids.
        ignore: (B, H, W) bool, pixels no term may see.
        total: sums a tensor of batch statistics over the processes sharing the batch.
    """
    valid = ~ignore
    weights = class_weight_tensor(nc_target.device)
    terms = {
        "np_ce": cross_entropy(outputs["np"], np_target, valid).mean(),
        "np_dice": dice_loss(outputs["np"], np_target, valid, total),
        "nc_ce": cross_entropy(outputs["nc"], nc_target, valid, weights).mean(),
        "nc_dice": dice_loss(outputs["nc"], nc_target, valid, total),
    }
    terms["hv_mse"], terms["hv_msge"] = hv_loss(
        outputs["hv"], hv_target, np_target > 0, valid, total
    )
    terms["np"] = terms["np_ce"] + terms["np_dice"]
    terms["hv"] = terms["hv_mse"] + terms["hv_msge"]
    terms["nc"] = terms["nc_ce"] + terms["nc_dice"]
    terms["total"] = sum(BRANCH_WEIGHTS[b] * terms[b] for b in BRANCH_WEIGHTS)
    return terms
