"""advreg.Step: one batch through transform → loss → perturbation → optimizer, checked against steps by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advreg
from advreg.losses import OnLogits
from advreg.transforms import identity

LR = 0.1


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    return model, x, y


def step_of(model, opt, **kwargs):
    return advreg.Step(model, identity, OnLogits(F.cross_entropy), opt, 3, **kwargs)


def test_sgd_step_is_the_hand_written_one_and_reports_the_pass_at_theta():
    model, x, y = setup()
    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    expected_logits = twin(x).detach()
    F.cross_entropy(twin(x), y).backward()
    with torch.no_grad():
        for p in twin.parameters():
            p -= LR * p.grad
    out = step_of(model, torch.optim.SGD(model.parameters(), lr=LR))(x, y)
    torch.testing.assert_close(out.logits, expected_logits)
    torch.testing.assert_close(out.loss, F.cross_entropy(expected_logits, y))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_sam_reports_the_logits_at_theta_not_those_at_theta_plus_delta():
    model, x, y = setup()
    at_theta = model(x).detach()
    opt = advreg.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=LR)
    out = step_of(model, opt)(x, y)
    torch.testing.assert_close(out.logits, at_theta)
    torch.testing.assert_close(out.loss, F.cross_entropy(at_theta, y))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: advreg.RMP(p, torch.optim.SGD, epsilon=0.5, lr=LR),  # one pass, at θ+Δ
        lambda p: advreg.AMP(
            p, torch.optim.SGD, epsilon=0.5, inner_lr=1.0, every=2, lr=LR
        ),  # step 2: the kept Δ, one pass
    ],
)
def test_without_a_clean_pass_the_reported_logits_are_those_of_the_returned_loss(make):
    model, x, y = setup()
    step = step_of(model, make(model.parameters()))
    for _ in range(2):
        at_theta = model(x).detach()
        out = step(x, y)
        torch.testing.assert_close(F.cross_entropy(out.logits, y), out.loss.detach())  # the same pass
    assert not torch.allclose(out.logits, at_theta)  # a pass at θ+Δ: the first call was not at θ


def test_clipping_clips_every_pass_and_bad_settings_are_refused():
    model, x, y = setup()
    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    F.cross_entropy(twin(x), y).backward()
    grads = [p.grad.clone() for p in twin.parameters()]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    clip = norm.item() / 4
    step_of(model, torch.optim.SGD(model.parameters(), lr=LR), clip_grad=clip)(x, y)
    for p, q, g in zip(model.parameters(), twin.parameters(), grads):
        torch.testing.assert_close(p.detach(), q.detach() - LR * g * clip / norm, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="precision must be one of"):
        step_of(model, torch.optim.SGD(model.parameters(), lr=LR), precision="fp8")
    with pytest.raises(ValueError, match="clip_grad must be >= 0"):
        step_of(model, torch.optim.SGD(model.parameters(), lr=LR), clip_grad=-1.0)


def test_float16_scaling_with_plain_sgd_takes_the_unscaled_step():
    model, x, y = setup()
    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    step_of(twin, torch.optim.SGD(twin.parameters(), lr=LR))(x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    step_of(model, torch.optim.SGD(model.parameters(), lr=LR), scaler=scaler)(x, y)  # fp32 passes, scaled loss
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
    assert scaler.get_scale() == 2.0**8  # updated after the step, no overflow
