import math

import pytest
import torch

from cellseg.training.losses import (
    CLASS_WEIGHTS,
    cross_entropy,
    dice_loss,
    hovernet_loss,
    hv_gradients,
    hv_loss,
)


def test_cross_entropy_of_uniform_logits_is_log_2_and_ignores_masked_pixels():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 0] = 50.0  # confidently wrong, but ignored
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    valid[0, 0, 0] = False
    assert cross_entropy(logits, target, valid).item() == pytest.approx(math.log(2))


def test_class_weighted_cross_entropy_by_hand():
    # Two pixels, uniform logits over 4 classes (ce = ln 4 each): background and a platelet.
    logits = torch.zeros(1, 4, 1, 2)
    target = torch.tensor([[[0, 3]]])
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    weights = torch.tensor(CLASS_WEIGHTS)
    expected = (0.05 * math.log(4) + 8.0 * math.log(4)) / (0.05 + 8.0)
    assert cross_entropy(logits, target, valid, weights).item() == pytest.approx(expected)
    # A confident mistake (logit 5 on a wrong class) costs ce = ln(e^5 + 3) on its pixel; its
    # excess over the uniform case is weighted 8.0 on a platelet and 0.05 on background: 160x.
    wrong = math.log(math.exp(5) + 3)
    platelet_wrong, background_wrong = logits.clone(), logits.clone()
    platelet_wrong[0, 0, 0, 1] = 5.0  # the platelet pixel predicted background
    background_wrong[0, 3, 0, 0] = 5.0  # the background pixel predicted platelet
    cost_p = cross_entropy(platelet_wrong, target, valid, weights).item() - expected
    cost_b = cross_entropy(background_wrong, target, valid, weights).item() - expected
    assert cost_p == pytest.approx(8.0 * (wrong - math.log(4)) / 8.05)
    assert cost_b == pytest.approx(0.05 * (wrong - math.log(4)) / 8.05)
    assert cost_p / cost_b == pytest.approx(160)


def test_dice_loss_is_zero_for_a_perfect_and_one_per_class_for_a_disjoint_prediction():
    target = torch.tensor([[[0, 1], [1, 0]]])
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 100
    assert dice_loss(perfect, target, valid).item() == pytest.approx(0, abs=1e-4)
    assert dice_loss(-perfect, target, valid).item() == pytest.approx(2, abs=1e-3)  # 2 classes


def _logits(probs: list[list[float]]) -> torch.Tensor:
    """(1, C, 1, W) logits whose softmax over C is ``probs`` (C lists of W values)."""
    return torch.tensor(probs).log().reshape(1, len(probs), 1, -1)


def test_dice_is_summed_over_the_batch_and_classes_by_hand():
    # two images of two pixels: image 0 all background, image 1 background + cell
    logits = torch.cat([_logits([[0.9, 0.7], [0.1, 0.3]]), _logits([[0.8, 0.4], [0.2, 0.6]])])
    target = torch.tensor([[[0, 0]], [[0, 1]]])
    valid = torch.ones(2, 1, 2, dtype=torch.bool)
    s = 1e-3
    # background: sum p·t = 0.9 + 0.7 + 0.8, sum p = 0.9 + 0.7 + 0.8 + 0.4, sum t = 3
    bg = 1 - (2 * 2.4 + s) / (2.8 + 3 + s)
    # cell: sum p·t = 0.6, sum p = 0.1 + 0.3 + 0.2 + 0.6, sum t = 1
    cell = 1 - (2 * 0.6 + s) / (1.2 + 1 + s)
    assert dice_loss(logits, target, valid).item() == pytest.approx(bg + cell, rel=1e-5)


def test_a_class_absent_from_the_batch_adds_nothing_to_dice():
    logits = _logits([[0.5, 0.2], [0.3, 0.6], [0.2, 0.2]])  # class 2 predicted, never true
    target = torch.tensor([[[0, 1]]])
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    s = 1e-3
    c0 = 1 - (2 * 0.5 + s) / (0.7 + 1 + s)
    c1 = 1 - (2 * 0.6 + s) / (0.9 + 1 + s)
    assert dice_loss(logits, target, valid).item() == pytest.approx(c0 + c1, rel=1e-5)
    # an ignored pixel's class is absent too
    valid[0, 0, 1] = False
    c0 = 1 - (2 * 0.5 + s) / (0.5 + 1 + s)
    assert dice_loss(logits, target, valid).item() == pytest.approx(c0, rel=1e-5)


def test_msge_is_averaged_over_the_batch_cell_pixels_by_hand():
    # the h-map off by a ramp of slope a: inside, its HoVer-Net gradient is off by 12·a (the
    # 5x5 kernel's sum of h²/(h²+v²) is 12), the v-map's by 0: mean over the two, (12a)²/2
    a = 0.1
    x = torch.arange(12, dtype=torch.float32).repeat(12, 1)
    target = torch.zeros(2, 2, 12, 12)
    pred = target.clone()
    pred[:, 0] = a * x
    cells = torch.zeros(2, 12, 12, dtype=torch.bool)
    cells[0, 3:9, 3:9] = True  # image 1 holds no cell: it must not dilute the average
    valid = torch.ones(2, 12, 12, dtype=torch.bool)
    _, msge = hv_loss(pred, target, cells, valid)
    assert msge.item() == pytest.approx((12 * a) ** 2 / 2, rel=1e-5)


def test_hv_terms_are_fp32_under_bf16_autocast():
    outputs, np_t, hv_t, _, ignore = _batch(3)
    cells = np_t > 0
    plain = hv_loss(outputs["hv"], hv_t, cells, ~ignore)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = hv_loss(outputs["hv"], hv_t, cells, ~ignore)
    for p, m in zip(plain, mixed, strict=True):
        assert m.dtype == torch.float32 and m.mean().item() == p.mean().item()


def test_hv_gradients_of_a_ramp_are_constant_inside_and_run_on_the_inputs_device():
    x = torch.arange(12, dtype=torch.float32).repeat(12, 1)  # h-map rising along x
    hv = torch.stack([x, torch.zeros_like(x)]).unsqueeze(0)
    grad = hv_gradients(hv)
    inner = grad[0, 0, 2:-2, 2:-2]
    assert torch.allclose(inner, inner[0, 0].expand_as(inner)) and inner[0, 0] > 0
    assert torch.all(grad[0, 1] == 0)
    assert grad.device == hv.device


def _batch(seed: int, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "np": torch.randn(b, 2, 16, 16, generator=g),
        "hv": torch.randn(b, 2, 16, 16, generator=g),
        "nc": torch.randn(b, 4, 16, 16, generator=g),
    }
    nc = torch.randint(0, 4, (b, 16, 16), generator=g)
    hv = torch.rand(b, 2, 16, 16, generator=g) * 2 - 1
    ignore = torch.rand(b, 16, 16, generator=g) < 0.2
    return outputs, (nc > 0).long(), hv, nc, ignore


def test_total_is_1_np_plus_2_hv_plus_2_nc():
    terms = hovernet_loss(*_batch(0))
    assert terms["total"].item() == pytest.approx(
        terms["np"].item() + 2 * terms["hv"].item() + 2 * terms["nc"].item()
    )
    assert terms["np"].item() == pytest.approx(terms["np_ce"].item() + terms["np_dice"].item())


def test_a_batch_split_over_ranks_with_summed_statistics_gives_the_whole_batch_terms():
    # what DDP does through global_sum: rank 1 holds images 2-3; rank 0 sees their sums too
    outputs, np_t, hv_t, nc_t, ignore = _batch(1, b=4)
    whole = hovernet_loss(outputs, np_t, hv_t, nc_t, ignore)
    parts = [(slice(0, 2), []), (slice(2, 4), [])]

    def part(s, total):
        return hovernet_loss(
            {k: v[s] for k, v in outputs.items()}, np_t[s], hv_t[s], nc_t[s], ignore[s], total
        )

    def record(x):
        parts[1][1].append(x.detach())
        return x

    other = part(parts[1][0], record)
    pending = iter(parts[1][1])
    mine = part(parts[0][0], lambda x: x + next(pending))
    for term in ("np_dice", "nc_dice", "hv_msge"):  # batch-level: the global batch's value
        assert mine[term].item() == pytest.approx(whole[term].item(), rel=1e-5), term
    for term in ("np_ce", "nc_ce", "hv_mse"):  # per-image means: DDP averages the ranks'
        mean = (mine[term].item() + other[term].item()) / 2
        assert mean == pytest.approx(whole[term].item(), rel=1e-5), term


def test_ignored_pixels_change_no_term():
    outputs, np_t, hv_t, nc_t, ignore = _batch(2)
    base = hovernet_loss(outputs, np_t, hv_t, nc_t, ignore)
    changed = {k: v.clone() for k, v in outputs.items()}
    for v in changed.values():
        v.permute(0, 2, 3, 1)[ignore] = 123.0  # garbage wherever ignore is set
    hv_t2 = hv_t.clone()
    hv_t2.permute(0, 2, 3, 1)[ignore] = -5.0
    # MSGE looks at a 5x5 neighbourhood: compare only the pixel-wise terms exactly
    after = hovernet_loss(changed, np_t, hv_t2, nc_t, ignore)
    for term in ("np_ce", "np_dice", "nc_ce", "nc_dice", "hv_mse"):
        assert after[term].item() == pytest.approx(base[term].item(), rel=1e-5), term
