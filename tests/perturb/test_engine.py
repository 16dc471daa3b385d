"""The engine's own contract: construction checks, foreign state, BatchNorm freezing, saved settings."""
import copy

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
    opt = advreg.AMP(model.parameters(), torch.optim.SGD, epsilon=0.5, inner_lr=1.0, inner_steps=3, lr=0.1,
                     **({"model": model} if given_model else {}))
    _step(opt, model, x, y)
    assert model[1].num_batches_tracked.item() == 1  # 4 passes, 1 counted
    assert torch.equal(model[1].running_mean, clean[1].running_mean)
    assert torch.equal(model[1].running_var, clean[1].running_var)


def test_repr_names_the_settings():
    model = _model()
    text = repr(advreg.SAM(model.parameters(), torch.optim.SGD, rho=0.2, adaptive=True, lr=0.1))
    assert text.startswith("SAM(rho=0.2, eta=0.01, adaptive=True") and "SGD" in text
