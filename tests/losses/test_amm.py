"""AMM (Yan, Guo & Zhang; Deep Defense): DeepFool norms against the exact distance of affine classifiers, the
differentiable margin against finite differences, the ∇f-detached ablation against its closed form, MIN's selection
against a literal loop, the shrinkages and truncation against math, frozen dropout masks, sample independence
under BatchNorm, the errors, and the training integration (gradient clipping included).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advreg import cli
from advreg.attacks import deepfool, deepfool_with_source
from advreg.batch import Batch
from advreg.config import TrainConfig
from advreg.losses import AMMLoss, cross_entropy
from advreg.losses.amm import FrozenDropout, margin_terms, select_min, shrink, truncation
from advreg.methods import resolve
from advreg.stages import build_loss
from advreg.train import build_run, train_step

DT = torch.float64
SMALL = ["data.name=digits", "model.hidden=16", "optim.batch_size=64"]


def small_config(name: str, *settings: str) -> TrainConfig:
    return resolve(TrainConfig(method=name, epochs=1), SMALL + list(settings))


def affine(k: int, d: int = 5, seed: int = 0) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, k).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(k, d, generator=gen, dtype=DT))
        model.bias.copy_(torch.randn(k, generator=gen, dtype=DT))
    return model


def tanh_mlp(seed: int = 0, d: int = 5, hidden: int = 8, k: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k)).to(DT)


def pair_distance(weight, bias, x, a: int, b: int):
    """|f_a(x) − f_b(x)| / ‖w_a − w_b‖ of the affine f(x) = Wx + b: the distance to the a/b hyperplane."""
    return ((x @ (weight[a] - weight[b])) + bias[a] - bias[b]).abs() / (weight[a] - weight[b]).norm()


def nearest_boundary(weight, bias, x, source: int):
    """min over k ≠ s of the pair distance, by a loop: (distance, k)."""
    best = min(
        ((pair_distance(weight, bias, x, k, source), k) for k in range(len(weight)) if k != source),
        key=lambda t: t[0].item(),
    )
    return best


def finite_differences(fn, tensors, h: float = 1e-6):
    """Central differences of the float ``fn()`` in every entry of ``tensors`` (modified in place, restored)."""
    grads = []
    for t in tensors:
        g = torch.zeros_like(t)
        flat = t.data.view(-1)
        for j in range(flat.numel()):
            orig = flat[j].item()
            flat[j] = orig + h
            up = fn()
            flat[j] = orig - h
            down = fn()
            flat[j] = orig
            g.view(-1)[j] = (up - down) / (2 * h)
        grads.append(g)
    return grads


def global_norm(params) -> float:
    return math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in params if p.grad is not None))


# -- 1. DeepFool on an affine classifier is the exact distance ------------------------------------
@pytest.mark.parametrize("k", [3, 4])
def test_deepfool_norm_of_an_affine_classifier_is_the_exact_distance(k):
    model = affine(k, seed=k)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1), dtype=DT)
    pred = model(x).argmax(1)
    w, b = model.weight.detach(), model.bias.detach()
    exact = torch.stack([nearest_boundary(w, b, x[i], int(pred[i]))[0] for i in range(16)])
    nearest = [nearest_boundary(w, b, x[i], int(pred[i]))[1] for i in range(16)]
    _, norms0, _ = deepfool(model, x, steps=3, overshoot=0.0, labels=pred)
    torch.testing.assert_close(norms0, exact, rtol=1e-9, atol=1e-12)
    r, norms, success = deepfool(model, x, steps=3, overshoot=0.02, labels=pred)
    torch.testing.assert_close(norms, 1.02 * exact, rtol=1e-9, atol=1e-12)
    assert success.all()
    assert model(x + r).argmax(1).tolist() == nearest  # across the nearest boundary, not another one
    r_unlabeled, _, _ = deepfool(model, x, steps=3, overshoot=0.02)  # without labels: the same attack
    torch.testing.assert_close(r_unlabeled, r)


def test_deepfool_toward_the_label_of_a_misclassified_sample_is_the_two_class_distance():
    model = affine(2, seed=5)
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(2), dtype=DT)
    pred = model(x).argmax(1)
    labels = 1 - pred  # every sample misclassified
    w, b = model.weight.detach(), model.bias.detach()
    exact = torch.stack([pair_distance(w, b, x[i], int(labels[i]), int(pred[i])) for i in range(20)])
    _, norms0, _ = deepfool(model, x, steps=3, overshoot=0.0, labels=labels)
    torch.testing.assert_close(norms0, exact, rtol=1e-9, atol=1e-12)
    r, norms, success = deepfool(model, x, steps=3, overshoot=0.02, labels=labels)
    torch.testing.assert_close(norms, 1.02 * exact, rtol=1e-9, atol=1e-12)
    assert success.all() and torch.equal(model(x + r).argmax(1), labels)


def test_a_misclassified_sample_is_pushed_to_its_label_not_to_the_nearest_class():
    model = affine(4, seed=3)
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(3), dtype=DT)
    pred = model(x).argmax(1)
    w, b = model.weight.detach(), model.bias.detach()
    nearest = torch.tensor([nearest_boundary(w, b, x[i], int(pred[i]))[1] for i in range(30)])
    far = torch.tensor([next(c for c in range(4) if c not in (int(pred[i]), int(nearest[i]))) for i in range(30)])
    r, success, source = deepfool_with_source(model, x, steps=50, overshoot=0.02, labels=far)
    assert torch.equal(source, pred)
    reached = model(x + r).argmax(1)
    assert torch.equal(success, reached == far) and success.float().mean() > 0.9
    first_step = torch.stack([pair_distance(w, b, x[i], int(far[i]), int(pred[i])) for i in range(30)])
    _, norms1, _ = deepfool(model, x, steps=1, overshoot=0.0, labels=far)  # one step: the p/y hyperplane
    torch.testing.assert_close(norms1, first_step, rtol=1e-9, atol=1e-12)


def deepfool_by_hand(weight, bias, x, label, steps: int, overshoot: float):
    """DeepFool toward ``label`` on f(x) = Wx + b, one sample, written out: each step crosses the linearized
    boundary between the current prediction and the label; returns the perturbation and the steps taken."""
    total = torch.zeros_like(x)
    for taken in range(steps):
        f = weight @ (x + (1 + overshoot) * total) + bias
        current = int(f.argmax())
        if current == label:
            return (1 + overshoot) * total, taken
        w = weight[label] - weight[current]
        total = total + (f[label] - f[current]).abs() / w.pow(2).sum() * w
    return (1 + overshoot) * total, steps


def test_targeted_deepfool_of_an_affine_classifier_follows_the_current_prediction_step_by_step():
    model = affine(5, seed=4)
    x = 2 * torch.randn(40, 5, generator=torch.Generator().manual_seed(11), dtype=DT)
    pred = model(x).argmax(1)
    labels = (pred + 1 + torch.arange(40) % 4) % 5  # every sample misclassified, all targets used
    r, success, _ = deepfool_with_source(model, x, steps=10, overshoot=0.02, labels=labels)
    w, b = model.weight.detach(), model.bias.detach()
    taken = []
    for i in range(40):
        expected, n = deepfool_by_hand(w, b, x[i], int(labels[i]), 10, 0.02)
        torch.testing.assert_close(r[i], expected, rtol=1e-9, atol=1e-12)
        taken.append(n)
    taken = torch.tensor(taken)
    assert torch.equal(success, model(x + r).argmax(1) == labels) and torch.equal(success, taken < 10)
    assert success.sum() >= 30 and (taken[success] >= 2).any()  # some went through a third class on the way


# -- 2. the differentiable margin against finite differences --------------------------------------
@pytest.mark.parametrize("k", [2, 3, 4])
def test_margin_gradient_of_an_affine_classifier_matches_finite_differences_of_the_distance(k):
    model = affine(k, seed=10 + k)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(4), dtype=DT)
    pred = model(x).argmax(1)
    labels = 1 - pred if k == 2 else pred
    if k == 2:
        labels[::2] = pred[::2]  # half correct, half misclassified
    _, norms, success = deepfool(model, x, steps=3, overshoot=0.02, create_graph=True, labels=labels)
    assert success.all()
    grads = torch.autograd.grad(norms.sum(), [model.weight, model.bias])

    def closed_form() -> float:  # the same classes as at the unperturbed weights
        w, b = model.weight.detach(), model.bias.detach()
        if k == 2:
            return sum(pair_distance(w, b, x[i], 0, 1).item() for i in range(8))
        return sum(nearest_boundary(w, b, x[i], int(pred[i]))[0].item() for i in range(8))

    expected = finite_differences(closed_form, [model.weight, model.bias])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, 1.02 * e, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("steps", [1, 3])
def test_margin_gradient_of_a_tanh_mlp_matches_finite_differences_of_deepfool(steps):
    model = tanh_mlp()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(5), dtype=DT)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    params = list(model.parameters())
    pred = model(x).argmax(1)
    assert (pred == labels).any() and (pred != labels).any()
    _, norms, _ = deepfool(model, x, steps=steps, overshoot=0.02, create_graph=True, labels=labels)
    grads = torch.autograd.grad(norms.sum(), params)
    expected = finite_differences(
        lambda: deepfool(model, x, steps=steps, overshoot=0.02, labels=labels)[1].sum().item(), params
    )
    for g, e in zip(grads, expected):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_margin_gradient_over_the_top_candidates_matches_finite_differences():
    """Exact derivative: x + r is not detached inside ∇f (the authors' code detaches it, an approximation on smooth
    activations); two of five classes considered, misclassified samples by the two-class path."""
    model = tanh_mlp(seed=3, k=5)
    x = 2 * torch.randn(8, 5, generator=torch.Generator().manual_seed(12), dtype=DT)
    pred = model(x).argmax(1)
    labels = torch.where(torch.arange(8) % 2 == 0, pred, (pred + 2) % 5)
    params = list(model.parameters())
    _, norms, success = deepfool(model, x, steps=3, create_graph=True, labels=labels, candidates=2)
    assert success.sum() >= 4
    grads = torch.autograd.grad(norms.sum(), params)
    expected = finite_differences(
        lambda: deepfool(model, x, steps=3, labels=labels, candidates=2)[1].sum().item(), params
    )
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


# -- 3. the ablation with ∇f held constant ----------------------------------------------------------
def test_detached_ablation_on_an_affine_model_is_the_closed_form_with_a_constant_normalizer():
    k, o = 4, 0.02
    model = affine(k, seed=7)
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(6), dtype=DT)
    pred = model(x).argmax(1)
    w, b = model.weight.detach(), model.bias.detach()
    g_w_det, g_b_det = torch.zeros_like(w), torch.zeros_like(b)
    g_w_diff = torch.zeros_like(w)  # derivative of the 1/‖w_k − w_s‖ factor
    for i in range(10):
        s = int(pred[i])
        _, kk = nearest_boundary(w, b, x[i], s)
        f_diff = (w[kk] - w[s]) @ x[i] + b[kk] - b[s]
        norm = (w[kk] - w[s]).norm()
        sign = f_diff.sign()
        g_w_det[kk] += (1 + o) * sign * x[i] / norm
        g_w_det[s] -= (1 + o) * sign * x[i] / norm
        g_b_det[kk] += (1 + o) * sign / norm
        g_b_det[s] -= (1 + o) * sign / norm
        dfactor = -(1 + o) * f_diff.abs() * (w[kk] - w[s]) / norm**3  # ∂/∂w_k of |f_diff|·‖w_k − w_s‖⁻¹
        g_w_diff[kk] += dfactor
        g_w_diff[s] -= dfactor
    grads = {}
    for high_order in (True, False):
        _, norms, _ = deepfool(model, x, steps=3, overshoot=o, create_graph=True, labels=pred, high_order=high_order)
        grads[high_order] = torch.autograd.grad(norms.sum(), [model.weight, model.bias])
    torch.testing.assert_close(grads[False][0], g_w_det, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[False][1], g_b_det, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[True][0] - grads[False][0], g_w_diff, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=1e-9, atol=1e-12)  # ∇f does not hold b
    assert (grads[True][0] - grads[False][0]).abs().max() > 1e-2  # the ablation really drops a term


def test_detached_ablation_on_a_tanh_mlp_holds_the_input_gradient_constant():
    o = 0.02
    model = tanh_mlp(seed=1)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(7), dtype=DT)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    params = list(model.parameters())
    pred = model(x).argmax(1)
    total = 0.0
    for i in range(6):  # one step: (1+o)·|f_k − f_s|/C with C = ‖∇ₓ(f_k − f_s)‖ a constant
        xi = x[i : i + 1].clone().requires_grad_(True)
        logits = model(xi)[0]
        jac = torch.stack([torch.autograd.grad(logits[c], xi, retain_graph=True)[0][0] for c in range(3)]).detach()
        s = int(pred[i])
        if int(labels[i]) == s:
            kk = min(
                (c for c in range(3) if c != s),
                key=lambda c: (logits[c] - logits[s]).abs().item() / (jac[c] - jac[s]).norm().item(),
            )
        else:
            kk = int(labels[i])
        total = total + (1 + o) * (logits[kk] - logits[s]).abs() / (jac[kk] - jac[s]).norm()
    expected = torch.autograd.grad(total, params)
    _, norms, _ = deepfool(model, x, steps=1, overshoot=o, create_graph=True, labels=labels, high_order=False)
    torch.testing.assert_close(norms.sum(), total.detach())
    detached = torch.autograd.grad(norms.sum(), params)
    for g, e in zip(detached, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    _, norms_high, _ = deepfool(model, x, steps=1, overshoot=o, create_graph=True, labels=labels)
    full = torch.autograd.grad(norms_high.sum(), params)
    assert max((g - e).abs().max().item() for g, e in zip(full, expected)) > 1e-3


# -- 4. MIN aggregation against the paper's two conditions, literally --------------------------------
def select_min_by_hand(norms, labels, correct, usable, batch_size, fraction=0.2):
    n, lab = norms.tolist(), labels.tolist()
    top = max(1, int(fraction * batch_size))
    keep = [False] * len(n)
    for want_correct, better in ((True, lambda a, b: a < b), (False, lambda a, b: a > b)):
        group = [i for i in range(len(n)) if bool(usable[i]) and bool(correct[i]) == want_correct]
        for i in group:
            same_label = [j for j in group if lab[j] == lab[i]]
            extreme = next(j for j in same_label if not any(better(n[m], n[j]) for m in same_label))  # first wins
            rank = sum(better(n[j], n[i]) for j in group) + sum(n[j] == n[i] for j in group if j < i)  # stable
            keep[i] = extreme == i and rank < top
    return torch.tensor(keep)


def test_select_min_matches_the_two_conditions_on_random_batches():
    gen = torch.Generator().manual_seed(0)
    kept_correct = kept_wrong = 0
    for case in range(200):
        b = int(torch.randint(5, 61, (1,), generator=gen))
        k = int(torch.randint(3, 11, (1,), generator=gen))
        if case % 2:
            norms = torch.randint(0, 6, (b,), generator=gen).double() / 4  # many ties
        else:
            norms = torch.rand(b, generator=gen, dtype=DT) * 3
        labels = torch.randint(0, k, (b,), generator=gen)
        correct = torch.rand(b, generator=gen) < torch.rand(1, generator=gen)
        usable = torch.rand(b, generator=gen) < 0.85
        fraction = 0.2 if case % 5 else 0.5
        got = select_min(norms, labels, correct, usable, b, fraction)
        want = select_min_by_hand(norms, labels, correct, usable, b, fraction)
        assert got.dtype == torch.bool and torch.equal(got, want), case
        kept_correct += int((got & correct).sum())
        kept_wrong += int((got & ~correct).sum())
    assert kept_correct > 50 and kept_wrong > 50  # both groups were exercised


def test_select_min_on_a_small_batch_by_hand():
    norms = torch.tensor([0.5, 0.3, 0.3, 0.9, 2.0, 1.5, 0.1, 0.2, 0.8, 0.7])
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 2, 2, 2, 0])
    correct = torch.tensor([1, 1, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.bool)
    usable = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    # top = 2. Correct & usable: 0 (0.5, y0), 1 (0.3, y0), 2 (0.3, y1), 3 (0.9, y1), 8 (0.8, y2): per-label minima
    # 1, 2, 8; the two smallest of the group are 1 and 2 (tie, stable). Misclassified & usable: 4 (2.0, y0),
    # 5 (1.5, y1), 6 (0.1, y2), 9 (0.7, y0): maxima 4, 5, 6; the two largest are 4 and 5.
    expected = torch.tensor([0, 1, 1, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    assert torch.equal(select_min(norms, labels, correct, usable, 10), expected)


# -- 5. shrinkage, truncation and the per-sample terms ----------------------------------------------
def test_shrink_is_lin_exp_inv():
    for t in (-2.0, -0.3, 0.0, 0.4, 0.9):
        tt = torch.tensor(t, dtype=DT)
        assert shrink(tt, "lin").item() == t
        assert shrink(tt, "exp").item() == pytest.approx(math.exp(t), rel=1e-15)
        assert shrink(tt, "inv").item() == pytest.approx(1 / (1 - t), rel=1e-15)
    with pytest.raises(ValueError, match="shrinkage"):
        shrink(torch.zeros(1), "log")


@pytest.mark.parametrize("kind", ["lin", "exp", "inv"])
def test_margin_terms_follow_eq_6_with_the_truncation(kind):
    lam, c, d, clip = 3.0, 2.0, 0.5, 20.0
    tau = {"lin": math.inf, "exp": math.log(clip / lam) / d, "inv": (1 - lam / clip) / d}[kind]  # λ·R(dτ) = clip
    assert truncation(lam, d, kind, clip) == pytest.approx(tau, rel=1e-12)
    if kind == "inv":
        assert d * tau < 1
    R = {"lin": lambda t: t, "exp": math.exp, "inv": lambda t: 1 / (1 - t)}[kind]
    dR = {"lin": lambda t: 1.0, "exp": math.exp, "inv": lambda t: 1 / (1 - t) ** 2}[kind]
    values = [0.0, 0.1, 0.7, 1.3, 1.9, 3.0, 7.5, 40.0]
    norms = torch.tensor(values * 2, dtype=DT, requires_grad=True)
    correct = torch.tensor([True] * len(values) + [False] * len(values))
    terms = margin_terms(norms, correct, lam, c, d, kind, clip)
    (grad,) = torch.autograd.grad(terms.sum(), norms)
    for i, n in enumerate(norms.tolist()):
        if correct[i]:
            want, want_grad = lam * R(-c * n), -lam * c * dR(-c * n)
        else:
            m = min(n, tau)
            want, want_grad = lam * R(d * m), (lam * d * dR(d * m) if n < tau else 0.0)
        assert terms[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12), (i, n)
        assert grad[i].item() == pytest.approx(want_grad, rel=1e-12, abs=1e-12), (i, n)
        if kind != "lin":
            assert terms[i].item() <= clip * (1 + 1e-12)
    if kind != "lin":
        assert terms[~correct][-1].item() == pytest.approx(clip, rel=1e-12)  # 40 is far beyond τ
        assert (grad[~correct][norms[~correct] > tau] == 0).all()


# -- 6. the regularizer: AVG+LIN in closed form, MIN against the brute force --------------------------
@pytest.mark.parametrize("k", [2, 4])
def test_avg_lin_regularizer_of_an_affine_model_is_the_closed_form(k):
    lam, c, d = 0.7, 2.0, 1.5
    model = affine(k, seed=20 + k)
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(8), dtype=DT)
    pred = model(x).argmax(1)
    labels = pred.clone()
    if k == 2:
        labels[torch.tensor([0, 3, 4, 9])] = 1 - pred[torch.tensor([0, 3, 4, 9])]
    stage = AMMLoss(cross_entropy, lam=lam, c=c, d=d, aggregation="avg", shrinkage="lin", steps=3)
    reg = stage.regularizer(model, x, labels)
    w, b = model.weight, model.bias
    terms = []
    for i in range(12):
        s = int(pred[i])
        if k == 2:
            dist = pair_distance(w, b, x[i], 0, 1)
        else:
            dist = nearest_boundary(w, b, x[i], s)[0]
        norm = 1.02 * dist
        terms.append(lam * (-c * norm) if int(labels[i]) == s else lam * d * norm)
    expected = torch.stack(terms).sum() / 12
    torch.testing.assert_close(reg, expected, rtol=1e-10, atol=1e-12)
    g_reg = torch.autograd.grad(reg, [w, b])
    g_exp = torch.autograd.grad(expected, [w, b])
    for g, e in zip(g_reg, g_exp):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    loss, logits = stage(model, Batch(x, labels))
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(loss, F.cross_entropy(model(x), labels) + expected.detach())


@pytest.mark.parametrize("steps", [1, 4])
def test_min_exp_regularizer_is_the_brute_force_selection(steps):
    lam, c, d, clip = 2.0, 2.0, 1.0, 5.0
    model = tanh_mlp(seed=2, hidden=12)
    gen = torch.Generator().manual_seed(9)
    x = 1.5 * torch.randn(30, 5, generator=gen, dtype=DT)
    labels = torch.randint(0, 3, (30,), generator=gen)
    stage = AMMLoss(cross_entropy, lam=lam, c=c, d=d, aggregation="min", shrinkage="exp", steps=steps, clip_value=clip)
    params = list(model.parameters())
    reg = stage.regularizer(model, x, labels)
    g_reg = torch.autograd.grad(reg, params)

    r, success, source = deepfool_with_source(model, x, steps, 0.02, labels=labels)
    correct = source == labels
    keep = select_min_by_hand(r.flatten(1).norm(dim=1), labels, correct, success, 30)
    assert (keep & correct).any() and (keep & ~correct).any()
    if steps == 1:  # some attacks fail in one step, and leaving them out changes the selection
        assert not torch.equal(
            keep, select_min_by_hand(r.flatten(1).norm(dim=1), labels, correct, torch.ones_like(success), 30)
        )
    rows = keep.nonzero().squeeze(1)
    r2, success2, source2 = deepfool_with_source(model, x[rows], steps, 0.02, create_graph=True, labels=labels[rows])
    norms = r2.flatten(1).norm(dim=1)
    tau = math.log(clip / lam) / d
    total = x.new_zeros(())
    for j in range(len(rows)):
        if not success2[j]:
            continue
        if source2[j] == labels[rows][j]:
            total = total + lam * torch.exp(-c * norms[j])
        else:
            total = total + lam * torch.exp(d * norms[j].clamp(max=tau))
    expected = total / 30
    torch.testing.assert_close(reg, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(g_reg, torch.autograd.grad(expected, params)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    avg = AMMLoss(cross_entropy, lam=lam, c=c, d=d, aggregation="avg", shrinkage="exp", steps=steps, clip_value=clip)
    assert abs(avg.regularizer(model, x, labels).item() - reg.item()) > 1e-3


@pytest.mark.parametrize("kind", ["lin", "exp", "inv"])
def test_avg_regularizer_leaves_out_the_samples_deepfool_did_not_move(kind):
    lam, c, d, clip, steps = 2.0, 2.0, 0.5, 5.0, 1
    model = tanh_mlp(seed=2, hidden=12)
    gen = torch.Generator().manual_seed(9)
    x = 1.5 * torch.randn(30, 5, generator=gen, dtype=DT)
    labels = torch.randint(0, 3, (30,), generator=gen)
    r, success, source = deepfool_with_source(model, x, steps, 0.02, labels=labels)
    assert 0 < success.sum() < 30
    R = {"lin": lambda t: t, "exp": math.exp, "inv": lambda t: 1 / (1 - t)}[kind]
    tau = {"lin": math.inf, "exp": math.log(clip / lam) / d, "inv": (1 - lam / clip) / d}[kind]
    total = 0.0
    for i in range(30):
        if success[i]:
            n = r[i].norm().item()
            total += lam * R(-c * n) if source[i] == labels[i] else lam * R(d * min(n, tau))
    stage = AMMLoss(cross_entropy, lam=lam, c=c, d=d, aggregation="avg", shrinkage=kind, steps=steps, clip_value=clip)
    assert stage.regularizer(model, x, labels).item() == pytest.approx(total / 30, rel=1e-10)


def test_the_regularizer_considers_the_top_candidates():
    lam, c, d = 1.5, 2.0, 1.0
    model = tanh_mlp(seed=4, hidden=12, k=6)
    gen = torch.Generator().manual_seed(13)
    x = 2 * torch.randn(30, 5, generator=gen, dtype=DT)
    labels = torch.randint(0, 6, (30,), generator=gen)
    values = {}
    for candidates in (0, 2):
        stage = AMMLoss(
            cross_entropy, lam=lam, c=c, d=d, aggregation="avg", shrinkage="lin", steps=4, candidates=candidates
        )
        values[candidates] = stage.regularizer(model, x, labels).item()
        r, success, source = deepfool_with_source(model, x, 4, 0.02, labels=labels, candidates=candidates or None)
        total = sum(
            (lam * -c * r[i].norm() if source[i] == labels[i] else lam * d * r[i].norm()).item()
            for i in range(30)
            if success[i]
        )
        assert values[candidates] == pytest.approx(total / 30, rel=1e-10)
    assert abs(values[0] - values[2]) > 1e-3


@pytest.mark.parametrize("aggregation", ["avg", "min"])
def test_a_batch_where_no_attack_succeeds_adds_nothing(aggregation):
    model = nn.Linear(5, 3).to(DT)
    with torch.no_grad():  # every logit 0: no boundary to cross
        model.weight.zero_()
        model.bias.zero_()
    x, labels = torch.randn(6, 5, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2])
    stage = AMMLoss(cross_entropy, lam=1.0, aggregation=aggregation, shrinkage="lin")
    assert stage.regularizer(model, x, labels).item() == 0.0
    loss, _ = stage(model, Batch(x, labels))
    assert loss.item() == pytest.approx(math.log(3), rel=1e-12)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# -- 7. frozen dropout masks -------------------------------------------------------------------------
def test_frozen_dropout_reuses_the_first_masks_for_replicas_and_subsets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 32), nn.Dropout(0.5), nn.Linear(32, 3)).to(DT).train()
    x = torch.randn(6, 5, dtype=DT)
    model.eval()
    no_dropout = model(x).detach()
    model.train()
    with FrozenDropout(model) as frozen:
        first = model(x)
        assert not torch.allclose(first, no_dropout)
        torch.testing.assert_close(model(x), first)
        model.eval()  # DeepFool's passes: dropout itself is off, the frozen mask still applies
        torch.testing.assert_close(model(x), first)
        model.train()
        subset = torch.tensor([4, 1, 5])
        frozen.select(subset)
        torch.testing.assert_close(model(x[subset]), first[subset])
        rows = torch.tensor([4, 1, 5, 1, 1, 0, 4])  # copies and a subset, in any order
        torch.testing.assert_close(frozen.forward(model, x[rows], rows), first[rows])
        torch.testing.assert_close(model(x[subset]), first[subset])  # forward restores the selection
        with pytest.raises(RuntimeError, match="FrozenDropout.forward"):
            deepfool(model, x[subset], steps=2)  # DeepFool's copies, whose samples it was not told
        frozen.select(None)
        with pytest.raises(RuntimeError, match="FrozenDropout.forward"):
            model(x[rows])
        torch.testing.assert_close(model(x), first)
    a, b = model(x), model(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, first)


def test_frozen_masks_are_per_sample_bernoulli_with_inverted_scaling():
    torch.manual_seed(1)
    layer = nn.Sequential(nn.Dropout(0.5)).train()
    ones = torch.ones(20, 100, dtype=DT)
    with FrozenDropout(layer):
        out = layer(ones)
        assert torch.equal(layer(ones), out)
    assert set(out.unique().tolist()) <= {0.0, 2.0}
    assert abs((out == 0).double().mean().item() - 0.5) < 0.05
    assert len({tuple(row.tolist()) for row in out}) == 20  # one mask per sample


@pytest.mark.parametrize("bad", [nn.Dropout(0.5, inplace=True), nn.Dropout2d(0.5)])
def test_frozen_dropout_refuses_in_place_and_other_dropouts(bad):
    model = nn.Sequential(nn.Linear(4, 4), bad, nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Dropout"):
        FrozenDropout(model)
    stage = AMMLoss(cross_entropy)
    with pytest.raises(ValueError):
        stage(model, Batch(torch.randn(3, 4), torch.tensor([0, 1, 0])))


# -- 8. one sample's margin never depends on the others -----------------------------------------------
def bn_dropout_mlp(d: int = 5, k: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, k))


def test_margins_are_per_sample_with_batchnorm_and_frozen_dropout():
    model = bn_dropout_mlp().to(DT).train()
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(10, 5, generator=gen, dtype=DT)
    labels = torch.randint(0, 3, (10,), generator=gen)
    lam, c, d, steps = 0.5, 2.0, 1.0, 4
    stage = AMMLoss(cross_entropy, lam=lam, c=c, d=d, aggregation="avg", shrinkage="lin", steps=steps)
    with FrozenDropout(model) as frozen:
        model(x)  # the cross-entropy pass: draws the masks

        def attack(rows, inputs=None):  # DeepFool of the batch's rows, their masks kept
            inputs = x[rows] if inputs is None else inputs
            return deepfool_with_source(
                model,
                inputs,
                steps,
                0.02,
                labels=labels[rows],
                forward=lambda z, sub: frozen.forward(model, z, rows[sub]),
            )

        everyone = torch.arange(10)
        r, success, source = attack(everyone)
        assert model.training
        for rows in (torch.tensor([3]), torch.tensor([7, 0, 2])):
            r_sub, s_sub, src_sub = attack(rows)
            torch.testing.assert_close(r_sub, r[rows], rtol=1e-9, atol=1e-12)
            assert torch.equal(s_sub, success[rows]) and torch.equal(src_sub, source[rows])
        others = x.clone()
        others[1:] = 5 * torch.randn(9, 5, generator=gen, dtype=DT)
        r_others, _, _ = attack(everyone, others)
        torch.testing.assert_close(r_others[0], r[0], rtol=1e-9, atol=1e-12)
        reg = stage.regularizer(model, x, labels, frozen)
        terms = []
        for i in range(10):  # the regularizer, one sample at a time
            ri, si, srci = attack(torch.tensor([i]))
            if si.item():
                n = ri.norm().item()
                terms.append(lam * (-c * n) if srci.item() == labels[i].item() else lam * d * n)
    assert len(terms) >= 5
    assert reg.item() == pytest.approx(sum(terms) / 10, rel=1e-9, abs=1e-12)
    r_unfrozen, _, _ = deepfool_with_source(model, x, steps, 0.02, labels=labels)  # no masks: another margin
    assert not torch.allclose(r_unfrozen, r)


def test_the_regularizer_leaves_batchnorm_statistics_to_the_cross_entropy_pass():
    run = build_run(small_config("amm"))
    model = bn_dropout_mlp(d=64, k=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = dataclasses.replace(run.step, model=model, optimizer=optimizer)
    run = dataclasses.replace(run, model=model, optimizer=optimizer, step=step)
    x, y = next(iter(run.loader))
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        reference(x)
    model.train()
    loss, logits, _ = train_step(run, x, y)
    assert math.isfinite(loss.item()) and logits.shape == (64, 10)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(model.state_dict()[name], reference.state_dict()[name])
    assert model.state_dict()["1.num_batches_tracked"].item() == 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# -- 9. errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(aggregation="max"), "aggregation"),
        (dict(shrinkage="log"), "shrinkage"),
        (dict(c=0.0), "^lam must be >= 0 and c, d > 0"),
        (dict(c=-1.0), "^lam must be >= 0 and c, d > 0"),
        (dict(d=0.0), "^lam must be >= 0 and c, d > 0"),
        (dict(lam=-1.0), "^lam must be >= 0 and c, d > 0"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(overshoot=-0.1), "overshoot"),
        (dict(top_fraction=0.0), "top_fraction"),
        (dict(top_fraction=1.5), "top_fraction"),
        (dict(lam=50.0, clip_value=50.0), "clip_value"),  # EXP, the default
        (dict(lam=32.0, clip_value=10.0, shrinkage="inv"), "clip_value"),
        (dict(candidates=1), "candidates"),
        (dict(candidates=-3), "candidates"),
    ],
)
def test_bad_amm_settings_are_value_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        AMMLoss(cross_entropy, **kwargs)


def test_lin_needs_no_clip_value_above_lam():
    AMMLoss(cross_entropy, lam=100.0, clip_value=50.0, shrinkage="lin", aggregation="avg")


def test_soft_targets_are_refused():
    model = affine(3)
    x = torch.randn(4, 5, dtype=DT)
    soft = torch.full((4, 3), 1 / 3, dtype=DT)
    with pytest.raises(ValueError, match="hard labels"):
        AMMLoss(cross_entropy)(model, Batch(x, soft))


def test_amm_settings_without_the_amm_loss_are_refused():
    with pytest.raises(ValueError, match="stages.loss=amm"):
        resolve(TrainConfig(method="erm"), ["amm.lam=1"])
    resolve(TrainConfig(method="erm"), ["stages.loss=amm", "amm.lam=1"])  # with the loss it is fine


def test_the_amm_section_reaches_the_loss_stage():
    settings = [
        "amm.lam=3",
        "amm.c=4",
        "amm.d=0.5",
        "amm.aggregation=avg",
        "amm.shrinkage=inv",
        "amm.steps=2",
        "amm.overshoot=0.05",
        "amm.high_order=false",
        "amm.top_fraction=0.3",
        "amm.clip_value=9",
        "amm.candidates=10",
    ]
    config = resolve(TrainConfig(method="amm"), settings)
    assert config.stages.loss == "amm" and config.optim.clip_grad == 10.0
    stage = build_loss(config)
    assert isinstance(stage, AMMLoss)
    assert (
        stage.lam,
        stage.c,
        stage.d,
        stage.aggregation,
        stage.shrinkage,
        stage.steps,
        stage.overshoot,
        stage.high_order,
        stage.top_fraction,
        stage.clip_value,
        stage.candidates,
    ) == (3.0, 4.0, 0.5, "avg", "inv", 2, 0.05, False, 0.3, 9.0, 10)
    default = build_loss(resolve(TrainConfig(method="amm"), []))
    assert (
        default.lam,
        default.c,
        default.d,
        default.aggregation,
        default.shrinkage,
        default.steps,
        default.high_order,
        default.candidates,
    ) == (32.0, 2.0, 1.0, "min", "exp", 6, True, 0)


# -- 10. training ---------------------------------------------------------------------------------------
def test_amm_trains_from_the_cli(tmp_path):
    cli.main(
        [
            "train",
            "--method",
            "amm",
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "a"),
            "--quiet",
            "--set",
            "model.hidden=16",
        ]
    )
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["method"] == "amm" and math.isfinite(metrics["test_error"]) and 0 <= metrics["test_error"] <= 100
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["stages"]["loss"] == "amm" and config["optim"]["clip_grad"] == 10.0


def test_clip_grad_bounds_the_gradient_the_step_takes():
    run = build_run(small_config("amm", "amm.aggregation=avg", "amm.shrinkage=lin", "amm.lam=1000"))
    x, y = next(iter(run.loader))
    probe = copy.deepcopy(run.model).train()
    loss, _ = run.step.loss_fn(probe, Batch(x, y))
    loss.backward()
    assert global_norm(probe.parameters()) > 100  # unclipped, far above the cap
    seen, step = [], run.optimizer.step

    def inspecting_step(closure):
        def wrapped():
            value = closure()
            seen.append(global_norm(run.model.parameters()))
            return value

        return step(wrapped)

    run.optimizer.step = inspecting_step
    run.model.train()
    train_step(run, x, y)
    assert len(seen) == 1 and seen[0] <= 10 + 1e-6 and seen[0] == pytest.approx(10.0, rel=1e-4)
