"""AMP's efficient mode ``every=k``: a fresh Δ (Algorithm 1) on steps 0, k, 2k, …; in between, the kept Δ at the
current θ (``reuse="delta"``) or LookSAM's reused orthogonal gradient (``reuse="gradient"``).

The reference is written here from the equations on a flat float64 parameter vector (``perturb_helpers.FlatNet``)
with PyTorch's SGD (momentum, weight decay) by hand. ``every=1`` is compared bit for bit with a frozen copy of AMP's
step as it was before the mode existed (on the same engine).
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from perturb_helpers import FlatNet, flat_params, make_batches, make_closure, make_model, project, ref_sgd, run_opt
from torch import nn

import advreg
from advreg.config import TrainConfig
from advreg.methods import resolve
from advreg.perturb.engine import PerturbedOptimizer, global_norm, grads_of, scratch, set_to_sum
from advreg.stages import build_optimizer
from advreg.train import train

LR, MOMENTUM, WD = 0.1, 0.9, 1e-3


def amp(model, every, **kw):
    settings = {
        "epsilon": 0.5,
        "inner_lr": 1.0,
        "inner_steps": 1,
        "norm": "global",
        "lr": LR,
        "momentum": MOMENTUM,
        "weight_decay": WD,
    }
    settings.update(kw)
    return advreg.AMP(model.parameters(), torch.optim.SGD, every=every, **settings)


# --------------------------------------------------------------------------------------------- reference
def flat_problem(model, norm, epsilon):
    """On a flat parameter vector: loss_grad(θ, x, y) = (J, ∇J); chunks(v), the whole vector or its per-tensor
    pieces; project(Δ), Algorithm 1's lines 8-10 on each chunk."""
    net = FlatNet(model)

    def chunks(v):
        return [v] if norm == "global" else list(v.split(net.sizes))

    return net.loss_grad, chunks, lambda delta: project(delta, epsilon, norm, net.sizes)


def algorithm_1(loss_grad, project, theta, x, y, inner_lr, inner_steps):
    """Lines 4-10: (the loss at θ, the clean gradient ∇J(θ), Δ after N projected ascent steps)."""
    delta, returned, clean = torch.zeros_like(theta), None, None
    for _ in range(inner_steps):
        loss, g = loss_grad(theta + delta, x, y)
        if returned is None:
            returned, clean = loss, g
        delta = project(delta + inner_lr * g)
    return returned, clean, delta


def reference(model, batches, *, every, epsilon, inner_lr, inner_steps, norm):
    """Refresh steps (t % k == 0): Algorithm 1, lines 4-13, and Δ kept. Other steps: g = ∇J(θ_t + Δ_kept) at the
    current θ_t, θ_{t+1} from SGD at θ_t. Returns (returned losses, trajectory)."""
    loss_grad, chunks, project = flat_problem(model, norm, epsilon)

    theta, buf, kept = flat_params(model), None, None
    losses, traj = [], []
    for t, (x, y) in enumerate(batches):
        if t % every == 0:
            returned, _, delta = algorithm_1(loss_grad, project, theta, x, y, inner_lr, inner_steps)
            kept = delta
            _, g = loss_grad(theta + delta, x, y)
        else:
            returned, g = loss_grad(theta + kept, x, y)  # the kept Δ on the current θ
        theta, buf = ref_sgd(theta, g, buf, LR, MOMENTUM, WD)
        losses.append(float(returned))
        traj.append(theta)
    return losses, traj


def gradient_reuse_reference(model, batches, *, every, epsilon, inner_lr, inner_steps, norm, alpha):
    """LookSAM (Liu et al. 2022, Alg. 1) with AMP's Δ. Refresh steps: Algorithm 1 of AMP; with g = ∇J(θ) and
    g_s = ∇J(θ+Δ), keep v̂ = g_v/‖g_v‖, g_v = g_s − (⟨g_s, g⟩/‖g‖²)·g. Other steps: g = ∇J(θ_t), step with
    g + α‖g‖·v̂. Per tensor under norm="per_tensor". Returns (returned losses, trajectory)."""
    loss_grad, chunks, project = flat_problem(model, norm, epsilon)

    theta, buf, unit = flat_params(model), None, None
    losses, traj = [], []
    for t, (x, y) in enumerate(batches):
        if t % every == 0:
            returned, clean, delta = algorithm_1(loss_grad, project, theta, x, y, inner_lr, inner_steps)
            _, g = loss_grad(theta + delta, x, y)
            parts = [gs - (gs @ d) / (d @ d) * d for gs, d in zip(chunks(g), chunks(clean))]
            unit = torch.cat([v / v.norm() for v in parts])
        else:
            returned, g0 = loss_grad(theta, x, y)
            g = torch.cat([gc + alpha * gc.norm() * uc for gc, uc in zip(chunks(g0), chunks(unit))])
        theta, buf = ref_sgd(theta, g, buf, LR, MOMENTUM, WD)
        losses.append(float(returned))
        traj.append(theta)
    return losses, traj


class FrozenAMP(PerturbedOptimizer):
    """AMP's Δ before ``every`` existed (commit ce8c71b), frozen here: k = 1 must stay that AMP, bit for bit."""

    def __init__(self, params, base_optimizer, *, epsilon, inner_lr, inner_steps=1, norm="global", **base_kwargs):
        self.epsilon, self.inner_lr, self.inner_steps, self.norm = epsilon, inner_lr, inner_steps, norm
        super().__init__(params, base_optimizer, **base_kwargs)
        self._delta = {}

    def _is_active(self):
        return self.epsilon > 0 and self.inner_steps > 0

    def _perturb(self, params, theta):
        if self.inner_steps == 1:
            grads = grads_of(params)
            torch._foreach_mul_(grads, self._scales(grads, self.inner_lr))
            torch._foreach_add_(params, grads)
            return
        delta = scratch(self._delta, params)
        torch._foreach_zero_(delta)
        for n in range(self.inner_steps):
            if n > 0:
                yield
            torch._foreach_add_(delta, grads_of(params), alpha=self.inner_lr)
            torch._foreach_mul_(delta, self._scales(delta, 1.0))
            set_to_sum(params, theta, delta)

    def _scales(self, tensors, cap):
        if self.norm == "global":
            return (self.epsilon / global_norm(tensors)).clamp(max=cap)
        return list((self.epsilon / torch.stack(torch._foreach_norm(tensors))).clamp(max=cap).unbind())


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("norm", ["global", "per_tensor"])
@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reuse", ["delta", "gradient"])
def test_every_1_is_amp_bit_for_bit(inner_steps, norm, dtype, reuse):
    batches = make_batches(6, seed=2, dtype=dtype)
    model_a = make_model(1, dtype=dtype)
    model_b = copy.deepcopy(model_a)
    kw = {"inner_steps": inner_steps, "norm": norm, "inner_lr": 3.0}
    plain = FrozenAMP(
        model_a.parameters(), torch.optim.SGD, epsilon=0.5, lr=LR, momentum=MOMENTUM, weight_decay=WD, **kw
    )
    losses_a, calls_a, traj_a = run_opt(plain, model_a, batches)
    losses_b, calls_b, traj_b = run_opt(amp(model_b, 1, reuse=reuse, **kw), model_b, batches)
    assert losses_a == losses_b and calls_a == calls_b == [inner_steps + 1] * 6
    assert all(torch.equal(a, b) for a, b in zip(traj_a, traj_b))


@pytest.mark.parametrize("reuse", ["delta", "gradient"])
@pytest.mark.parametrize("norm", ["global", "per_tensor"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_every_3_matches_the_reference(inner_steps, norm, reuse):
    batches = make_batches(8, seed=3 if reuse == "delta" else 12)
    model = make_model(2 if reuse == "delta" else 9)
    ref_model = copy.deepcopy(model)
    kw = {"epsilon": 0.5, "inner_lr": 1.0, "inner_steps": inner_steps, "norm": norm}
    if reuse == "delta":
        run_reference = functools.partial(reference, ref_model, batches, **kw)
    else:
        run_reference = functools.partial(gradient_reuse_reference, ref_model, batches, alpha=0.7, **kw)
    losses, calls, traj = run_opt(amp(model, 3, reuse=reuse, alpha=0.7, **kw), model, batches)
    ref_losses, ref = run_reference(every=3)
    for t, (a, b) in enumerate(zip(traj, ref)):
        assert (a - b).abs().max().item() <= 1e-10, f"step {t}"
    assert [float(loss) for loss in losses] == pytest.approx(
        ref_losses, abs=1e-12
    )  # θ+Δ_kept's loss (delta) or θ's (gradient) in between
    assert calls == [inner_steps + 1 if t % 3 == 0 else 1 for t in range(8)]
    # the mode matters here: AMP itself (k = 1), or for the gradient the steps in between without v̂ (α = 0),
    # end elsewhere
    if reuse == "delta":
        _, other = run_reference(every=1)
    else:
        _, other = gradient_reuse_reference(ref_model, batches, every=3, alpha=0.0, **kw)
    assert (ref[-1] - other[-1]).abs().max() > 1e-6


def test_weights_are_restored_to_the_current_theta_every_step():
    model = make_model(3)
    opt = amp(model, 3, lr=0.0, momentum=0.0, weight_decay=0.0, inner_steps=2)
    before = flat_params(model)
    for x, y in make_batches(7, seed=4):
        run_opt(opt, model, [(x, y)])
        assert torch.equal(flat_params(model), before)


def test_the_closure_sees_the_kept_delta_on_the_moving_theta():
    """Between refreshes the closure runs at θ_t + Δ_kept, θ_t the current weights (not the refresh step's)."""
    model = make_model(4)
    opt = amp(model, 4, inner_lr=100.0)
    batches = make_batches(4, seed=5)
    seen, thetas = [], []
    for x, y in batches:
        thetas.append(flat_params(model))
        opt.step(make_closure(opt, model, x, y, seen))
    delta = seen[1] - thetas[0]  # step 0: clean pass (seen[0]), then the pass at θ_0 + Δ
    assert delta.norm().item() == pytest.approx(0.5, rel=1e-9)  # on the sphere: ζ‖g‖ > ε
    for t in (1, 2, 3):
        assert torch.allclose(seen[t + 1], thetas[t] + delta, rtol=0, atol=1e-12)
        assert not torch.equal(thetas[t], thetas[0])


def test_a_parameter_without_gradient_at_the_refresh_has_zero_delta():
    torch.manual_seed(0)
    trunk, head_a, head_b = nn.Linear(5, 4).double(), nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    modules = nn.ModuleList([trunk, head_a, head_b])
    opt = advreg.AMP(modules.parameters(), torch.optim.SGD, epsilon=0.5, inner_lr=1.0, every=2, lr=0.0)
    ((x, y),) = make_batches(1, seed=6)
    head_b_theta = [p.detach().clone() for p in head_b.parameters()]
    seen = {}

    def closure(use_b):
        def run():
            opt.zero_grad()
            out = head_a(trunk(x)) + (head_b(trunk(x)) if use_b else 0)
            seen["b"] = [p.detach().clone() for p in head_b.parameters()]
            seen["a"] = [p.detach().clone() for p in head_a.parameters()]
            loss = F.cross_entropy(out, y)
            loss.backward()
            return loss

        return run

    a_theta = [p.detach().clone() for p in head_a.parameters()]
    opt.step(closure(use_b=False))  # refresh: head_b has no gradient
    opt.step(closure(use_b=True))  # in between: head_b takes part, at Δ = 0
    assert all(torch.equal(s, t) for s, t in zip(seen["b"], head_b_theta))
    assert not all(torch.equal(s, t) for s, t in zip(seen["a"], a_theta))  # head_a is perturbed
    kept = opt.state_dict()["perturbation"]["kept"]
    assert [d.abs().max().item() for d in kept[-2:]] == [0.0, 0.0]


@pytest.mark.parametrize("reuse", ["delta", "gradient"])
def test_batchnorm_statistics_count_each_step_once(reuse):
    model = make_model(5, batchnorm=True)
    opt = amp(model, 3, inner_steps=2, reuse=reuse)
    run_opt(opt, model, make_batches(5, seed=7))
    assert int(model[1].num_batches_tracked) == 5  # the clean pass on a refresh, the single pass in between


@pytest.mark.parametrize("reuse", ["delta", "gradient"])
@pytest.mark.parametrize("cut", [1, 2, 4])
def test_state_dict_round_trip_mid_cycle(cut, reuse):
    batches = make_batches(9, seed=8)
    model = make_model(6)
    opt = amp(model, 3, inner_steps=2, reuse=reuse)
    run_opt(opt, model, batches[:cut])
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    losses, calls, _ = run_opt(opt, model, batches[cut:])

    def resumed(state):
        fresh = make_model(99)
        fresh.load_state_dict(saved_model)
        opt2 = amp(fresh, 3, inner_steps=2)  # reuse comes from the state, as the other settings
        opt2.load_state_dict(state)
        return run_opt(opt2, fresh, batches[cut:]), flat_params(fresh)

    (losses2, calls2, _), theta2 = resumed(saved_opt)
    assert losses2 == losses and calls2 == calls and torch.equal(theta2, flat_params(model))
    assert saved_opt["perturbation"]["steps_taken"] == cut
    # control: without the kept tensor the resumed run builds a fresh Δ and differs (the kept one matters)
    no_delta = copy.deepcopy(saved_opt)
    del no_delta["perturbation"]["kept"]
    (_, calls3, _), theta3 = resumed(no_delta)
    assert calls3[0] == 3 and not torch.equal(theta3, flat_params(model))


def test_the_state_loads_with_weights_only(tmp_path):
    model = make_model(7)
    opt = amp(model, 4)
    run_opt(opt, model, make_batches(2, seed=9))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert state["perturbation"]["every"] == 4 and len(state["perturbation"]["kept"]) == 4
    opt2 = amp(make_model(7), 4)
    opt2.load_state_dict(state)
    bad = copy.deepcopy(state)
    bad["perturbation"]["kept"] = bad["perturbation"]["kept"][:2]
    with pytest.raises(ValueError, match="kept tensors"):
        amp(make_model(7), 4).load_state_dict(bad)


def scaled_closure(opt, model, x, y, scaler, calls, inf_at=None):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if len(calls) == inf_at:
            model[0].weight.grad.view(-1)[0] = float("inf")
        calls.append(1)
        return loss

    return closure


@pytest.mark.parametrize("inf_at", [0, 1])  # the refresh's clean pass, or its final pass at θ+Δ
@pytest.mark.parametrize("reuse", ["delta", "gradient"])
def test_under_a_grad_scaler_the_steps_are_unchanged_and_an_overflowed_refresh_is_redone(reuse, inf_at):
    model = make_model(8, dtype=torch.float32)
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled, plain = amp(model, 3, grad_scaler=scaler, reuse=reuse), amp(twin, 3, reuse=reuse)
    for x, y in make_batches(5, seed=10, dtype=torch.float32):  # a power-of-two scale changes nothing
        scaled.step(scaled_closure(scaled, model, x, y, scaler, []))
        scaler.update()
        run_opt(plain, twin, [(x, y)])
    assert torch.equal(flat_params(model), flat_params(twin))
    ((x, y),) = make_batches(1, seed=11, dtype=torch.float32)
    calls = [[] for _ in range(4)]
    scaled.step(scaled_closure(scaled, model, x, y, scaler, calls[0]))  # step 5: in between
    scaler.update()
    theta = flat_params(model)
    scaled.step(scaled_closure(scaled, model, x, y, scaler, calls[1], inf_at=inf_at))  # step 6: refresh, overflows
    scaler.update()
    assert torch.equal(flat_params(model), theta) and scaler.get_scale() == 2.0**9  # skipped
    for c in calls[2:]:
        scaled.step(scaled_closure(scaled, model, x, y, scaler, c))
        scaler.update()
    # a Δ built from an overflowed clean pass, and a v̂ from any overflowed pass, are dropped: a fresh Δ follows;
    # a Δ from a finite clean pass is good (only the final gradient overflowed), so the step after reuses it
    redone = reuse == "gradient" or inf_at == 0
    assert [len(c) for c in calls] == [1, 2, 2 if redone else 1, 1]
    assert scaler.get_scale() == 2.0**9 and torch.isfinite(flat_params(model)).all()  # no further skip


@pytest.mark.parametrize("every", [0, -1, 1.5, 2.0, "2", True, None])
def test_bad_every_raises(every):
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        amp(make_model(0), every)


def test_config_key_reaches_the_optimizer():
    config = resolve(TrainConfig(method="amp"), ["amp.every=4", "amp.reuse=gradient", "amp.alpha=0.5"])
    opt = build_optimizer(config, make_model(0).parameters())
    assert (opt.every, opt.reuse, opt.alpha) == (4, "gradient", 0.5)
    assert opt.state_dict()["perturbation"]["every"] == 4


@pytest.mark.parametrize("norm", ["global", "per_tensor"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_gradient_reuse_keeps_a_unit_vector_orthogonal_to_the_clean_gradient(inner_steps, norm):
    model = make_model(10)
    opt = amp(model, 4, reuse="gradient", inner_steps=inner_steps, norm=norm, lr=0.0, momentum=0.0, weight_decay=0.0)
    ((x, y),) = make_batches(1, seed=13)
    loss = F.cross_entropy(model(x), y)
    clean = torch.autograd.grad(loss, list(model.parameters()))
    run_opt(opt, model, [(x, y)])
    units = opt.state_dict()["perturbation"]["kept"]
    pieces = [(torch.cat([u.reshape(-1) for u in units]), torch.cat([g.reshape(-1) for g in clean]))]
    if norm == "per_tensor":
        pieces = [(u.reshape(-1), g.reshape(-1)) for u, g in zip(units, clean)]
    for unit, g in pieces:
        assert unit.norm().item() == pytest.approx(1.0, abs=1e-12)
        assert abs((unit @ g).item()) <= 1e-12 * g.norm().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradient_reuse_in_half_precision_is_finite_and_orthogonal(dtype):
    """Tiny half-precision gradients: products and squares accumulate in float32, so v̂ neither vanishes into the
    clean gradient's direction nor overflows."""
    model = make_model(11, dtype=dtype)
    opt = amp(model, 4, reuse="gradient", inner_lr=1e6, lr=0.0, momentum=0.0, weight_decay=0.0)  # ‖Δ‖ = ε
    ((x, y),) = make_batches(1, seed=14, dtype=dtype)
    clean = None
    for scale in (1e-3, 1e-5):

        def closure():
            nonlocal clean
            opt.zero_grad()
            loss = scale * F.cross_entropy(model(x).float(), y)
            loss.backward()
            if clean is None:
                clean = torch.cat([p.grad.float().reshape(-1) for p in model.parameters()])
            return loss

        clean, opt.steps_taken = None, 0
        opt.step(closure)
        unit = torch.cat([k.float().reshape(-1) for k in opt.state_dict()["perturbation"]["kept"]])
        assert torch.isfinite(unit).all() and unit.norm().item() == pytest.approx(1.0, abs=0.02)
        assert abs((unit @ clean).item()) <= 0.05 * clean.norm().item(), scale


def test_a_state_saved_before_reuse_existed_loads_as_the_kept_delta():
    model = make_model(12)
    opt = amp(model, 3)
    run_opt(opt, model, make_batches(1, seed=15))
    old = copy.deepcopy(opt.state_dict())
    old["perturbation"]["delta"] = old["perturbation"].pop("kept")
    del old["perturbation"]["reuse"], old["perturbation"]["alpha"]
    fresh = amp(copy.deepcopy(model), 3, reuse="gradient")
    fresh.load_state_dict(old)
    assert fresh.reuse == "delta" and torch.equal(
        fresh.state_dict()["perturbation"]["kept"][0], opt.state_dict()["perturbation"]["kept"][0]
    )


@pytest.mark.parametrize("reuse", ["delta", "gradient"])
def test_a_parameter_group_added_mid_cycle_starts_a_fresh_delta(reuse):
    model = make_model(13)
    extra = nn.Linear(3, 3).double()
    opt = amp(model, 3, reuse=reuse)
    batches = make_batches(2, seed=16)
    run_opt(opt, model, batches[:1])
    opt.add_param_group({"params": list(extra.parameters())})
    assert "kept" not in opt.state_dict()["perturbation"]
    _, calls, _ = run_opt(opt, model, batches[1:])
    assert calls == [2]


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"reuse": "theta"}, "reuse must be one of"),
        ({"reuse": "gradient", "alpha": -0.1}, "alpha must be a number >= 0"),
        ({"alpha": float("nan")}, "alpha must be a number >= 0"),
        ({"alpha": float("inf")}, "alpha must be finite"),
    ],
)
def test_bad_reuse_settings_raise(setting, message):
    with pytest.raises(ValueError, match=message):
        amp(make_model(0), 4, **setting)


@pytest.mark.parametrize("reuse", ["delta", "gradient"])
def test_an_interrupted_run_resumes_mid_cycle_to_the_same_numbers(tmp_path, interrupted_then_resumed, reuse):
    """18 steps an epoch with k = 5: the run is cut at step 36, one step after a refresh."""
    config = resolve(
        TrainConfig(method="amp", epochs=4),
        ["model.hidden=16", "optim.batch_size=200", "amp.every=5", f"amp.reuse={reuse}"],
    )
    whole = train(config, tmp_path / "whole", progress=False)
    drop = lambda m: {k: v for k, v in m.items() if "seconds" not in k}
    assert drop(interrupted_then_resumed(config)) == drop(whole)
