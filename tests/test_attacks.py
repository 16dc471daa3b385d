"""FGSM, PGD and batched DeepFool against closed forms on affine classifiers, and the attack contract."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advreg.attacks import deepfool, fgsm, pgd

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
    dist = torch.stack([(logits[:, j] - logits.gather(1, source[:, None])[:, 0]).abs()
                        / (w[j] - w[source]).norm(dim=1) for j in range(k)], 1)
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


@pytest.mark.parametrize("attack", [
    lambda m, x, y: fgsm(m, x, y, 0.1),
    lambda m, x, y: pgd(m, x, y, 0.1, 0.02, 5),
    lambda m, x, y: deepfool(m, x, steps=3),
], ids=["fgsm", "pgd", "deepfool"])
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


def test_the_test_margin_is_the_mean_exact_distance_on_an_affine_classifier():
    from advreg.evaluate import margin

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
