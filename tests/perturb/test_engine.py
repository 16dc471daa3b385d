"""The engine's own contract: construction checks, foreign state, BatchNorm freezing, saved settings."""

import copy

import pytest
import torch
import torch.nn.functional as F
from perturb_helpers import make_closure
from torch import nn

import advreg


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _step(opt, model, x, y):
    return opt.step(make_closure(opt, model, x, y))


def test_base_optimizer_must_be_a_class():
    model = _model()
    with pytest.raises(ValueError, match="optimizer class"):
        advreg.AMP(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), epsilon=0.1, inner_lr=1)
    with pytest.raises(ValueError, match="bn_stats"):
        advreg.SAM(model.parameters(), torch.optim.SGD, rho=0.1, bn_stats="sometimes", lr=0.1)


def test_state_dict_keeps_the_settings_and_refuses_a_foreign_one():
    model = _model()
    amp = advreg.AMP(model.parameters(), torch.optim.SGD, epsilon=0.3, inner_lr=2.0, inner_steps=2, lr=0.1)
    state = amp.state_dict()
    assert state["perturbation"] == {"norm": "global", "every": 1, "reuse": "delta", "alpha": 0.7, "steps_taken": 0}
    assert [(g["epsilon"], g["inner_lr"], g["inner_steps"]) for g in state["param_groups"]] == [(0.3, 2.0, 2)]
    other = advreg.AMP(model.parameters(), torch.optim.SGD, epsilon=0.1, inner_lr=1.0, lr=0.1)
    other.load_state_dict(state)
    assert (other.epsilon, other.inner_lr, other.inner_steps) == (0.3, 2.0, 2)
    assert other.state is other.base_optimizer.state and other.param_groups is other.base_optimizer.param_groups
    sam = advreg.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        sam.load_state_dict(state)


def _two_models_closure(opt, owned, other, x, y):
    def closure():  # a second model runs inside the same step
        opt.zero_grad()
        other(x)
        loss = F.cross_entropy(owned(x), y)
        loss.backward()
        return loss

    return closure


def test_without_model_every_norm_layer_that_runs_in_the_step_is_frozen():
    owned, other = _model(), _model()
    opt = advreg.AMP(owned.parameters(), torch.optim.SGD, epsilon=0.5, inner_lr=1.0, lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt.step(_two_models_closure(opt, owned, other, x, y))
    assert owned[1].num_batches_tracked.item() == 1  # the clean pass only
    assert other[1].num_batches_tracked.item() == 1  # it ran in the perturbed pass too, which counts for no layer


def test_with_model_only_its_norm_layers_are_frozen():
    owned, other = _model(), _model()
    opt = advreg.AMP(owned.parameters(), torch.optim.SGD, epsilon=0.5, inner_lr=1.0, lr=0.1, model=owned)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt.step(_two_models_closure(opt, owned, other, x, y))
    assert owned[1].num_batches_tracked.item() == 1
    assert other[1].num_batches_tracked.item() == 2  # not the model being trained: both of its passes count


@pytest.mark.parametrize("given_model", [True, False])
def test_a_frozen_norm_layer_keeps_the_clean_pass_statistics(given_model):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model[1].requires_grad_(False)  # fine-tuning: frozen affine weights, still in train mode
    clean = copy.deepcopy(model)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    clean(x)  # the one pass at θ whose statistics count
    opt = advreg.AMP(
        model.parameters(),
        torch.optim.SGD,
        epsilon=0.5,
        inner_lr=1.0,
        inner_steps=3,
        lr=0.1,
        **({"model": model} if given_model else {}),
    )
    _step(opt, model, x, y)
    assert model[1].num_batches_tracked.item() == 1  # 4 passes, 1 counted
    assert torch.equal(model[1].running_mean, clean[1].running_mean)
    assert torch.equal(model[1].running_var, clean[1].running_var)


def test_repr_names_the_settings():
    model = _model()
    text = repr(advreg.SAM(model.parameters(), torch.optim.SGD, rho=0.2, adaptive=True, lr=0.1))
    assert text.startswith("SAM(rho=0.2, eta=0.01, adaptive=True") and "SGD" in text


# -- the subclass interface: a step's plan ---------------------------------------------------------------------------
RHO, LR = 0.05, 0.1


class Planned(advreg.PerturbedOptimizer):
    """Δ = ρ·sign(∇J(θ)) (ρ·1 without a clean gradient), under the plan that the test gives; ``double``, a
    ``before_base_step``, records the weights it sees and doubles the gradient."""

    def __init__(self, params, **plan):
        super().__init__(params, torch.optim.SGD, lr=LR)
        self.plan, self.seen = plan, []

    def _is_active(self):
        return True

    def _plan(self):
        return advreg.perturb.StepPlan(**{"before_base_step": self.double, **self.plan})

    def _perturb(self, params, theta):
        for p in params:
            p.add_(p.grad.sign() if p.grad is not None else torch.ones_like(p), alpha=RHO)

    def double(self):
        params = [p for group in self.param_groups for p in group["params"]]
        self.seen.append([p.detach().clone() for p in params])
        for p in params:
            p.grad.mul_(2)


def _linear_problem():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))

    def loss_grad(theta):  # J and ∇J at the weights theta (a list like model.parameters())
        theta = [t.detach().requires_grad_(True) for t in theta]
        loss = F.cross_entropy(x @ theta[0].T + theta[1], y)
        return loss.detach(), torch.autograd.grad(loss, theta)

    return model, x, y, loss_grad


def _counted_step(opt, model, x, y):
    """(the loss that ``step`` returns, the closure's calls)."""
    seen = []
    return opt.step(make_closure(opt, model, x, y, seen)), len(seen)


@pytest.mark.parametrize("perturb", [True, False])
def test_the_plan_decides_the_passes_and_before_base_step_changes_the_gradient_at_theta(perturb):
    model, x, y, loss_grad = _linear_problem()
    theta = [p.detach().clone() for p in model.parameters()]
    opt = Planned(model.parameters(), perturb=perturb)
    loss, calls = _counted_step(opt, model, x, y)
    clean_loss, g = loss_grad(theta)
    if perturb:  # the gradient at θ + ρ·sign(∇J(θ))
        _, g = loss_grad([t + RHO * gt.sign() for t, gt in zip(theta, g)])
    assert calls == (2 if perturb else 1) and torch.equal(loss, clean_loss)
    assert all(torch.equal(a, b) for a, b in zip(opt.seen[0], theta))  # θ restored before the hook
    for p, t, gt in zip(model.parameters(), theta, g):
        torch.testing.assert_close(p.detach(), t - LR * 2 * gt, rtol=0, atol=1e-12)


def test_a_plan_without_a_clean_pass_takes_one_pass_at_theta_plus_delta_and_refuses_two_calls():
    model, x, y, loss_grad = _linear_problem()
    theta = [p.detach().clone() for p in model.parameters()]
    opt = Planned(model.parameters(), perturb=True, clean=False, before_base_step=None)
    loss, calls = _counted_step(opt, model, x, y)
    perturbed_loss, g = loss_grad([t + RHO for t in theta])  # Δ = ρ·1: no gradient before the pass
    assert calls == 1 and torch.equal(loss, perturbed_loss)
    for p, t, gt in zip(model.parameters(), theta, g):
        torch.testing.assert_close(p.detach(), t - LR * gt, rtol=0, atol=1e-12)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="takes one pass per step"):
        opt.first_step()
    opt.plan = {"perturb": True, "two_call_refusal": "this test's reason"}
    with pytest.raises(ValueError, match="this test's reason"):
        opt.first_step()


def test_the_two_call_form_follows_the_plan_as_step_closure_does():
    model, x, y, _ = _linear_problem()
    twin = copy.deepcopy(model)
    by_closure, by_two_calls = Planned(model.parameters(), perturb=True), Planned(twin.parameters(), perturb=True)
    for _ in range(3):
        _counted_step(by_closure, model, x, y)
        F.cross_entropy(twin(x), y).backward()
        by_two_calls.first_step(zero_grad=True)
        F.cross_entropy(twin(x), y).backward()
        by_two_calls.second_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert all(
        torch.equal(a, b) for seen_a, seen_b in zip(by_closure.seen, by_two_calls.seen) for a, b in zip(seen_a, seen_b)
    )
