"""The landscape, radius and Hessian analyses, each against something computed independently here: an exact Hessian
from torch.autograd.functional.hessian, a hand-written loop over α, norms measured directly; and the contract of
every analysis: the model comes back bit for bit (also after an error midway), a seed fixes the numbers."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from advreg.analysis import hessian as H
from advreg.analysis import landscape as L
from advreg.analysis import radius as R
from advreg.analysis import save
from advreg.data.splits import DataSplits
from advreg.perturb.engine import global_norm

torch.set_num_threads(1)


def toy_data(n=120, features=5, classes=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, features, generator=g, dtype=dtype)
    y = (x[:, 0] + 0.5 * torch.randn(2 * n, generator=g, dtype=dtype) > 0).long() + (x[:, 1] > 1).long()
    y = y.clamp(max=classes - 1)
    empty = (x[:0], y[:0])
    return DataSplits("toy", (x[:n], y[:n]), empty, (x[n:], y[n:]), classes, (features,))


def bn_model(seed=0):
    """Linear-BatchNorm-ReLU-Dropout-Linear in TRAIN mode, BN statistics and .grad already non-trivial."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    data = toy_data()
    F.cross_entropy(model(data.train[0][:32]), data.train[1][:32]).backward()  # updates BN stats, fills .grad
    return model


def reference_loss(model, x, y):
    """Mean cross-entropy and error (%) in one batch, eval mode, on a copy: independent of the analyses' loop."""
    clone = copy.deepcopy(model).eval()
    with torch.no_grad():
        logits = clone(x)
    return F.cross_entropy(logits, y).item(), 100.0 * (logits.argmax(1) != y).double().mean().item()


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def assert_same(model, snap):
    state, modes, grads = snap
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [m.training for m in model.modules()] == modes
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


SMALL = {
    "landscape": lambda m, d: L.landscape(m, d, L.LandscapeConfig(steps=5, samples=60, batch_size=25)),
    "landscape2d": lambda m, d: L.landscape(m, d, L.LandscapeConfig(dims=2, steps=3, samples=60, batch_size=25)),
    "radius": lambda m, d: R.radius_sweep(
        m, d, R.RadiusConfig(radii=(0.0, 0.5), directions=3, worst_steps=3, samples=60, batch_size=25)
    ),
    "hessian": lambda m, d: H.hessian(m, d, H.HessianConfig(iterations=5, probes=4, samples=60, batch_size=25)),
}


# ---- shared helpers ---------------------------------------------------------------------------------------------


def test_eval_subset_is_a_seeded_sample_of_the_split():
    data = toy_data()
    x, y = L.eval_subset(data, "test", 50, seed=3)
    rows = {tuple(r.tolist()) for r in data.test[0]}
    assert len(y) == 50 and len({tuple(r.tolist()) for r in x}) == 50 and all(tuple(r.tolist()) in rows for r in x)
    assert torch.equal(L.eval_subset(data, "test", 50, seed=3)[0], x)
    assert not torch.equal(L.eval_subset(data, "test", 50, seed=4)[0], x)
    assert len(L.eval_subset(data, "train", 10_000, seed=0)[1]) == 120  # all rows when the split is smaller
    with pytest.raises(ValueError, match="split"):
        L.eval_subset(data, "val", 10, seed=0)


def test_configs_reject_bad_values_with_a_sentence():
    for make in (
        lambda: L.LandscapeConfig(dims=3),
        lambda: L.LandscapeConfig(split="val"),
        lambda: L.LandscapeConfig(span=0),
        lambda: R.RadiusConfig(radii=(-0.1,)),
        lambda: R.RadiusConfig(splits=("val",)),
        lambda: H.HessianConfig(probes=1),
        lambda: H.HessianConfig(tol=0),
    ):
        with pytest.raises(ValueError, match="must"):
            make()


# ---- landscape --------------------------------------------------------------------------------------------------


def test_random_direction_is_filter_normalised():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    d = L.random_direction(model, torch.Generator().manual_seed(0))
    assert [t.shape for t in d] == [p.shape for p in model.parameters()]
    for p, t in zip(model.parameters(), d):
        if p.dim() > 1:
            for f in range(p.shape[0]):  # each output channel / row
                assert math.isclose(t[f].norm().item(), p[f].norm().item(), rel_tol=1e-5)
        else:
            assert torch.count_nonzero(t) == 0  # biases and BatchNorm: 0 by default
    d_all = L.random_direction(model, torch.Generator().manual_seed(0), ignore_bias_bn=False)
    for p, t in zip(model.parameters(), d_all):
        if p.dim() <= 1:
            assert math.isclose(t.norm().item(), p.norm().item(), rel_tol=1e-5)


def test_landscape_at_alpha_zero_is_the_loss_at_theta():
    model, data = bn_model(), toy_data()
    config = L.LandscapeConfig(steps=7, span=0.5, samples=60, batch_size=25)
    result = L.landscape(model, data, config)
    loss, error = reference_loss(model, *L.eval_subset(data, "train", 60, 0))
    assert result.alphas[3] == 0.0
    assert math.isclose(result.loss[3], loss, rel_tol=1e-6) and math.isclose(result.error[3], error)


def test_landscape_1d_matches_a_hand_written_loop_and_2d_contains_it():
    model, data = bn_model(), toy_data()
    config = L.LandscapeConfig(steps=5, span=0.8, samples=60, batch_size=25, seed=2)
    result = L.landscape(model, data, config)
    d = L.random_direction(model, torch.Generator().manual_seed(2))  # the same seed's first direction
    x, y = L.eval_subset(data, "train", 60, 2)
    for k, a in enumerate(np.linspace(-0.8, 0.8, 5)):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, t in zip(moved.parameters(), d):
                p.add_(float(a) * t)
        loss, error = reference_loss(moved, x, y)
        assert math.isclose(result.loss[k], loss, rel_tol=1e-5) and math.isclose(result.error[k], error)
    surface = L.landscape(model, data, L.LandscapeConfig(dims=2, steps=5, span=0.8, samples=60, batch_size=25, seed=2))
    assert surface.loss.shape == surface.error.shape == (5, 5) and surface.betas.shape == (5,)
    np.testing.assert_allclose(surface.loss[:, 2], result.loss, rtol=1e-6)  # β = 0: the 1-D curve along d
    assert not np.allclose(surface.loss[2, :], result.loss)  # along e: another direction


def test_landscape_cost_is_one_line():
    model, data = bn_model(), toy_data()
    assert L.cost(model, data, L.LandscapeConfig(dims=2)).startswith("41 × 41 = 1681 evaluations of 120 train")
    assert L.cost(model, data, L.LandscapeConfig(samples=50)).startswith("41 evaluations of 50 train")


# ---- radius -----------------------------------------------------------------------------------------------------


def test_sphere_directions_have_norm_exactly_r():
    model = bn_model()
    generator = torch.Generator().manual_seed(0)
    for r in (0.0, 0.05, 1.0, 3.0):
        delta = R.sphere_direction(model, r, generator)
        assert [t.shape for t in delta] == [p.shape for p in model.parameters()]
        assert math.isclose(global_norm(delta).item(), r, rel_tol=1e-5, abs_tol=1e-12)


def test_radius_zero_is_theta_and_worst_dominates_random():
    model, data = bn_model(), toy_data()
    config = R.RadiusConfig(radii=(0.0, 0.3, 1.0), directions=4, worst_steps=4, samples=60, batch_size=25)
    result = R.radius_sweep(model, data, config)
    assert result.splits == ("train", "test") and result.worst.shape == (2, 3)
    for p, split in enumerate(result.splits):
        loss, _ = reference_loss(model, *L.eval_subset(data, split, 60, 0))
        assert math.isclose(result.random_mean[p, 0], loss, rel_tol=1e-6)
        assert math.isclose(result.worst[p, 0], loss, rel_tol=1e-6) and result.random_std[p, 0] == 0
    assert np.all(result.worst >= result.random_mean)
    assert np.all(result.worst[:, 1:] > result.random_mean[:, 1:] + result.random_std[:, 1:])


def test_the_ascent_stays_in_the_ball_and_climbs():
    model, data = bn_model(), toy_data()
    x, y = L.eval_subset(data, "train", 60, 0)
    at_theta = reference_loss(model, x, y)[0]
    model.eval()
    params, theta = list(model.parameters()), [p.detach().clone() for p in model.parameters()]
    worst, delta = R.worst_in_ball(model, params, theta, x, y, 0.4, R.RadiusConfig(worst_steps=6), bar=_NoBar())
    assert global_norm(delta).item() <= 0.4 * (1 + 1e-6)  # private: it leaves the model at θ* + Δ
    assert worst > at_theta + 0.05


class _NoBar:
    def update(self, n=1):
        pass


# ---- Hessian ----------------------------------------------------------------------------------------------------


def tiny_problem():
    """A 31-parameter tanh MLP in float64 and its exact Hessian at θ (torch.autograd.functional.hessian)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    data = DataSplits("tiny", (x, y), (x[:0], y[:0]), (x, y), 3, (3,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(vector):
        chunks = torch.split(vector, [math.prod(s) for s in shapes])
        weights = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return F.cross_entropy(functional_call(model, weights, (x,)), y)

    return model, data, torch.autograd.functional.hessian(loss, flat)  # (31, 31)


def test_hvp_matches_the_exact_hessian():
    model, data, hess = tiny_problem()
    x, y = data.train
    v = [torch.randn(p.shape, dtype=torch.float64) for p in model.parameters()]
    hv = H.hvp(model, list(model.parameters()), x, y, v, batch_size=7)  # batches of unequal size
    torch.testing.assert_close(torch.cat([t.flatten() for t in hv]), hess @ torch.cat([t.flatten() for t in v]))


def test_power_iteration_finds_the_largest_magnitude_eigenvalue():
    model, data, hess = tiny_problem()
    eigs = torch.linalg.eigvalsh(hess)
    top = eigs[eigs.abs().argmax()].item()
    second = eigs.abs().sort().values[-2].item()
    assert second < 0.9 * abs(top)  # a gap, so that the power iteration converges in a few dozen steps
    result = H.top_eigenvalue(model, data, H.HessianConfig(iterations=300, tol=1e-10, samples=40))
    assert result.converged and result.iterations == len(result.history) < 300
    assert math.isclose(result.eigenvalue, top, rel_tol=1e-6)
    capped = H.top_eigenvalue(model, data, H.HessianConfig(iterations=2, tol=1e-12, samples=40))
    assert not capped.converged and capped.iterations == 2


SIGMA = (1.0, 0.97, 0.5, 0.2)  # eigenvalues of Σ = XᵀX/N; H's top two, Σ/2, are 3% apart


def close_top_eigenvalues():
    """Softmax regression on 2 classes at W = 0 (float64, no bias), where H = A ⊗ Σ exactly: p = (½, ½) for every
    sample, so each sample's Hessian is (diag p − ppᵀ) ⊗ xxᵀ with A = diag p − ppᵀ = ¼[[1, −1], [−1, 1]], whose
    eigenvalues are ½ and 0. H's eigenvalues are then σ/2 and 0: 0.5 and 0.485 on top."""
    d = len(SIGMA)
    eye = torch.eye(d, dtype=torch.float64)
    x = torch.cat([eye, -eye]) * (torch.tensor(SIGMA, dtype=torch.float64) * d).sqrt()  # (2d, d): XᵀX/2d = diag Σ
    y = torch.arange(2 * d) % 2
    data = DataSplits("close", (x, y), (x[:0], y[:0]), (x, y), 2, (d,))
    model = nn.Linear(d, 2, bias=False).double()
    nn.init.zeros_(model.weight)
    a = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64) / 4
    exact = torch.kron(a, torch.diag(torch.tensor(SIGMA, dtype=torch.float64)))  # vec(W) row by row: (2d, 2d)
    brute = torch.autograd.functional.hessian(
        lambda w: F.cross_entropy(functional_call(model, {"weight": w.view(2, d)}, (x,)), y), model.weight.flatten()
    )
    torch.testing.assert_close(brute, exact)
    return model, data, exact


def test_power_iteration_stops_on_the_residual_when_the_top_eigenvalues_are_close():
    model, data, exact = close_top_eigenvalues()
    top, second = SIGMA[0] / 2, SIGMA[1] / 2
    tol = 1e-4
    result = H.top_eigenvalue(model, data, H.HessianConfig(iterations=2000, tol=tol, samples=len(data.train[1])))
    assert result.converged and result.iterations < 2000
    v = torch.cat([t.flatten() for t in result.eigenvector])
    assert math.isclose(v.norm().item(), 1.0, rel_tol=1e-12)
    assert math.isclose(result.eigenvalue, (v @ exact @ v).item(), rel_tol=1e-12)
    assert math.isclose(result.residual, (exact @ v - result.eigenvalue * v).norm().item(), rel_tol=1e-9)
    assert result.residual <= tol * abs(result.eigenvalue)
    error = top - result.eigenvalue  # ≥ 0: a Rayleigh quotient never exceeds the top eigenvalue
    assert 0 <= error <= result.residual  # the eigenvalue within the residual is the top one
    assert error <= result.residual**2 / (result.eigenvalue - second)  # Kato-Temple: the error is O(r²)
    # the rule it replaces, λ's relative change below tol, was met long before, with an error above tol·λ
    h = result.history
    first = next(k for k in range(1, len(h)) if abs(h[k] - h[k - 1]) < tol * abs(h[k - 1]))
    assert first < result.iterations - 50 and top - h[first] > 5 * tol * top


def test_a_capped_power_iteration_reports_the_residual_of_its_last_iterate():
    model, data, exact = close_top_eigenvalues()
    config = H.HessianConfig(iterations=10, tol=1e-4, probes=2, samples=len(data.train[1]))
    result = H.top_eigenvalue(model, data, config)
    assert not result.converged and result.iterations == 10
    v = torch.cat([t.flatten() for t in result.eigenvector])  # the iterate λ and the residual belong to
    assert math.isclose(result.eigenvalue, result.history[-1]) and math.isclose(
        result.eigenvalue, (v @ exact @ v).item()
    )
    assert math.isclose(result.residual, (exact @ v - result.eigenvalue * v).norm().item(), rel_tol=1e-9)
    assert result.residual > 1e-4 * abs(result.eigenvalue)
    both = H.hessian(model, data, config)
    assert both.eigen_residual == result.residual == H.to_arrays(both)["eigen_residual"]


def test_hutchinson_matches_the_exact_trace():
    model, data, hess = tiny_problem()
    exact = torch.trace(hess).item()
    few = H.trace(model, data, H.HessianConfig(probes=100, samples=40))
    assert abs(few.mean - exact) < 3 * few.stderr
    many = H.trace(model, data, H.HessianConfig(probes=2000, samples=40, seed=1))
    assert abs(many.mean - exact) < 3 * many.stderr and many.stderr < 0.25 * few.stderr
    off = hess - torch.diag(torch.diag(hess))  # Rademacher: Var(zᵀHz) = 2 Σ_{i≠j} H_ij²
    assert math.isclose(many.stderr, math.sqrt(2 * (off**2).sum().item() / 2000), rel_tol=0.15)
    assert math.isclose(many.history[-1], many.mean) and len(many.history) == 2000


# ---- the contract of every analysis -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMALL))
def test_analysis_leaves_the_model_bit_for_bit(name):
    model, data = bn_model(), toy_data()
    snap, rng = snapshot(model), torch.get_rng_state()
    SMALL[name](model, data)
    assert_same(model, snap)
    assert model.training and model[3].training  # still in train mode, Dropout too
    assert torch.equal(torch.get_rng_state(), rng)  # every draw from the analysis's own generators


WHERE = {"landscape": (L, "loss_and_error", 2), "radius": (R, "loss_and_grad", 2), "hessian": (H, "hvp", 2)}


@pytest.mark.parametrize("name", sorted(WHERE))
def test_analysis_restores_the_model_when_it_fails_midway(name, monkeypatch):
    module, function, at = WHERE[name]
    model, data = bn_model(), toy_data()
    snap = snapshot(model)
    real, calls, seen = getattr(module, function), [], {}

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            seen["eval"] = not model.training
            seen["moved"] = any(not torch.equal(p, snap[0][k]) for k, p in model.named_parameters())
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, function, failing)
    with pytest.raises(RuntimeError, match="boom"):
        SMALL[name](model, data)
    assert seen["eval"] and (seen["moved"] or name == "hessian")  # it failed with the model in flux
    assert_same(model, snap)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_same_seed_same_numbers(name):
    model, data = bn_model(), toy_data()
    first, second = L.as_list(SMALL[name](model, data)), L.as_list(SMALL[name](model, data))
    module = {"landscape": L, "landscape2d": L, "radius": R, "hessian": H}[name]
    for a, b in zip(first, second):
        for key, value in module.to_arrays(a).items():
            np.testing.assert_array_equal(value, module.to_arrays(b)[key])


def test_different_seeds_draw_different_directions():
    model = bn_model()
    d0 = L.random_direction(model, torch.Generator().manual_seed(0))
    d1 = L.random_direction(model, torch.Generator().manual_seed(1))
    assert not torch.equal(d0[0], d1[0])
    r0 = R.sphere_direction(model, 1.0, torch.Generator().manual_seed(0))
    r1 = R.sphere_direction(model, 1.0, torch.Generator().manual_seed(1))
    assert not torch.equal(r0[0], r1[0])
    data = toy_data()
    a = L.landscape(model, data, L.LandscapeConfig(steps=3, samples=60, seed=0))
    b = L.landscape(model, data, L.LandscapeConfig(steps=3, samples=60, seed=1))
    assert not np.array_equal(a.loss, b.loss)


# ---- plots and files --------------------------------------------------------------------------------------------


def test_plots_have_the_expected_axes_and_save_writes_three_files(tmp_path):
    model, data = bn_model(), toy_data()
    curve, surface = SMALL["landscape"](model, data), SMALL["landscape2d"](model, data)
    radius, hess = SMALL["radius"](model, data), SMALL["hessian"](model, data)
    assert len(L.plot([curve, curve], ["ERM", "AMP"]).axes) == 1
    figure = L.plot([surface, surface], ["ERM", "AMP"])
    assert len(figure.axes) == 4 and sum(ax.name == "3d" for ax in figure.axes) == 2
    assert len(R.plot([radius, radius], ["ERM", "AMP"]).axes) == 2  # train and test panels
    assert len(H.plot(hess).axes) == 2
    with pytest.raises(ValueError, match="label"):
        L.plot([curve, curve], ["only one"])
    for module, result in ((L, surface), (R, radius), (H, hess)):
        name = module.__name__.rsplit(".", 1)[-1]
        paths = save(tmp_path, name, module.plot(result, ["run"]), module.to_arrays(result), {"seed": 0})
        assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
        with np.load(paths["npz"], allow_pickle=False) as arrays:
            assert set(arrays.files) == set(module.to_arrays(result))


def test_adversarial_landscape_is_awp_algorithm1_with_examples_crafted_per_point():
    """The AWP paper's Appendix B: at each α, PGD examples for the perturbed model, then CE on them."""
    from advreg.attacks import pgd
    from advreg.evaluate import AttackSettings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.rand(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    data = DataSplits("toy", (x, y), (x[:0], y[:0]), (x, y), 3, (4,))
    attack = AttackSettings(eps=0.1, alpha=0.03, steps=5, box=(0.0, 1.0))
    config = L.LandscapeConfig(steps=3, span=0.5, samples=30, seed=1, batch_size=30)
    result = L.landscape(model, data, config, attack=attack)
    d = L.random_direction(model, torch.Generator().manual_seed(1))
    for k, alpha in enumerate(result.alphas):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, dp in zip(moved.parameters(), d):
                p.add_(alpha * dp)
        generator = torch.Generator().manual_seed(1 * 100_003 + k)
        x_adv = pgd(moved, x, y, 0.1, 0.03, 5, box=(0.0, 1.0), generator=generator)
        expected = F.cross_entropy(moved(x_adv), y).item()
        assert result.loss[k] == pytest.approx(expected, rel=1e-9)
        assert result.loss[k] >= F.cross_entropy(moved(x), y).item()  # PGD raises the loss
    assert result.attack == attack


def test_contour_levels_are_geometric_when_the_loss_spans_decades():
    levels = L.contour_levels(0.01, 100.0)
    np.testing.assert_allclose(levels[1:] / levels[:-1], levels[1] / levels[0])  # a constant ratio
    np.testing.assert_allclose(L.contour_levels(1.0, 5.0), np.linspace(1.0, 5.0, 21))
    assert L.contour_levels(2.0, 2.0) is None
