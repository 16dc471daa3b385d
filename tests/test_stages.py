"""Each stage of a step against its paper's formula, written out here (DESIGN §1).

Label smoothing (Szegedy et al. 2016), flooding (Ishida et al. 2020, Eq. 1), MixUp (Zhang et al. 2018,
Eq. 1), FGSM (Goodfellow et al. 2015, Eq. 3) and RMP's uniform draw from the L2 ball (AMP paper, Sec. 5.1).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from advreg.attacks import fgsm
from advreg.batch import Batch
from advreg.losses import cross_entropy, flood, make_loss
from advreg.perturb import RMP
from advreg.perturb.rmp import sample_ball
from advreg.transforms import FGSMExamples, MixUp, identity

K = 5  # classes


def log_softmax_by_hand(logits):
    """z - log Σ exp z, with the max shifted out; (B, K)."""
    top = logits.max(dim=1, keepdim=True).values
    return logits - top - (logits - top).exp().sum(dim=1, keepdim=True).log()


def smoothed_ce_by_hand(logits, dist, a):
    """-mean_i Σ_k ((1-a)·t_ik + a/K)·log softmax(z_i)_k (Szegedy et al., Sec. 7)."""
    t = (1 - a) * dist + a / logits.shape[1]
    return -(t * log_softmax_by_hand(logits)).sum(dim=1).mean()


def onehot_by_hand(y, k):
    out = torch.zeros(len(y), k, dtype=torch.float64)
    out[torch.arange(len(y)), y] = 1.0
    return out


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, K, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, K, (8,), generator=g)
    soft = torch.distributions.Dirichlet(torch.ones(K, dtype=torch.float64)).sample((8,))  # (B, K)
    return logits, y, soft


# -- 0. the batch between the stages ---------------------------------------------------------------
def test_the_batch_holds_one_row_per_sample_and_clean_inputs_of_the_inputs_shape():
    x, y = torch.randn(4, 3), torch.arange(4)
    batch = identity(None, x, y, K)
    assert batch.inputs is x and batch.target is y and batch.clean is None
    with pytest.raises(ValueError, match="one row per sample, got 4 inputs and 3 targets"):
        Batch(x, y[:3])
    with pytest.raises(ValueError, match=r"clean inputs must have the inputs' shape \(4, 3\), got \(8, 3\)"):
        Batch(x, y, clean=torch.cat([x, x]))


# -- 1. label smoothing ------------------------------------------------------------------------
def test_label_smoothing_hard_targets_matches_the_formula(batch):
    logits, y, _ = batch
    expected = smoothed_ce_by_hand(logits, onehot_by_hand(y, K), 0.2)
    torch.testing.assert_close(cross_entropy(logits, y, 0.2), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(make_loss(smoothing=0.2)(logits, y), expected, rtol=1e-12, atol=1e-12)
    assert not torch.isclose(cross_entropy(logits, y, 0.0), expected)  # smoothing changes the loss


def test_label_smoothing_soft_targets_smooths_the_distribution(batch):
    logits, _, soft = batch
    expected = smoothed_ce_by_hand(logits, soft, 0.2)
    torch.testing.assert_close(cross_entropy(logits, soft, 0.2), expected, rtol=1e-12, atol=1e-12)
    unsmoothed = -(soft * log_softmax_by_hand(logits)).sum(dim=1).mean()
    torch.testing.assert_close(cross_entropy(logits, soft, 0.0), unsmoothed, rtol=1e-12, atol=1e-12)
    assert not torch.isclose(unsmoothed, expected)


def test_label_smoothing_gradient_is_softmax_minus_smoothed_target(batch):
    logits, y, _ = batch
    logits = logits.clone().requires_grad_(True)
    cross_entropy(logits, y, 0.2).backward()
    p = log_softmax_by_hand(logits.detach()).exp()
    t = 0.8 * onehot_by_hand(y, K) + 0.2 / K
    torch.testing.assert_close(logits.grad, (p - t) / len(y), rtol=1e-10, atol=1e-12)


def test_zero_smoothing_with_onehot_soft_targets_is_plain_cross_entropy(batch):
    logits, y, _ = batch
    torch.testing.assert_close(
        cross_entropy(logits, onehot_by_hand(y, K), 0.0), F.cross_entropy(logits, y), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(cross_entropy(logits, y, 0.0), F.cross_entropy(logits, y), rtol=0, atol=0)


def test_soft_targets_of_the_wrong_shape_and_bad_smoothing_are_value_errors(batch):
    logits, _, soft = batch
    with pytest.raises(ValueError, match="shape"):
        cross_entropy(logits, soft[:, :3])
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="smoothing"):
            make_loss(smoothing=bad)
    with pytest.raises(ValueError, match="flooding"):
        make_loss(flooding=-0.01)


# -- 2. flooding --------------------------------------------------------------------------------
def _loss_and_grads(model, x, y, level):
    model.zero_grad(set_to_none=True)
    raw = F.cross_entropy(model(x), y)
    loss = raw if level is None else flood(raw, level)
    loss.backward()
    return raw.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("side", ["above", "below"])
def test_flooding_value_and_gradient_sign(side):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    J, _, grad_J = _loss_and_grads(model, x, y, None)
    b = J.item() / 2 if side == "above" else J.item() + 0.5  # J > b, or J < b
    _, flooded, grad_flooded = _loss_and_grads(model, x, y, b)
    torch.testing.assert_close(flooded, (J - b).abs() + b, rtol=0, atol=1e-15)
    sign = 1.0 if side == "above" else -1.0  # below the flood level the gradient ascends
    for gf, gj in zip(grad_flooded, grad_J):
        assert torch.equal(gf, sign * gj)
    if side == "below":
        torch.testing.assert_close(flooded, 2 * b - J, rtol=0, atol=1e-15)


def test_flooding_through_make_loss_and_level_zero_is_the_loss(batch):
    logits, y, _ = batch
    J = F.cross_entropy(logits, y)
    b = J.item() + 0.3
    torch.testing.assert_close(make_loss(flooding=b)(logits, y), 2 * b - J, rtol=0, atol=1e-14)
    torch.testing.assert_close(
        make_loss(smoothing=0.2, flooding=b)(logits, y),
        2 * b - smoothed_ce_by_hand(logits, onehot_by_hand(y, K), 0.2),
        rtol=0,
        atol=1e-12,
    )
    assert torch.equal(flood(J, 0.0), J)


# -- 3. MixUp -----------------------------------------------------------------------------------
def _recover(x_mixed, batch_size):
    """λ and the partner permutation from a mix of x = [I_B | rest]: row i's identity part is λe_i + (1-λ)e_j."""
    eye_part = x_mixed[:, :batch_size]
    diag = eye_part.diagonal()
    lam = diag.min()  # rows with a partner j != i hold λ on the diagonal, fixed points hold 1
    off = eye_part - torch.diag(diag)
    partner = torch.where(off.sum(dim=1) > 0, off.argmax(dim=1), torch.arange(batch_size))
    return lam, partner


def test_mixup_mixes_inputs_and_targets_with_one_lambda_and_a_permutation():
    torch.manual_seed(1)
    B = 8
    x = torch.cat([torch.eye(B, dtype=torch.float64), torch.randn(B, 6, dtype=torch.float64)], dim=1)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    model = nn.Linear(x.shape[1], K).double()
    batch = MixUp(1.0)(model, x, y, K)
    x_mixed, target = batch.inputs, batch.target

    lam, partner = _recover(x_mixed, B)
    assert 0 < lam < 1 and sorted(partner.tolist()) == list(range(B)) and not torch.equal(partner, torch.arange(B))
    torch.testing.assert_close(x_mixed, lam * x + (1 - lam) * x[partner], rtol=0, atol=1e-15)
    torch.testing.assert_close(
        target, lam * onehot_by_hand(y, K) + (1 - lam) * onehot_by_hand(y[partner], K), rtol=0, atol=1e-15
    )
    torch.testing.assert_close(target.sum(dim=1), torch.ones(B, dtype=torch.float64), rtol=0, atol=1e-15)

    logits = model(x_mixed)
    mixed_ce = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[partner])
    torch.testing.assert_close(cross_entropy(logits, target), mixed_ce, rtol=1e-12, atol=1e-12)


def test_mixup_uses_the_seeded_global_rng():
    x, y = torch.randn(16, 3), torch.randint(0, K, (16,))
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(MixUp(0.4)(None, x, y, K))
    assert torch.equal(outs[0].inputs, outs[1].inputs) and torch.equal(outs[0].target, outs[1].target)
    assert not torch.equal(MixUp(0.4)(None, x, y, K).inputs, outs[0].inputs)  # the next draw differs


def _lambdas(alpha, n, seed=0):
    torch.manual_seed(seed)
    B = 8  # the identity permutation (λ unrecoverable) has probability 1/8!
    x, y = torch.eye(B, dtype=torch.float64), torch.arange(B) % K
    mix = MixUp(alpha)
    return [_recover(mix(None, x, y, K).inputs, B)[0].item() for _ in range(n)]


def test_mixup_lambda_is_uniform_for_alpha_one():
    lams = _lambdas(1.0, 2000)
    assert stats.kstest(lams, "uniform").pvalue > 0.01


def test_mixup_lambda_is_beta_for_alpha_0_4():
    lams = _lambdas(0.4, 2000)
    assert stats.kstest(lams, stats.beta(0.4, 0.4).cdf).pvalue > 0.01
    assert stats.kstest(lams, "uniform").pvalue < 1e-3  # the test tells Beta(0.4, 0.4) from U(0, 1)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_mixup_rejects_a_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        MixUp(alpha)


# -- 4. FGSM ------------------------------------------------------------------------------------
def _linear_with_dropout(d, k):
    torch.manual_seed(3)
    # dropout after the linear layer: the gradient by hand holds only if the attack runs in eval mode
    return nn.Sequential(nn.Linear(d, k), nn.Dropout(0.5)).double()


def _fgsm_by_hand(linear, x, y, eps, lo, hi):
    W, b = linear.weight.detach(), linear.bias.detach()
    p = torch.softmax(x @ W.T + b, dim=1)  # (B, K)
    grad_x = (p - onehot_by_hand(y, W.shape[0])) @ W  # (B, D): Wᵀ(softmax - onehot) per sample, /B dropped
    return (x + eps * grad_x.sign()).clamp(lo, hi), grad_x


def test_fgsm_on_a_linear_model_matches_the_gradient_by_hand():
    model = _linear_with_dropout(6, K)
    model.train()
    x = torch.rand(20, 6, dtype=torch.float64)
    y = torch.randint(0, K, (20,))
    eps, lo, hi = 0.1, 0.0, 1.0
    expected, grad_x = _fgsm_by_hand(model[0], x, y, eps, lo, hi)
    assert (grad_x != 0).all()
    unclipped = x + eps * grad_x.sign()
    assert ((unclipped < lo) | (unclipped > hi)).any()  # the clip is exercised

    x_before = x.clone()
    out = fgsm(model, x, y, eps, box=(lo, hi))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    assert model.training  # train stays train
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(x, x_before) and not out.requires_grad

    model.eval()
    fgsm(model, x, y, eps, box=(lo, hi))
    assert not model.training  # eval stays eval


def test_fgsm_examples_epsilon_is_pixel_levels_of_the_input_range():
    lo, hi = -0.5, 2.0
    examples = FGSMExamples(pixels=1, input_range=(lo, hi))
    assert examples.eps == pytest.approx((hi - lo) / 255, rel=1e-15)
    assert FGSMExamples(pixels=3, input_range=(lo, hi)).eps == pytest.approx(3 * (hi - lo) / 255, rel=1e-15)

    model = _linear_with_dropout(6, K)
    x = lo + (hi - lo) * torch.rand(12, 6, dtype=torch.float64)
    y = torch.randint(0, K, (12,))
    batch = examples(model, x, y, K)
    expected, _ = _fgsm_by_hand(model[0], x, y, (hi - lo) / 255, lo, hi)
    torch.testing.assert_close(batch.inputs, expected, rtol=0, atol=1e-15)
    assert batch.target is y and batch.clean is None
    with pytest.raises(ValueError, match="pixels"):
        FGSMExamples(pixels=-1, input_range=(0.0, 1.0))


# -- 5. RMP: uniform in the L2 ball of all weights together ---------------------------------------
SHAPES = {3: [(2,), (1,)], 50: [(5, 6), (20,)]}
N_DRAWS = 4000


def _draws(d, radius, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    like = [torch.zeros(s, dtype=dtype) for s in SHAPES[d]]
    assert sum(t.numel() for t in like) == d
    return torch.stack(
        [torch.cat([t.flatten() for t in sample_ball(like, radius)]).double() for _ in range(N_DRAWS)]
    )  # (n, d)


@pytest.mark.parametrize("d", [3, 50])
def test_sample_ball_is_inside_the_ball_with_norm_radius_u_to_the_one_over_d(d):
    radius = 0.1
    samples = _draws(d, radius)
    norms = samples.norm(dim=1)
    assert (norms <= radius * (1 + 1e-6)).all()  # float32 rounding only
    assert stats.kstest(((norms / radius) ** d).numpy(), "uniform").pvalue > 0.01
    assert stats.kstest((norms / radius).numpy(), "uniform").pvalue < 1e-3  # ‖Δ‖ = ε·U would be told apart


def test_sample_ball_direction_is_isotropic():
    samples = _draws(3, 0.1)
    unit = samples / samples.norm(dim=1, keepdim=True)  # (n, 3)
    assert (unit.mean(dim=0).abs() < 0.05).all()
    torch.testing.assert_close(unit.T @ unit / N_DRAWS, torch.eye(3, dtype=torch.float64) / 3, rtol=0, atol=0.03)
    # Archimedes: on the sphere S², every coordinate, and any fixed projection, is uniform on [-1, 1]
    probe = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64) / 3
    for projection in (unit[:, 0], unit[:, 1], unit[:, 2], unit @ probe):
        assert stats.kstest(projection.numpy(), stats.uniform(-1, 2).cdf).pvalue > 0.01


def test_sample_ball_draws_over_all_tensors_together_and_with_the_like_dtype():
    torch.manual_seed(0)
    like = [torch.zeros(4, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)]
    delta = sample_ball(like, 2.0)
    assert [t.shape for t in delta] == [t.shape for t in like] and all(t.dtype == torch.float64 for t in delta)
    assert all((t != 0).all() for t in delta)
    assert torch.cat([t.flatten() for t in delta]).norm() <= 2.0


class _Recorder:
    """A closure that records, at every call, the weights it sees, their gradient and the loss."""

    def __init__(self, model, opt, x, y, loss_fn=F.cross_entropy):
        self.model, self.opt, self.x, self.y, self.loss_fn = model, opt, x, y, loss_fn
        self.calls, self.seen, self.grads, self.losses = 0, [], [], []

    def __call__(self):
        self.calls += 1
        self.seen.append([p.detach().clone() for p in self.model.parameters()])
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        self.grads.append([p.grad.clone() for p in self.model.parameters()])
        self.losses.append(loss.detach())
        return loss


def _distance(a, b):
    return torch.cat([(u - v).double().flatten() for u, v in zip(a, b)]).norm().item()


@pytest.mark.parametrize("d", [3, 50])
def test_rmp_optimizer_one_closure_call_at_distance_within_epsilon_and_theta_restored(d):
    torch.manual_seed(0)
    fan_in, fan_out = {3: (2, 1), 50: (4, 10)}[d]
    model = nn.Linear(fan_in, fan_out)  # d weights and biases
    assert sum(p.numel() for p in model.parameters()) == d
    eps, steps = 0.1, 1500
    opt = RMP(model.parameters(), torch.optim.SGD, epsilon=eps, lr=0.0, momentum=0.0)
    closure = _Recorder(model, opt, torch.randn(8, fan_in), torch.randn(8, fan_out), F.mse_loss)
    distances = []
    for step in range(steps):
        theta = [p.detach().clone() for p in model.parameters()]
        returned = opt.step(closure)
        assert closure.calls == step + 1  # one pass per step
        distances.append(_distance(closure.seen[-1], theta))
        assert distances[-1] <= eps * (1 + 1e-5)
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))  # back to θ, bit for bit
        assert torch.equal(returned.detach(), closure.losses[-1])  # the loss at θ+Δ
    assert min(distances) > 0
    u = [(r / eps) ** d for r in distances]
    assert stats.kstest(u, "uniform").pvalue > 0.01


def test_rmp_step_applies_the_gradient_at_theta_plus_delta_to_theta():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = RMP(model.parameters(), torch.optim.SGD, epsilon=0.5, lr=0.1, momentum=0.0)
    x, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    closure = _Recorder(model, opt, x, y)
    for _ in range(3):
        theta = [p.detach().clone() for p in model.parameters()]
        opt.step(closure)
        assert _distance(closure.seen[-1], theta) > 0
        expected = [t.add(g, alpha=-0.1) for t, g in zip(theta, closure.grads[-1])]
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))


def test_rmp_with_epsilon_zero_is_the_base_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = RMP(model.parameters(), torch.optim.SGD, epsilon=0.0, lr=0.1)
    closure = _Recorder(model, opt, torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    theta = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert closure.calls == 1 and all(torch.equal(s, t) for s, t in zip(closure.seen[0], theta))
    with pytest.raises(ValueError, match="epsilon"):
        RMP(model.parameters(), torch.optim.SGD, epsilon=-0.1, lr=0.1)
    assert not math.isnan(closure.losses[0].item())
