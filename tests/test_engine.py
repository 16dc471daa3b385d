"""The engine's own contract: construction checks, foreign state, BatchNorm ownership, saved settings."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advreg


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _step(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return opt.step(closure)


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
    assert state["perturbation"] == {"epsilon": 0.3, "inner_lr": 2.0, "inner_steps": 2, "norm": "global",
                                     "every": 1, "reuse": "delta", "alpha": 0.7, "steps_taken": 0}
    other = advreg.AMP(model.parameters(), torch.optim.SGD, epsilon=0.1, inner_lr=1.0, lr=0.1)
    other.load_state_dict(state)
    assert (other.epsilon, other.inner_lr, other.inner_steps) == (0.3, 2.0, 2)
    assert other.state is other.base_optimizer.state and other.param_groups is other.base_optimizer.param_groups
    sam = advreg.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        sam.load_state_dict(state)


def test_running_stats_of_a_model_the_optimizer_does_not_own_keep_moving():
    owned, other = _model(), _model()
    opt = advreg.AMP(owned.parameters(), torch.optim.SGD, epsilon=0.5, inner_lr=1.0, lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def closure():  # a second model runs inside the same step: its statistics are not ours to freeze
        opt.zero_grad()
        other(x)
        loss = F.cross_entropy(owned(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    assert owned[1].num_batches_tracked.item() == 1  # the clean pass only
    assert other[1].num_batches_tracked.item() == 2  # both of its passes


def test_repr_names_the_settings():
    model = _model()
    text = repr(advreg.SAM(model.parameters(), torch.optim.SGD, rho=0.2, adaptive=True, lr=0.1))
    assert text.startswith("SAM(rho=0.2, adaptive=True") and "SGD" in text
