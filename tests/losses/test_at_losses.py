"""TRADES (AWP paper Eq. 2) and MART (Eq. 3) on logits: values against per-sample loops over samples and classes
in math.log, gradients against finite differences (the clean side of the KL and MART's (1 − p_y(x)) weight
included), the max over wrong classes when the label is the top class, the reference codes' expressions, errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from advreg.losses.mart import mart_loss, top_wrong_prob
from advreg.losses.trades import trades_loss

DT = torch.float64


def batch(seed: int, b: int = 6, k: int = 5, scale: float = 2.0):
    """Random clean and adversarial logits (B, K) in float64 and labels (B,); half the labels are the adversarial
    argmax, so MART's max over k ≠ y must skip the top class for those."""
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(b, k, generator=gen, dtype=DT)
    logits_adv = logits + scale * torch.randn(b, k, generator=gen, dtype=DT)
    target = torch.randint(0, k, (b,), generator=gen)
    target[::2] = logits_adv[::2].argmax(dim=1)
    return logits, logits_adv, target


def softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(z - m) for z in row]
    return [v / sum(e) for v in e]


def trades_loop(logits, logits_adv, target, beta: float) -> float:
    """(1/B) Σ_i [−log p_y(x_i) + β Σ_k p_k(x_i)(log p_k(x_i) − log p_k(x'_i))]."""
    total = 0.0
    for row, row_adv, y in zip(logits.tolist(), logits_adv.tolist(), target.tolist()):
        p, q = softmax_row(row), softmax_row(row_adv)
        kl = sum(p[k] * (math.log(p[k]) - math.log(q[k])) for k in range(len(p)))
        total += -math.log(p[y]) + beta * kl
    return total / len(target)


def mart_loop(logits, logits_adv, target, beta: float, exact: bool = True) -> float:
    """(1/B) Σ_i [−log p'_y − log(1 − max_{k≠y} p'_k) + β·KL(p ‖ p')·(1 − p_y)]; ``exact``: with the MART
    reference code's constants (1.0001 and 1e-12 in the BCE, 1e-12 in the KL, 1.0000001 in the weight)."""
    a, eps, w = (1.0001, 1e-12, 1.0000001) if exact else (1.0, 0.0, 1.0)
    total = 0.0
    for row, row_adv, y in zip(logits.tolist(), logits_adv.tolist(), target.tolist()):
        p, q = softmax_row(row), softmax_row(row_adv)
        top_wrong = max(q[k] for k in range(len(q)) if k != y)
        bce = -math.log(q[y]) - math.log(a - top_wrong + eps)
        kl = sum(p[k] * (math.log(p[k]) - math.log(q[k] + eps)) for k in range(len(p)))
        total += bce + beta * kl * (w - p[y])
    return total / len(target)


# --- TRADES -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trades_matches_loop(seed, beta):
    logits, logits_adv, target = batch(seed)
    got = trades_loss(logits, logits_adv, target, beta).item()
    assert got == pytest.approx(trades_loop(logits, logits_adv, target, beta), rel=1e-12, abs=1e-12)


def test_trades_is_ce_when_adversarial_logits_equal_clean():
    logits, _, target = batch(3)
    for beta in (1.0, 6.0):
        got = trades_loss(logits, logits.clone(), target, beta).item()
        assert got == pytest.approx(trades_loop(logits, logits, target, 0.0), rel=1e-12)
        assert got == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-12)


def test_trades_kl_term_is_nonnegative_per_sample():
    for seed in range(5):
        logits, logits_adv, target = batch(seed, scale=4.0)
        for i in range(len(target)):
            one = (logits[i : i + 1], logits_adv[i : i + 1], target[i : i + 1])
            assert trades_loss(*one, beta=1.0).item() - trades_loss(*one, beta=0.0).item() >= 0.0


def test_trades_default_beta_is_6():
    logits, logits_adv, target = batch(4)
    assert trades_loss(logits, logits_adv, target).item() == pytest.approx(
        trades_loop(logits, logits_adv, target, 6.0), rel=1e-12
    )


def test_trades_gradcheck_both_logits():
    logits, logits_adv, target = batch(5)
    args = (logits.requires_grad_(), logits_adv.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: trades_loss(a, b, target, 6.0), args)


def central_differences(fn, logits, h=1e-6):
    """∂fn/∂logits (B, K) by central differences of a scalar function, one entry at a time."""
    fd = torch.zeros_like(logits)
    for i in range(logits.shape[0]):
        for k in range(logits.shape[1]):
            up, down = logits.clone(), logits.clone()
            up[i, k] += h
            down[i, k] -= h
            fd[i, k] = (fn(up) - fn(down)) / (2 * h)
    return fd


def test_trades_clean_gradient_includes_the_kl():
    """Autograd on the clean logits against central differences of the loop; and it is not the gradient with
    p(x) detached in the KL (which is the CE gradient alone), so detaching would be caught."""
    logits, logits_adv, target = batch(6)
    x = logits.clone().requires_grad_()
    trades_loss(x, logits_adv, target, 6.0).backward()
    fd = central_differences(lambda z: trades_loop(z, logits_adv, target, 6.0), logits)
    torch.testing.assert_close(x.grad, fd, rtol=1e-6, atol=1e-8)
    y = logits.clone().requires_grad_()
    F.cross_entropy(y, target).backward()  # p(x) detached in the KL leaves only the CE's gradient on x
    assert (x.grad - y.grad).abs().max() > 0.1


def test_trades_matches_the_reference_code_expression_and_gradients():
    """TRADES code: CE(nat) + β·(1/B)·KLDivLoss(sum)(log_softmax(adv), softmax(nat)), both sides differentiated."""
    logits, logits_adv, target = batch(7)
    a1, b1 = logits.clone().requires_grad_(), logits_adv.clone().requires_grad_()
    a2, b2 = logits.clone().requires_grad_(), logits_adv.clone().requires_grad_()
    ours = trades_loss(a1, b1, target, 6.0)
    ref = F.cross_entropy(a2, target) + 6.0 / len(target) * F.kl_div(
        F.log_softmax(b2, dim=1), F.softmax(a2, dim=1), reduction="sum"
    )
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


# --- MART -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mart_matches_loop_with_reference_constants(seed, beta):
    logits, logits_adv, target = batch(seed)
    got = mart_loss(logits, logits_adv, target, beta).item()
    assert got == pytest.approx(mart_loop(logits, logits_adv, target, beta), rel=1e-12, abs=1e-12)


def test_mart_is_the_plain_formula_up_to_the_constants():
    """The plain Eq. 3 (no 1.0001 / 1e-12 / 1.0000001) agrees to 1e-3 relative on moderate logits."""
    for seed in range(3):
        logits, logits_adv, target = batch(seed)
        got = mart_loss(logits, logits_adv, target, 6.0).item()
        assert got == pytest.approx(mart_loop(logits, logits_adv, target, 6.0, exact=False), rel=1e-3)


def test_mart_default_beta_is_6():
    logits, logits_adv, target = batch(4)
    assert mart_loss(logits, logits_adv, target).item() == pytest.approx(
        mart_loop(logits, logits_adv, target, 6.0), rel=1e-12
    )


def test_mart_wrong_class_max_skips_the_label_when_it_is_on_top():
    logits_adv = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0]], dtype=DT)
    q = F.softmax(logits_adv, dim=1)
    target = torch.tensor([0, 1])  # label is the top class (→ 2nd largest, class 2); label is not (→ class 0)
    torch.testing.assert_close(top_wrong_prob(q, target), torch.stack([q[0, 2], q[1, 0]]))
    logits = torch.zeros_like(logits_adv)
    for i in range(2):
        one = (logits[i : i + 1], logits_adv[i : i + 1], target[i : i + 1])
        got = mart_loss(*one, beta=0.0).item()
        assert got == pytest.approx(mart_loop(*one, 0.0), rel=1e-12)
        expected = -math.log(q[i, target[i]].item()) - math.log(1.0001 - q[i, 2 if i == 0 else 0].item() + 1e-12)
        assert got == pytest.approx(expected, rel=1e-12)


def test_mart_gradcheck_both_logits():
    logits, logits_adv, target = batch(8)
    args = (logits.requires_grad_(), logits_adv.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: mart_loss(a, b, target, 6.0), args)


def test_mart_clean_gradient_goes_through_the_weight():
    """Autograd on the clean logits against central differences of the loop, on a batch where the KL is large,
    so the (1 − p_y(x)) weight's gradient is a large part: detaching it would not pass."""
    logits, logits_adv, target = batch(9, scale=3.0)
    x = logits.clone().requires_grad_()
    mart_loss(x, logits_adv, target, 6.0).backward()
    fd = central_differences(lambda z: mart_loop(z, logits_adv, target, 6.0), logits)
    torch.testing.assert_close(x.grad, fd, rtol=1e-6, atol=1e-8)
    # The weight's share of the gradient on x: β·KL_i·∂(−p_y(x_i))/∂x_i / B, with ∂p_y/∂z_k = p_y (1[k=y] − p_k).
    p, q = F.softmax(logits, dim=1), F.softmax(logits_adv, dim=1)
    kl = (p * (p.log() - q.log())).sum(dim=1)
    p_y = p.gather(1, target[:, None])
    weight_part = -6.0 * kl[:, None] * p_y * (F.one_hot(target, p.shape[1]) - p) / len(target)
    assert weight_part.abs().max() > 0.1


def test_mart_matches_the_reference_code_expression_and_gradients():
    """MART code: argsort's top two pick the runner-up class; CE + NLL(log(1.0001 − p' + 1e-12)) and the weighted
    KLDivLoss(log(p' + 1e-12), p) with weight (1.0000001 − p_y), nothing detached."""
    logits, logits_adv, target = batch(10)
    a1, b1 = logits.clone().requires_grad_(), logits_adv.clone().requires_grad_()
    a2, b2 = logits.clone().requires_grad_(), logits_adv.clone().requires_grad_()
    ours = mart_loss(a1, b1, target, 6.0)
    q = F.softmax(b2, dim=1)
    top2 = torch.argsort(q, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == target, top2[:, -2], top2[:, -1])
    p = F.softmax(a2, dim=1)
    kl = F.kl_div(torch.log(q + 1e-12), p, reduction="none").sum(dim=1)
    ref = (
        F.cross_entropy(b2, target)
        + F.nll_loss(torch.log(1.0001 - q + 1e-12), new_y)
        + 6.0 * (kl * (1.0000001 - p.gather(1, target[:, None]).squeeze(1))).mean()
    )
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


# --- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [trades_loss, mart_loss])
def test_bad_inputs_raise(loss):
    logits, logits_adv, target = batch(11, b=4, k=3)
    with pytest.raises(ValueError, match="logits"):
        loss(logits, logits_adv[:, :2], target)  # K differs
    with pytest.raises(ValueError, match="logits"):
        loss(logits, logits_adv[:3], target)  # B differs
    with pytest.raises(ValueError, match="logits"):
        loss(logits[0], logits_adv[0], target[:1])  # not (B, K)
    with pytest.raises(ValueError, match="target"):
        loss(logits, logits_adv, target[:, None])  # 2-D targets
    with pytest.raises(ValueError, match="target"):
        loss(logits, logits_adv, F.one_hot(target, 3).to(DT))  # soft targets
    with pytest.raises(ValueError, match="target"):
        loss(logits, logits_adv, target.to(DT))  # float class indices
    with pytest.raises(ValueError, match="target"):
        loss(logits, logits_adv, target[:3])  # B differs
    with pytest.raises(ValueError, match="beta"):
        loss(logits, logits_adv, target, beta=-1.0)
