"""Reference tests for AWP and RWP (Wu, Xia & Wang, NeurIPS 2020, Eq. 8, 10, 11, 15, Algorithm 2, Sec. 5.3).

The references below are written from the paper on plain tensors (per-layer norms, Eq. 15 projection,
η2 = γ/K2, SGD with momentum and weight decay by hand); nothing of ``advreg.perturb.awp`` but the two
classes is used.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from advreg.perturb import AWP, RWP

DT = torch.float64
LR, MOMENTUM, WD = 0.1, 0.9, 1e-3


# ----------------------------------------------------------------------------------------------- helpers
class Net(nn.Module):
    """Conv1d (bias) - Linear (bias) - BatchNorm1d - Tanh - Linear (bias), and a Linear whose gradient is 0."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, kernel_size=3)
        self.fc1 = nn.Linear(9, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)
        self.dead = nn.Linear(6, 3, bias=False)  # multiplied by 0 below: its gradient is exactly 0
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = torch.tanh(self.bn(self.fc1(self.conv(x).flatten(1))))
        return self.fc2(self.drop(h)) + 0.0 * self.dead(h)


def make_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return Net(dropout).to(DT)


def make_batches(n, batch_size=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 2, 5, generator=gen, dtype=DT), torch.randint(0, 3, (batch_size,), generator=gen))
        for _ in range(n)
    ]


def make_closure(opt, model, x, y, seen=None, fail_at=None):
    """Records the parameters at every call in ``seen``; raises on call number ``fail_at`` (1-based)."""

    def closure():
        if seen is not None:
            seen.append([p.detach().clone() for p in model.parameters()])
            if len(seen) == fail_at:
                raise RuntimeError("closure failed")
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def grad_at(model, params, x, y):
    """∇ of the batch loss at ``params`` (a list in model.parameters() order), by torch.autograd.grad."""
    names = [n for n, _ in model.named_parameters()]
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    loss = F.cross_entropy(functional_call(model, dict(zip(names, leaves)), (x,)), y)
    return list(torch.autograd.grad(loss, leaves))


def norm(t):
    return torch.sqrt((t * t).sum())


def awp(model, **kw):
    kw = {"gamma": 0.05, "lr": LR, **kw}
    return AWP(model.parameters(), torch.optim.SGD, **kw)


# ----------------------------------------------------------------------- 1. one step lands on the sphere
def test_one_step_is_layer_normalized_gradient_on_the_sphere():
    gamma = 0.05
    model = make_model(0)
    ((x, y),) = make_batches(1)
    w = params_of(model)
    g = grad_at(copy.deepcopy(model), w, x, y)
    opt = awp(model, gamma=gamma, lr=0.0)
    seen = []
    opt.step(make_closure(opt, model, x, y, seen))
    assert len(seen) == 2
    assert all(torch.equal(a, b) for a, b in zip(seen[0], w))  # the first call is at w
    names = [n for n, _ in model.named_parameters()]
    n_layers = 0
    for name, w_l, g_l, p_l in zip(names, w, g, seen[1]):
        v = p_l - w_l
        if w_l.dim() <= 1:
            assert torch.equal(v, torch.zeros_like(v)), f"{name} (dim {w_l.dim()}) was perturbed"
        elif name == "dead.weight":
            assert torch.equal(g_l, torch.zeros_like(g_l)) and torch.equal(v, torch.zeros_like(v))
        else:
            n_layers += 1
            torch.testing.assert_close(v, gamma * norm(w_l) * g_l / norm(g_l), rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(norm(v), gamma * norm(w_l), rtol=1e-12, atol=0)
    assert n_layers == 3  # conv, fc1, fc2


# ------------------------------------------------------------------ 2. Algorithm 2, lines 11-15, K2 = 3
def ref_awp(model, batches, gamma, k2, eta2, lr, momentum, wd):
    """Algorithm 2 (A = 1) with SGD(momentum, weight decay) as line 15's update; returns the final weights."""
    w, buf = params_of(model), None
    for x, y in batches:
        v = [torch.zeros_like(t) for t in w]
        for _ in range(k2):  # lines 11-13
            g = grad_at(model, [a + b for a, b in zip(w, v)], x, y)
            for l, (w_l, g_l) in enumerate(zip(w, g)):
                if w_l.dim() <= 1 or norm(g_l) == 0:
                    continue
                v[l] = v[l] + eta2 * g_l / norm(g_l) * norm(w_l)  # Eq. 10
                if norm(v[l]) > gamma * norm(w_l):  # Eq. 15
                    v[l] = gamma * norm(w_l) / norm(v[l]) * v[l]
        g = grad_at(model, [a + b for a, b in zip(w, v)], x, y)
        d = [g_l + wd * w_l for g_l, w_l in zip(g, w)]  # line 15, through torch.optim.SGD's rule
        buf = [t.clone() for t in d] if buf is None else [momentum * b + t for b, t in zip(buf, d)]
        w = [w_l - lr * b for w_l, b in zip(w, buf)]
    return w


@pytest.mark.parametrize("gamma", [0.05, 0.3])
def test_matches_algorithm2_three_ascent_steps(gamma):
    model = make_model(1)
    batches = make_batches(3, seed=2)
    ref_model = copy.deepcopy(model)
    opt = awp(model, gamma=gamma, steps=3, momentum=MOMENTUM, weight_decay=WD)
    calls = []
    for x, y in batches:
        seen = []
        opt.step(make_closure(opt, model, x, y, seen))
        calls.append(len(seen))
    assert calls == [4, 4, 4]
    want = ref_awp(ref_model, batches, gamma, 3, gamma / 3, LR, MOMENTUM, WD)
    for got, ref in zip(model.parameters(), want):
        torch.testing.assert_close(got.detach(), ref, rtol=1e-10, atol=1e-12)
    # the perturbation matters, and so does K2 (with its default η2 = γ/K2)
    plain = ref_awp(ref_model, batches, 0.0, 1, 0.0, LR, MOMENTUM, WD)
    one = ref_awp(ref_model, batches, gamma, 1, gamma, LR, MOMENTUM, WD)
    assert max((a - b).abs().max() for a, b in zip(want, plain)) > 1e-5
    assert max((a - b).abs().max() for a, b in zip(want, one)) > 1e-8


# ------------------------------------------------------------------------------------ 3. the projection
@pytest.mark.parametrize("step_size,on_sphere", [(1.0, True), (0.004, False)], ids=["large", "small"])
def test_ascent_steps_stay_in_the_layer_balls(step_size, on_sphere):
    gamma, k2 = 0.05, 4
    model = make_model(2)
    ((x, y),) = make_batches(1, seed=3)
    w = params_of(model)
    opt = awp(model, gamma=gamma, steps=k2, step_size=step_size, lr=0.0)
    seen = []
    opt.step(make_closure(opt, model, x, y, seen))
    assert len(seen) == k2 + 1
    for k, ps in enumerate(seen[1:]):  # w+v after ascent step k+1
        for name, w_l, p_l in zip([n for n, _ in model.named_parameters()], w, ps):
            v_norm, radius = norm(p_l - w_l), gamma * norm(w_l)
            if w_l.dim() <= 1 or name == "dead.weight":
                assert v_norm == 0
            elif on_sphere:  # step_size ≫ γ: every step leaves the ball and is projected back on its surface
                torch.testing.assert_close(v_norm, radius, rtol=1e-12, atol=0)
            else:  # 4 steps of 0.004‖w_l‖ never reach 0.05‖w_l‖
                assert 0 < v_norm <= (k + 1) * step_size * norm(w_l) * (1 + 1e-12) < radius


# ------------------------------------------------------------------------------------- 4. exact restore
def test_step_applies_gradient_at_perturbed_weights_at_w():
    model = make_model(3)
    ((x, y),) = make_batches(1, seed=4)
    base_model = copy.deepcopy(model)
    opt = awp(model, gamma=0.1, momentum=MOMENTUM, weight_decay=WD)
    seen = []
    opt.step(make_closure(opt, model, x, y, seen))
    g = grad_at(copy.deepcopy(base_model), seen[1], x, y)  # the gradient at w+v
    base = torch.optim.SGD(base_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for p, g_l in zip(base_model.parameters(), g):
        p.grad = g_l
    base.step()  # at w
    for got, want in zip(model.parameters(), base_model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("steps,fail_at", [(1, 2), (3, 2), (3, 3), (3, 4)])
def test_failing_closure_leaves_w_bit_for_bit(steps, fail_at):
    model = make_model(4)
    ((x, y),) = make_batches(1, seed=5)
    w = params_of(model)
    opt = awp(model, gamma=0.2, steps=steps, momentum=MOMENTUM)
    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(make_closure(opt, model, x, y, [], fail_at=fail_at))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), w))
    assert opt.steps_taken == 0  # a failed step is not counted


# ------------------------------------------------------------------------- 5. γ = 0, warm-up, state_dict
def run_steps(opt, model, batches):
    calls = []
    for x, y in batches:
        seen = []
        opt.step(make_closure(opt, model, x, y, seen))
        calls.append(len(seen))
    return calls


def equal_models(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "ctor",
    [
        lambda p: AWP(p, torch.optim.SGD, gamma=0.0, steps=3, lr=LR, momentum=MOMENTUM),
        lambda p: RWP(p, torch.optim.SGD, gamma=0.0, lr=LR, momentum=MOMENTUM),
    ],
    ids=["awp", "rwp"],
)
def test_gamma_zero_is_the_base_optimizer_bit_for_bit(ctor):
    """With dropout, an extra closure call would draw other masks: this also checks there is one call."""
    batches = make_batches(4, seed=6)
    base_model = make_model(5, dropout=0.3)
    model = copy.deepcopy(base_model)
    base = torch.optim.SGD(base_model.parameters(), lr=LR, momentum=MOMENTUM)
    torch.manual_seed(7)
    run_steps(base, base_model, batches)
    torch.manual_seed(7)
    assert run_steps(ctor(model.parameters()), model, batches) == [1] * 4
    assert equal_models(model, base_model)
    assert not equal_models(model, make_model(5, dropout=0.3))


def test_warmup_steps_are_the_base_optimizer_then_awp():
    batches = make_batches(3, seed=8)
    base_model = make_model(6)
    model = copy.deepcopy(base_model)
    base = torch.optim.SGD(base_model.parameters(), lr=LR, momentum=MOMENTUM)
    opt = awp(model, warmup_steps=2, momentum=MOMENTUM)
    for k, (x, y) in enumerate(batches):
        base.step(make_closure(base, base_model, x, y))
        assert run_steps(opt, model, [(x, y)]) == [1 if k < 2 else 2]
        assert equal_models(model, base_model) == (k < 2), f"step {k + 1}"
    assert opt.steps_taken == 3


def test_step_counter_survives_state_dict_round_trip():
    batches = make_batches(4, seed=9)
    model = make_model(7)
    opt = awp(model, warmup_steps=2, momentum=MOMENTUM)
    run_steps(opt, model, batches[:1])
    opt_sd, model_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    assert run_steps(opt, model, batches[1:]) == [1, 2, 2]

    resumed = make_model(99)
    resumed.load_state_dict(model_sd)
    opt2 = awp(resumed, warmup_steps=2, momentum=MOMENTUM)
    opt2.load_state_dict(opt_sd)
    assert opt2.steps_taken == 1
    assert run_steps(opt2, resumed, batches[1:]) == [1, 2, 2]
    assert equal_models(model, resumed)


# ------------------------------------------------------------------------------------------------ 6. RWP
def rwp_perturbations(seed, gamma=0.1, n_steps=2):
    """The v seen by the closure at each step (lr = 0, so w is the same every step), and closure calls."""
    model = make_model(8)
    w = params_of(model)
    opt = RWP(model.parameters(), torch.optim.SGD, gamma=gamma, lr=0.0)
    torch.manual_seed(seed)
    vs, calls = [], []
    for x, y in make_batches(n_steps, seed=10):
        seen = []
        loss = opt.step(make_closure(opt, model, x, y, seen))
        calls.append(len(seen))
        vs.append([p - w_l for p, w_l in zip(seen[0], w)])
        # the returned loss is the one at w+v (the only pass)
        at = F.cross_entropy(
            functional_call(copy.deepcopy(model), dict(zip([n for n, _ in model.named_parameters()], seen[0])), (x,)), y
        )
        torch.testing.assert_close(loss, at, rtol=1e-14, atol=0)
    return model, w, vs, calls


def test_rwp_random_direction_with_layer_relative_size():
    gamma = 0.1
    model, w, vs, calls = rwp_perturbations(0, gamma)
    assert calls == [1, 1]
    for v in vs:
        for w_l, v_l in zip(w, v):
            if w_l.dim() <= 1:
                assert torch.equal(v_l, torch.zeros_like(v_l))
            else:  # the dead layer too: RWP needs no gradient
                torch.testing.assert_close(norm(v_l), gamma * norm(w_l), rtol=1e-12, atol=0)
    for w_l, a, b in zip(w, *vs):  # a new direction every step
        if w_l.dim() > 1:
            assert (a * b).sum() / (norm(a) * norm(b)) < 0.99
    _, _, again, _ = rwp_perturbations(0, gamma)
    _, _, other, _ = rwp_perturbations(1, gamma)
    assert all(torch.equal(a, b) for va, vb in zip(vs, again) for a, b in zip(va, vb))
    assert not all(torch.equal(a, b) for va, vb in zip(vs, other) for a, b in zip(va, vb))


# ---------------------------------------------------------------------------------------- 7. ValueErrors
@pytest.mark.parametrize(
    "ctor,match",
    [
        (lambda p: AWP(p, torch.optim.SGD, gamma=-0.01, lr=LR), "gamma"),
        (lambda p: AWP(p, torch.optim.SGD, gamma=float("nan"), lr=LR), "gamma"),
        (lambda p: AWP(p, torch.optim.SGD, steps=0, lr=LR), "steps"),
        (lambda p: AWP(p, torch.optim.SGD, steps=1.5, lr=LR), "steps"),
        (lambda p: AWP(p, torch.optim.SGD, step_size=0.0, lr=LR), "step_size"),
        (lambda p: AWP(p, torch.optim.SGD, step_size=-1e-3, lr=LR), "step_size"),
        (lambda p: AWP(p, torch.optim.SGD, warmup_steps=-1, lr=LR), "warmup_steps"),
        (lambda p: RWP(p, torch.optim.SGD, gamma=-0.5, lr=LR), "gamma"),
    ],
    ids=["gamma<0", "gamma_nan", "steps0", "steps_float", "step_size0", "step_size<0", "warmup<0", "rwp_gamma<0"],
)
def test_bad_arguments_raise(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor(make_model(0).parameters())
