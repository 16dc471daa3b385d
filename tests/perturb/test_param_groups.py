"""The perturbations' hyperparameters live in ``param_groups`` (as ``lr`` does): per-group values, scheduling,
``state_dict``, old checkpoints, and what a per-group ε means for the global ball.

The references are written here on one flat float64 parameter vector: with ``norm="global"`` the groups that agree
on (ε, ζ, N) share one ball, each ball is Algorithm 1 of the AMP paper on its own part of Δ (N_B ascent steps,
then it keeps its Δ), and the gradient of the outer step is taken at θ+Δ of all balls together.
"""

import copy

import pytest
import torch
from perturb_helpers import DT, FlatNet, flat_params, make_batches, make_closure, make_model, ref_sgd, run_opt
from torch import nn

import advreg
import advreg.perturb

LR, MOMENTUM = 0.1, 0.9


def two_groups(model, first, second):
    """Param groups: the first layer with settings ``first``, the second layer with ``second``."""
    return [{"params": list(model[0].parameters()), **first}, {"params": list(model[2].parameters()), **second}]


def group_masks(model):
    """The flat positions of the first and of the second layer."""
    sizes = [sum(p.numel() for p in model[0].parameters()), sum(p.numel() for p in model[2].parameters())]
    first = torch.zeros(sum(sizes), dtype=torch.bool)
    first[: sizes[0]] = True
    return [first, ~first]


def ref_balls_gradient(loss_grad, theta, x, y, balls):
    """balls: (mask, ε, ζ, N) each; Algorithm 1 per ball, all balls moving together; returns (loss at θ, ∇J(θ+Δ))."""
    delta = torch.zeros_like(theta)
    loss0, g = loss_grad(theta, x, y)
    for n in range(max(b[3] for b in balls)):
        if n > 0:
            _, g = loss_grad(theta + delta, x, y)
        for mask, eps, zeta, steps in balls:
            if n < steps and eps > 0:
                d = delta[mask] + zeta * g[mask]
                delta[mask] = d * (eps / d.norm()) if d.norm() > eps else d
    return loss0, loss_grad(theta + delta, x, y)[1]


def ref_run(model, batches, gradient):
    """SGD with momentum (torch's update) on the flat vector, with ``gradient(theta, x, y)``."""
    theta, buf, traj = flat_params(model), None, []
    for x, y in batches:
        _, g = gradient(theta, x, y)
        theta, buf = ref_sgd(theta, g, buf, LR, MOMENTUM)
        traj.append(theta)
    return traj


# ---------------------------------------------------------------------------------- AMP per group
@pytest.mark.parametrize(
    "first, second",
    [
        ({"epsilon": 0.02}, {}),  # own ε, the default ζ and N
        ({"epsilon": 0.02, "inner_steps": 3, "inner_lr": 0.5}, {"inner_steps": 2}),  # own N each
        ({"inner_steps": 0}, {"inner_steps": 2}),  # the first layer not perturbed
        ({"epsilon": 0.0}, {}),
    ],
)
def test_amp_groups_are_balls_of_their_own_settings(first, second):
    model = make_model()
    ref_model, batches = copy.deepcopy(model), make_batches(4)
    defaults = {"epsilon": 0.3, "inner_lr": 2.0, "inner_steps": 1}
    opt = advreg.AMP(two_groups(model, first, second), torch.optim.SGD, **defaults, lr=LR, momentum=MOMENTUM)
    _, calls, traj = run_opt(opt, model, batches)
    settings = [{**defaults, **first}, {**defaults, **second}]
    balls = [(m, s["epsilon"], s["inner_lr"], s["inner_steps"]) for m, s in zip(group_masks(model), settings)]
    loss_grad = FlatNet(ref_model).loss_grad
    ref = ref_run(ref_model, batches, lambda th, x, y: ref_balls_gradient(loss_grad, th, x, y, balls))
    for a, b in zip(traj, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert calls == [max(s["inner_steps"] for s in settings) + 1] * len(batches)


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_groups_that_share_the_settings_share_one_ball_bit_for_bit(inner_steps):
    """Groups that differ only in the base optimizer's settings (here none): one ball, the paper's AMP exactly."""
    model_a = make_model()
    model_b, batches = copy.deepcopy(model_a), make_batches(4)
    kw = dict(epsilon=0.3, inner_lr=2.0, inner_steps=inner_steps, lr=LR, momentum=MOMENTUM)
    one = advreg.AMP(model_a.parameters(), torch.optim.SGD, **kw)
    split = advreg.AMP(two_groups(model_b, {}, {}), torch.optim.SGD, **kw)
    _, _, traj_a = run_opt(one, model_a, batches)
    _, _, traj_b = run_opt(split, model_b, batches)
    assert all(torch.equal(a, b) for a, b in zip(traj_a, traj_b))
    # and it is one ball: two balls of ε each would move further than ε in total
    ref = ref_run(
        copy.deepcopy(make_model()),
        batches,
        lambda th, x, y: ref_balls_gradient(
            FlatNet(model_a).loss_grad, th, x, y, [(torch.ones_like(th, dtype=torch.bool), 0.3, 2.0, inner_steps)]
        ),
    )
    torch.testing.assert_close(traj_b[-1], ref[-1], atol=1e-10, rtol=0)


def test_a_group_with_a_tiny_epsilon_barely_moves():
    model = make_model()
    opt = advreg.AMP(two_groups(model, {"epsilon": 1e-6}, {}), torch.optim.SGD, epsilon=0.5, inner_lr=10.0, lr=LR)
    x, y = make_batches(1)[0]
    theta, seen = flat_params(model), []
    opt.step(make_closure(opt, model, x, y, seen))
    moved = [(seen[1] - theta)[mask].norm() for mask in group_masks(model)]  # ‖Δ‖ of each layer at θ+Δ
    assert moved[0] <= 1e-6 * (1 + 1e-9)
    assert 0.4 < moved[1] <= 0.5 * (1 + 1e-9)


def test_all_groups_off_is_the_base_optimizer_bit_for_bit():
    model_a = make_model()
    model_b, batches = copy.deepcopy(model_a), make_batches(3)
    opt = advreg.AMP(
        two_groups(model_a, {"epsilon": 0.0}, {"inner_steps": 0}),
        torch.optim.SGD,
        epsilon=0.5,
        inner_lr=1.0,
        lr=LR,
        momentum=MOMENTUM,
    )
    sgd = torch.optim.SGD(model_b.parameters(), lr=LR, momentum=MOMENTUM)
    _, calls, traj = run_opt(opt, model_a, batches)
    for (x, y), t in zip(batches, traj):
        sgd.step(make_closure(sgd, model_b, x, y))
        assert torch.equal(flat_params(model_b), t)
    assert calls == [1] * len(batches)


# ------------------------------------------------------------------- scheduling, attributes, state
class RhoFollowsLr:
    """A scheduler-like object for GSAM's convention ρ_t = ρ_0·lr_t/lr_0, written on the param groups."""

    def __init__(self, opt):
        self.opt, self.ratio = opt, [g["rho"] / g["lr"] for g in opt.param_groups]

    def step(self):
        for group, ratio in zip(self.opt.param_groups, self.ratio):
            group["rho"] = ratio * group["lr"]


def test_a_scheduler_can_move_rho_with_the_lr():
    model = make_model()
    opt = advreg.SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=LR)
    lr_schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    rho_schedule = RhoFollowsLr(opt)
    for k, (x, y) in enumerate(make_batches(3)):
        theta, seen = flat_params(model), []
        opt.step(make_closure(opt, model, x, y, seen))
        assert (seen[1] - theta).norm().item() == pytest.approx(0.2 * 0.5**k, rel=1e-9)  # ‖Δ‖ = ρ_t
        lr_schedule.step()
        rho_schedule.step()


def test_the_attribute_reads_and_sets_the_shared_value():
    model = make_model()
    opt = advreg.AMP(model.parameters(), torch.optim.SGD, epsilon=0.3, inner_lr=1.0, lr=LR)
    assert opt.epsilon == 0.3
    opt.epsilon = 0.1
    assert [g["epsilon"] for g in opt.param_groups] == [0.1]
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=DT))], "epsilon": 0.7})
    assert opt.param_groups[1]["inner_lr"] == 1.0  # the defaults fill a new group, as lr
    with pytest.raises(ValueError, match="param_groups"):
        _ = opt.epsilon
    with pytest.raises(ValueError, match="epsilon"):
        opt.epsilon = -1.0


def test_a_bad_group_value_raises():
    model = make_model()
    with pytest.raises(ValueError, match="inner_steps"):
        advreg.AMP(two_groups(model, {"inner_steps": 1.5}, {}), torch.optim.SGD, epsilon=0.3, inner_lr=1.0, lr=LR)
    opt = advreg.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=LR)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=DT))], "rho": -0.1})
    opt.param_groups[0]["rho"] = float("nan")  # as a faulty scheduler would
    x, y = make_batches(1)[0]
    with pytest.raises(ValueError, match="rho"):
        opt.step(make_closure(opt, model, x, y))


def test_state_dict_carries_the_group_values():
    model = make_model()
    opt = advreg.AMP(
        two_groups(model, {"epsilon": 0.02, "inner_steps": 2}, {}),
        torch.optim.SGD,
        epsilon=0.3,
        inner_lr=1.0,
        lr=LR,
        momentum=MOMENTUM,
    )
    x, y = make_batches(1)[0]
    opt.step(make_closure(opt, model, x, y))
    state = opt.state_dict()
    assert [(g["epsilon"], g["inner_steps"]) for g in state["param_groups"]] == [(0.02, 2), (0.3, 1)]
    fresh = advreg.AMP(
        two_groups(copy.deepcopy(model), {}, {}), torch.optim.SGD, epsilon=0.9, inner_lr=3.0, lr=LR, momentum=MOMENTUM
    )
    fresh.load_state_dict(state)
    assert [(g["epsilon"], g["inner_lr"], g["inner_steps"]) for g in fresh.param_groups] == [
        (0.02, 1.0, 2),
        (0.3, 1.0, 1),
    ]


def test_an_old_checkpoint_without_group_keys_loads():
    """Saved before the settings moved into the groups: they were one global value in "perturbation"."""
    model = make_model()
    opt = advreg.AMP(model.parameters(), torch.optim.SGD, epsilon=0.3, inner_lr=2.0, inner_steps=2, lr=LR)
    old = opt.state_dict()
    for group in old["param_groups"]:
        for key in ("epsilon", "inner_lr", "inner_steps"):
            del group[key]
    old["perturbation"].update(epsilon=0.3, inner_lr=2.0, inner_steps=2)
    fresh = advreg.AMP(model.parameters(), torch.optim.SGD, epsilon=0.9, inner_lr=1.0, lr=LR)
    fresh.load_state_dict(old)
    assert (fresh.epsilon, fresh.inner_lr, fresh.inner_steps) == (0.3, 2.0, 2)
    del old["perturbation"]["epsilon"]  # a key saved nowhere keeps this optimizer's own value
    other = advreg.AMP(model.parameters(), torch.optim.SGD, epsilon=0.9, inner_lr=1.0, lr=LR)
    other.load_state_dict(old)
    assert (other.epsilon, other.inner_lr) == (0.9, 2.0)


# --------------------------------------------------------------------------- the other perturbations
def test_sam_groups_of_different_rho_are_normalized_apart():
    model = make_model()
    opt = advreg.SAM(two_groups(model, {"rho": 0.01}, {}), torch.optim.SGD, rho=0.2, lr=LR)
    x, y = make_batches(1)[0]
    theta, seen = flat_params(model), []
    opt.step(make_closure(opt, model, x, y, seen))
    _, g = FlatNet(model).loss_grad(theta, x, y)
    delta = torch.zeros_like(theta)
    for mask, rho in zip(group_masks(model), (0.01, 0.2)):  # Δ_B = ρ_B g_B/‖g_B‖
        delta[mask] = rho * g[mask] / g[mask].norm()
    torch.testing.assert_close(seen[1] - theta, delta, atol=1e-12, rtol=0)


def test_rmp_and_awp_groups_take_their_own_radius():
    model = make_model()
    x, y = make_batches(1)[0]
    for opt, check in [
        (
            advreg.perturb.RMP(two_groups(model, {"epsilon": 1e-3}, {}), torch.optim.SGD, epsilon=0.5, lr=LR),
            lambda d, m: [d[m[0]].norm() <= 1e-3, 1e-3 < d[m[1]].norm() <= 0.5],
        ),
        (
            advreg.perturb.AWP(two_groups(model, {"gamma": 0.0}, {}), torch.optim.SGD, gamma=0.01, lr=LR),
            lambda d, m: [d[m[0]].norm() == 0, d[m[1]].norm() > 0],
        ),
    ]:
        theta, seen = flat_params(model), []
        opt.step(make_closure(opt, model, x, y, seen))
        assert all(check(seen[-1] - theta, group_masks(model)))
        with torch.no_grad():  # back to the same θ for the next one
            torch.nn.utils.vector_to_parameters(theta, model.parameters())
