"""A NaN or inf loss mid-run: the engine says which pass was non-finite, the run's error names what to lower."""

import pytest
import torch
from torch import nn

import advreg
from advreg.config import TrainConfig
from advreg.methods import resolve
from advreg.perturb import NonFiniteLossError
from advreg.train import TrainingDiverged, suspects, train


def _sam_step(rho, x):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = advreg.SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    y = torch.tensor([0, 1])

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(NonFiniteLossError) as info:
        opt.step(closure)
    return info.value


def test_the_engine_tells_a_non_finite_perturbed_pass_from_a_non_finite_pass_at_theta():
    at_delta = _sam_step(1e38, torch.ones(2, 3))  # finite at θ; Δ of norm 1e38 overflows the logits
    assert at_delta.perturbed and "at perturbed weights θ+Δ, though finite at θ" in str(at_delta)
    at_theta = _sam_step(0.05, torch.full((2, 3), float("nan")))  # NaN inputs: already the pass at θ
    assert not at_theta.perturbed and "at the weights θ" in str(at_theta)


@pytest.mark.parametrize(
    "method, settings, first, others",
    [
        ("sam", ["sam.rho=1e38"], "lower sam.rho (now 1e+38) and start again", None),  # only θ+Δ was non-finite
        ("amp", ["amp.epsilon=1e38", "amp.inner_lr=1e38"], "lower amp.epsilon (now 1e+38)", "amp.inner_lr (now 1e+38)"),
        ("amp", ["optim.lr=1e30", "optim.momentum=0"], "lower optim.lr (now 1e+30)", "amp.epsilon (now 0.5)"),
        ("rmp", ["rmp.epsilon=1e38"], "lower rmp.epsilon (now 1e+38)", "optim.lr (now 0.1)"),  # no pass at θ: by size
        ("flooding", ["loss.flooding=3e38"], "lower loss.flooding (now 3e+38)", "optim.lr (now 0.1)"),
        ("erm", ["optim.lr=1e30", "optim.momentum=0"], "lower optim.lr (now 1e+30) and start again", None),
    ],
)
def test_a_diverged_run_names_the_setting_most_likely_at_fault_first(tmp_path, method, settings, first, others):
    config = resolve(TrainConfig(method=method, epochs=1), ["data.name=digits", "model.hidden=8", *settings])
    with pytest.raises(TrainingDiverged) as info:
        train(config, tmp_path / "r", progress=False)
    message = str(info.value)
    assert first in message and "\n" not in message
    assert (f"next suspects: {others}" in message) if others else "next suspects" not in message


def test_the_suspects_are_the_settings_the_run_uses():
    smoothing = resolve(TrainConfig(method="label_smoothing"), [])
    assert suspects(smoothing, perturbed=False) == (
        f"lower optim.lr (now 0.1) and start again; next suspects: loss.smoothing (now {smoothing.loss.smoothing})"
    )
    trades = resolve(TrainConfig(method="trades_awp"), ["trades.beta=600"])  # 100 times its default: first
    assert suspects(trades, perturbed=False).startswith("lower trades.beta (now 600.0)")
    assert suspects(trades, perturbed=True) == f"lower awp.gamma (now {trades.awp.gamma}) and start again"
