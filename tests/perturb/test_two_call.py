"""The two-call form (``first_step`` / ``ascent_step`` / ``second_step``) against ``step(closure)``, bit for bit.

The loop below is davda54/sam's README usage, written here from that usage: a loop for their SAM runs with only the
import and the constructor changed. Its BatchNorm advice (turn running statistics off in the second pass) is not
followed: the optimizer freezes them itself between the two calls.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from perturb_helpers import make_closure
from torch import nn

import advreg
import advreg.perturb

DT = torch.float64
SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


def make_model(seed=0, dtype=DT):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def make_batches(n, seed=1, dtype=DT):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)
    ]


def davda54_loop(model, optimizer, batches, loss_function=F.cross_entropy):
    """davda54/sam README, "Usage": two forward-backward passes, first_step and second_step."""
    for inputs, targets in batches:
        # first forward-backward pass
        loss = loss_function(model(inputs), targets)  # use this loss for any training statistics
        loss.backward()
        optimizer.first_step(zero_grad=True)
        # second forward-backward pass
        loss_function(model(inputs), targets).backward()  # make sure to do a full forward pass
        optimizer.second_step(zero_grad=True)


def closure_loop(model, optimizer, batches):
    for inputs, targets in batches:
        optimizer.step(make_closure(optimizer, model, inputs, targets))


def state_of(model):
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def assert_same(model_a, model_b):
    assert all(torch.equal(a, b) for a, b in zip(state_of(model_a), state_of(model_b)))


OPTIMIZERS = {
    "sam": lambda params, **kw: advreg.SAM(params, torch.optim.SGD, rho=0.05, **SGD, **kw),
    "asam": lambda params, **kw: advreg.SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, **SGD, **kw),
    "amp": lambda params, **kw: advreg.AMP(params, torch.optim.SGD, epsilon=0.5, inner_lr=1.0, **SGD, **kw),
    "amp_off": lambda params, **kw: advreg.AMP(params, torch.optim.SGD, epsilon=0.0, inner_lr=1.0, **SGD, **kw),
}


@pytest.mark.parametrize("given_model", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_davda54_loop_is_step_closure_bit_for_bit(name, given_model):
    model_a = make_model()
    model_b, batches = copy.deepcopy(model_a), make_batches(5)
    kw_a = {"model": model_a} if given_model else {}
    kw_b = {"model": model_b} if given_model else {}
    closure_loop(model_a, OPTIMIZERS[name](model_a.parameters(), **kw_a), batches)
    davda54_loop(model_b, OPTIMIZERS[name](model_b.parameters(), **kw_b), batches)
    assert_same(model_a, model_b)  # weights, and running statistics of the clean passes only
    assert model_b[1].num_batches_tracked.item() == len(batches)


def test_multi_pass_amp_takes_one_ascent_step_per_extra_pass():
    model_a = make_model()
    model_b, batches = copy.deepcopy(model_a), make_batches(4)
    kw = dict(epsilon=0.5, inner_lr=2.0, inner_steps=3, **SGD)
    closure_loop(model_a, advreg.AMP(model_a.parameters(), torch.optim.SGD, **kw), batches)
    opt = advreg.AMP(model_b.parameters(), torch.optim.SGD, **kw)
    for x, y in batches:
        F.cross_entropy(model_b(x), y).backward()
        opt.first_step(zero_grad=True)
        for _ in range(2):  # N - 1 extra passes
            F.cross_entropy(model_b(x), y).backward()
            opt.ascent_step(zero_grad=True)
        F.cross_entropy(model_b(x), y).backward()
        opt.second_step(zero_grad=True)
    assert_same(model_a, model_b)
    assert opt.steps_taken == len(batches)


def test_under_a_grad_scaler_the_two_call_form_is_step_closure():
    """Both backwards scaled by the user; an overflow in the first pass restores θ and skips the step."""
    results = []
    for two_call in (False, True):
        model = make_model(dtype=torch.float32)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        opt = OPTIMIZERS["sam"](model.parameters(), grad_scaler=scaler)
        for k, (x, y) in enumerate(make_batches(4, dtype=torch.float32)):
            blow = k == 2  # the clean pass of this step overflows

            def backward(first):
                loss = F.cross_entropy(model(x), y) * (float("inf") if blow and first else 1.0)
                scaler.scale(loss).backward()
                return loss.detach()

            if two_call:
                backward(True)
                opt.first_step(zero_grad=True)
                backward(False)
                opt.second_step(zero_grad=True)
            else:
                passes = iter((True, False))

                def closure():
                    opt.zero_grad()
                    return backward(next(passes))

                if blow:  # step(closure) sees the loss itself: a non-finite loss at θ is an error there
                    with pytest.raises(advreg.perturb.NonFiniteLossError):
                        opt.step(closure)
                    scaler.update(scaler.get_scale() / 2)  # what the two-call form's skipped step does
                    continue
                opt.step(closure)
            scaler.update()
        results.append((state_of(model), scaler.get_scale()))
    (state_a, scale_a), (state_b, scale_b) = results
    assert scale_a == scale_b == 2.0**7
    assert all(torch.equal(a, b) for a, b in zip(state_a, state_b))


def test_a_non_finite_gradient_is_an_error_and_leaves_theta():
    model = make_model()
    opt = OPTIMIZERS["sam"](model.parameters())
    x, y = make_batches(1)[0]
    (F.cross_entropy(model(x), y) * float("nan")).backward()
    theta = state_of(model)  # θ, and the statistics of the clean pass
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(advreg.perturb.NonFiniteLossError):
        opt.second_step()
    assert all(torch.equal(a, b) for a, b in zip(state_of(model), theta))


def test_misuse_is_a_clear_error():
    model = make_model()
    opt = OPTIMIZERS["sam"](model.parameters())
    x, y = make_batches(1)[0]
    with pytest.raises(ValueError, match="second_step needs first_step"):
        opt.second_step()
    F.cross_entropy(model(x), y).backward()
    theta = state_of(model)
    opt.first_step()
    assert not torch.equal(model[0].weight, theta[0])  # at θ+Δ
    with pytest.raises(ValueError, match="between first_step and second_step"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="no more of them"):
        opt.ascent_step()
    model(x)  # a pass at θ+Δ: its statistics do not count
    with pytest.raises(ValueError, match="called twice"):
        opt.first_step()
    assert all(torch.equal(a, b) for a, b in zip(state_of(model), theta))  # undone: θ and the statistics back
    with pytest.raises(ValueError, match="second_step needs first_step"):
        opt.second_step()
    amp = advreg.AMP(model.parameters(), torch.optim.SGD, epsilon=0.5, inner_lr=1.0, inner_steps=2, **SGD)
    F.cross_entropy(model(x), y).backward()
    amp.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="ascent_step"):
        amp.second_step()
    F.cross_entropy(model(x), y).backward()
    amp.ascent_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    amp.second_step()  # the step goes on once the missing pass is taken
    assert amp.steps_taken == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: advreg.perturb.RMP(p, torch.optim.SGD, epsilon=0.1, lr=0.1), "one pass per step"),
        (lambda p: advreg.perturb.RWP(p, torch.optim.SGD, gamma=0.01, lr=0.1), "one pass per step"),
        (lambda p: advreg.AMP(p, torch.optim.SGD, epsilon=0.5, inner_lr=1.0, every=2, lr=0.1), "every > 1"),
        (lambda p: advreg.SAM(p, torch.optim.SGD, rho=0.05, no_sync=lambda: None, lr=0.1), "no_sync"),
    ],
)
def test_what_only_step_closure_can_do_is_refused(make, message):
    model = make_model()
    opt = make(model.parameters())
    x, y = make_batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=message):
        opt.first_step()
