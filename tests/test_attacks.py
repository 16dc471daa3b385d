"""FGSM, PGD and batched DeepFool against closed forms on affine classifiers and reference loops, PGD's L2 starts
against their norm distributions, and the attack contract."""

import copy

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from advreg.attacks import deepfool, deepfool_with_source, fgsm, pgd
from advreg.evaluate import margin

DT = torch.float64


def affine(d=6, k=4, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, k).to(DT)


def batch(n=32, d=6, k=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=gen, dtype=DT), torch.randint(0, k, (n,), generator=gen)


def ce_input_grad(model, x, y):
    """∇ₓ CE for f(x) = Wx + b: Wᵀ(softmax(f) - onehot(y)) / B (the batch mean), written out."""
    p = torch.softmax(x @ model.weight.T + model.bias, dim=1)
    return (p - F.one_hot(y, p.shape[1]).to(DT)) @ model.weight / len(y)


def test_fgsm_is_the_signed_gradient_step_inside_the_box():
    model, (x, y) = affine(), batch()
    expected = (x + 0.1 * ce_input_grad(model, x, y).sign()).clamp(0, 1)
    torch.testing.assert_close(fgsm(model, x, y, 0.1, box=(0.0, 1.0)), expected)


def test_pgd_linf_one_step_from_x_is_fgsm_and_multistep_matches_a_reference_loop():
    model, (x, y) = affine(), batch()
    one = pgd(model, x, y, eps=0.05, alpha=0.05, steps=1, random_start=False, box=(0.0, 1.0))
    torch.testing.assert_close(one, fgsm(model, x, y, 0.05, box=(0.0, 1.0)))
    ref = x.clone()
    for _ in range(7):  # Madry et al.: x ← Π_{box ∩ ball}(x + α·sign(∇))
        ref = ref + 0.01 * ce_input_grad(model, ref, y).sign()
        ref = torch.min(torch.max(ref, x - 0.03), x + 0.03).clamp(0, 1)
    torch.testing.assert_close(pgd(model, x, y, 0.03, 0.01, 7, random_start=False, box=(0.0, 1.0)), ref)


def test_pgd_l2_matches_a_reference_loop():
    model, (x, y) = affine(), batch()
    ref = x.clone()
    for _ in range(5):
        g = ce_input_grad(model, ref, y)
        delta = ref + 0.2 * g / g.norm(dim=1, keepdim=True) - x
        ref = (x + delta * (0.3 / delta.norm(dim=1, keepdim=True)).clamp(max=1)).clamp(0, 1)
    torch.testing.assert_close(pgd(model, x, y, 0.3, 0.2, 5, norm="l2", random_start=False, box=(0.0, 1.0)), ref)


@pytest.mark.parametrize("norm, eps", [("linf", 0.03), ("l2", 0.5)])
def test_pgd_stays_in_the_ball_and_the_box_and_is_seeded(norm, eps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).to(DT)
    x, y = batch()
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    adv = pgd(model, x, y, eps, eps / 4, 20, norm=norm, box=(0.0, 1.0), generator=gen())
    dist = (adv - x).abs().amax(dim=1) if norm == "linf" else (adv - x).norm(dim=1)
    assert (dist <= eps + 1e-12).all() and adv.min() >= 0 and adv.max() <= 1
    assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
    assert torch.equal(adv, pgd(model, x, y, eps, eps / 4, 20, norm=norm, box=(0.0, 1.0), generator=gen()))


@pytest.mark.parametrize("k", [2, 5])
def test_deepfool_on_an_affine_classifier_is_the_exact_distance(k):
    model, (x, _) = affine(k=k), batch(k=k)
    logits = model(x)
    source = logits.argmax(1)
    w = model.weight
    # distance to the complement of the polyhedron {f_source ≥ f_j ∀j}: min over j of |f_j - f_s| / ‖w_j - w_s‖
    dist = torch.stack(
        [
            (logits[:, j] - logits.gather(1, source[:, None])[:, 0]).abs() / (w[j] - w[source]).norm(dim=1)
            for j in range(k)
        ],
        1,
    )
    dist[torch.arange(len(x)), source] = float("inf")
    exact = dist.min(1).values
    _, norms, _ = deepfool(model, x, steps=5, overshoot=0.0)
    torch.testing.assert_close(norms, exact, rtol=1e-9, atol=1e-12)
    r, norms, success = deepfool(model, x, steps=5, overshoot=0.02)
    torch.testing.assert_close(norms, 1.02 * exact, rtol=1e-9, atol=1e-12)
    assert success.all() and (model(x + r).argmax(1) != source).all()


def test_deepfool_needs_no_labels_and_moves_a_nonlinear_model_across_the_boundary():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)).to(DT)
    x, _ = batch()
    r, norms, success = deepfool(model, x, steps=50)
    assert success.all()
    assert (model(x + r).argmax(1) != model(x).argmax(1)).all()
    torch.testing.assert_close(norms, r.norm(dim=1))


def test_deepfool_create_graph_is_differentiable_in_the_weights():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)
    x, _ = batch()
    _, norms, _ = deepfool(model, x, steps=3, create_graph=True)
    norms.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "attack",
    [
        lambda m, x, y: fgsm(m, x, y, 0.1),
        lambda m, x, y: pgd(m, x, y, 0.1, 0.02, 5),
        lambda m, x, y: deepfool(m, x, steps=3),
    ],
    ids=["fgsm", "pgd", "deepfool"],
)
def test_attacks_leave_the_model_as_they_found_it(attack):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 4)).to(DT)
    x, y = batch()
    model.train()
    before = copy.deepcopy(model.state_dict())
    attack(model, x, y)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights and BN buffers
    assert all(p.grad is None for p in model.parameters())


def test_bad_attack_arguments_say_what_to_do():
    model, (x, y) = affine(), batch()
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, -1.0)
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, 0.1, 0.01, 3, norm="l1")
    with pytest.raises(ValueError, match="steps"):
        deepfool(model, x, steps=0)
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError, match="candidates"):
            deepfool(model, x, candidates=bad)
    with pytest.raises(ValueError, match="start"):
        pgd(model, x, y, 0.1, 0.01, 3, norm="l2", start="sphere")
    with pytest.raises(ValueError, match="start"):
        pgd(model, x, y, 0.1, 0.01, 3, norm="linf", start="radius")


def test_the_test_margin_is_the_mean_exact_distance_on_an_affine_classifier():
    torch.manual_seed(5)
    model = nn.Linear(6, 4).double()
    x = torch.randn(300, 6, dtype=torch.float64)
    with torch.no_grad():
        f, w = model(x), model.weight
    s = f.argmax(1)
    gaps = (f - f.gather(1, s[:, None])).abs() / (w[None] - w[s][:, None]).norm(dim=2)
    gaps[torch.arange(300), s] = float("inf")
    result = margin(model, x, batch_size=128)  # three batches, the last one short
    assert result["margin_success"] == 100.0
    assert result["margin"] == pytest.approx(1.02 * gaps.min(1).values.mean().item(), rel=1e-9)


# -- DeepFool's candidate classes, the two-class path toward a label, and the input box ----------------
def tanh_net(k=6, d=6, seed=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 24), nn.Tanh(), nn.Linear(24, k)).to(DT)


def goal_reached(prediction, source, label):
    return prediction == label if label is not None else prediction != source


def deepfool_loop(model, x, steps, overshoot=0.02, candidates=None, box=None, labels=None):
    """DeepFool one sample at a time with the full Jacobian (each of the K classes by its own autograd call) and
    torchattacks' iterate x ← clip(x + (1 + overshoot)·δ): untargeted over the top ``candidates`` classes at x, or,
    for a sample whose label is not its prediction, across the current-prediction/label boundary each step.
    Returns r (B, D) and success (B,)."""
    perturbations, successes = [], []
    for i, x0 in enumerate(x):
        scores = model(x0[None])[0].detach()
        source = int(scores.argmax())
        top = scores.argsort(descending=True)[: candidates or len(scores)].tolist()
        label = None if labels is None or int(labels[i]) == source else int(labels[i])
        point = x0.clone()
        for _ in range(steps):
            point = point.detach().requires_grad_(True)
            f = model(point[None])[0]
            if goal_reached(int(f.argmax()), source, label):
                break
            jac = torch.stack([torch.autograd.grad(f[c], point, retain_graph=True)[0] for c in range(len(f))])
            base = int(f.argmax()) if label is not None else source
            others = [label] if label is not None else [c for c in top if c != source]
            best = min(others, key=lambda c: ((f[c] - f[base]).abs() / (jac[c] - jac[base]).norm()).item())
            w = jac[best] - jac[base]
            point = point.detach() + (1 + overshoot) * (f[best] - f[base]).abs().detach() / w.pow(2).sum() * w
            point = point.clamp(*box) if box is not None else point
        perturbations.append((point - x0).detach())
        successes.append(goal_reached(int(model(point[None]).argmax()), source, label))
    return torch.stack(perturbations), torch.tensor(successes)


@pytest.mark.parametrize("candidates", [2, 3, 6, None])
@pytest.mark.parametrize("with_labels", [False, True])
def test_deepfool_over_the_top_candidates_is_the_per_sample_loop(candidates, with_labels):
    model, (x, _) = tanh_net(), batch(n=40)
    x = 4 * x - 2
    labels = None
    if with_labels:  # a third misclassified, pushed toward a label by two copies, not K
        pred = model(x).argmax(1)
        labels = torch.where(torch.arange(40) % 3 == 0, (pred + 1 + torch.arange(40) % 5) % 6, pred)
    r, success, source = deepfool_with_source(model, x, steps=8, candidates=candidates, labels=labels)
    expected_r, expected_success = deepfool_loop(model, x, 8, candidates=candidates, labels=labels)
    torch.testing.assert_close(r, expected_r, rtol=1e-9, atol=1e-12)
    assert torch.equal(success, expected_success) and torch.equal(source, model(x).argmax(1))
    assert success.float().mean() > 0.8
    if candidates == 2:  # the restriction matters: another class's boundary was nearer for some samples
        full, _ = deepfool_loop(model, x, 8, labels=labels)
        assert (r - full).norm(dim=1).max() > 1e-3


def test_all_classes_as_candidates_is_no_restriction_bit_for_bit():
    model, (x, y) = tanh_net(), batch(n=40, k=6)
    for labels in (None, y):
        plain = deepfool(model, 4 * x - 2, steps=8, labels=labels)
        for candidates in (6, 50):
            restricted = deepfool(model, 4 * x - 2, steps=8, labels=labels, candidates=candidates)
            assert all(torch.equal(a, b) for a, b in zip(plain, restricted))


def test_deepfool_in_a_box_clips_every_iterate_as_torchattacks():
    model, (x, _) = tanh_net(seed=6), batch(n=40)
    box = (0.0, 1.0)
    free, _, _ = deepfool(model, x, steps=10)
    assert (((x + free) < 0) | ((x + free) > 1)).any(dim=1).float().mean() > 0.3  # unclipped, it leaves the box
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    r, norms, success = deepfool(model, x, steps=10, box=box)
    handle.remove()
    inputs = torch.cat(seen)
    assert len(seen) > 3 and inputs.min() >= 0 and inputs.max() <= 1  # every point the model saw
    expected_r, expected_success = deepfool_loop(model, x, 10, box=box)
    torch.testing.assert_close(r, expected_r, rtol=1e-9, atol=1e-12)
    assert torch.equal(success, expected_success) and success.any()  # in the box, fewer samples get across
    assert (x + r).min() >= -1e-12 and (x + r).max() <= 1 + 1e-12
    assert margin(model, x, steps=10, batch_size=16, box=box)["margin"] == pytest.approx(norms.mean().item(), rel=1e-12)


def test_a_box_that_does_not_bind_leaves_deepfool_of_an_affine_classifier_unchanged():
    model, (x, y) = affine(k=5), batch(k=5)
    for labels in (None, y):
        free = deepfool(model, x, steps=5, labels=labels)
        boxed = deepfool(model, x, steps=5, labels=labels, box=(-100.0, 100.0))
        assert (x + free[0]).abs().max() < 50
        for a, b in zip(free, boxed):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


# -- PGD's L2 random starts ---------------------------------------------------------------------------
@pytest.mark.parametrize("start, power", [("ball", 1 / 12), ("radius", 1.0)])
def test_l2_random_starts_have_the_norm_distribution_of_their_rule(start, power):
    """Uniform in the d-ball: ‖δ‖/ε ~ U^(1/d), i.e. (‖δ‖/ε)^d ~ U; torchattacks' start: ‖δ‖/ε ~ U."""
    model = nn.Linear(12, 3).to(DT)
    x, y = torch.full((4000, 12), 0.5, dtype=DT), torch.zeros(4000, dtype=torch.long)
    gen = torch.Generator().manual_seed(7)
    delta = pgd(model, x, y, eps=0.3, alpha=0.1, steps=0, norm="l2", start=start, generator=gen) - x
    ratio = delta.norm(dim=1) / 0.3
    assert stats.kstest(ratio.pow(1 / power).numpy(), "uniform").pvalue > 0.01
    other = 1.0 if power != 1.0 else 1 / 12  # the other rule is far off
    assert stats.kstest(ratio.pow(1 / other).numpy(), "uniform").pvalue < 1e-6
    direction = delta / delta.norm(dim=1, keepdim=True)
    assert direction.mean(0).abs().max() < 0.05  # isotropic
    default = pgd(model, x, y, eps=0.3, alpha=0.1, steps=0, norm="l2", generator=torch.Generator().manual_seed(7))
    ball = pgd(
        model, x, y, eps=0.3, alpha=0.1, steps=0, norm="l2", start="ball", generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(default, ball)  # the ball stays the default
