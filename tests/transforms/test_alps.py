"""ALPS (Guo et al., IJCAI 2021): Theorem 1's closed-form label against a linear program, the Beta mode, the
transform."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import optimize, stats
from torch import nn

import advreg
from advreg import cli
from advreg.losses import cross_entropy
from advreg.transforms.alps import ALPS, beta_mode


def worst_label_by_lp(log_probs, y, eps):
    """max_ỹ Σ ỹ_k (-log p_k) s.t. ỹ ≥ 0, Σ ỹ = 1, Σ |ỹ - y| ≤ ε, as an LP over (ỹ, t) with t ≥ |ỹ - y|."""
    k = len(log_probs)
    onehot = np.eye(k)[y]
    c = np.concatenate([log_probs, np.zeros(k)])  # linprog minimizes: -(-log p)·ỹ
    eye = np.eye(k)
    a_ub = np.block([[eye, -eye], [-eye, -eye], [np.zeros((1, k)), np.ones((1, k))]])
    b_ub = np.concatenate([onehot, -onehot, [eps]])
    a_eq = np.concatenate([np.ones(k), np.zeros(k)])[None]
    res = optimize.linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[1.0], bounds=[(0, None)] * (2 * k), method="highs")
    assert res.status == 0
    return res.x[:k], -res.fun


@pytest.mark.parametrize("k", [2, 3, 10])
@pytest.mark.parametrize("eps", [0.05, 0.2, 0.49])
def test_closed_form_label_solves_the_inner_maximization(k, eps):
    gen = torch.Generator().manual_seed(k * 100 + int(eps * 100))
    logits = 3 * torch.randn(20, k, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, k, (20,), generator=gen)
    rho = advreg.alps_label(logits, targets, eps)
    assert rho.shape == (20, k) and torch.allclose(rho.sum(1), torch.ones(20, dtype=torch.float64))
    log_probs = F.log_softmax(logits, 1)
    for i in range(20):
        lp_label, lp_value = worst_label_by_lp(log_probs[i].numpy(), targets[i].item(), eps)
        closed_value = -(rho[i] * log_probs[i]).sum().item()
        assert closed_value == pytest.approx(lp_value, rel=1e-9, abs=1e-9)
        np.testing.assert_allclose(rho[i].numpy(), lp_label, atol=1e-7)


def test_label_when_the_true_class_is_the_least_likely_stays_one_hot():
    logits = torch.tensor([[-5.0, 1.0, 2.0]], dtype=torch.float64)
    rho = advreg.alps_label(logits, torch.tensor([0]), 0.3)
    torch.testing.assert_close(rho, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    _, lp_value = worst_label_by_lp(F.log_softmax(logits, 1)[0].numpy(), 0, 0.3)
    assert -(rho[0] * F.log_softmax(logits, 1)[0]).sum().item() == pytest.approx(lp_value)


def test_soft_target_cross_entropy_is_the_mixture_of_the_two_losses():
    logits, targets = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,))
    rho = advreg.alps_label(logits, targets, 0.4)
    per = -F.log_softmax(logits, 1)
    expected = (0.8 * per[torch.arange(8), targets] + 0.2 * per[torch.arange(8), logits.argmin(1)]).mean()
    assert cross_entropy(logits, rho).item() == pytest.approx(expected.item(), rel=1e-12)


def test_lambda_follows_the_asymmetric_beta_with_its_mode_near_one():
    assert beta_mode(9.0, 2.0) == pytest.approx(8 / 9)
    torch.manual_seed(0)
    transform = ALPS(alpha=9.0, beta=2.0, epsilon=0.2)
    model = nn.Linear(1, 3)
    x = torch.ones(4000, 1)  # partner x' = x too: x̃ = x for any λ; λ is recovered below from x=1, x'=0
    x[::2] = 0.0
    mixed = transform(model, x, torch.zeros(4000, dtype=torch.long), 3).inputs
    ones = x[:, 0] == 1
    lam = mixed[ones, 0]  # with x=1 the mix is λ + (1-λ)x' with x' ∈ {0, 1}
    lam = lam[lam < 1]  # partners equal to 1 give 1 whatever λ; keep those paired with 0
    assert stats.kstest(lam.numpy(), stats.beta(9, 2).cdf).pvalue > 0.01
    assert stats.kstest(lam.numpy(), stats.beta(2, 9).cdf).pvalue < 1e-6


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(alpha=2.0, beta=2.0), "mode"),  # mode 0.5
        (dict(alpha=0.5, beta=2.0), "> 1"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=0.6), "epsilon"),
    ],
)
def test_bad_alps_settings_say_what_to_do(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ALPS(**kwargs)


def test_the_label_uses_eval_mode_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    model.train()
    stats_before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    batch = ALPS(epsilon=0.2)(model, x, y, 3)
    mixed, target = batch.inputs, batch.target
    assert model.training and all(torch.equal(v, stats_before[k]) for k, v in model.state_dict().items())
    model.eval()
    expected = advreg.alps_label(model(mixed).detach(), y, 0.2)
    torch.testing.assert_close(target, expected)
    true_mass = target.gather(1, y[:, None]).squeeze(1)  # 1 - ε/2, or 1 where y is itself the least likely
    assert (((true_mass - 0.9).abs() < 1e-6) | (true_mass == 1)).all()


def test_alps_trains_from_the_cli_and_composes_with_amp(tmp_path, capsys):
    cli.main(
        [
            "train",
            "--method",
            "alps",
            "--dataset",
            "digits",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "a"),
            "--quiet",
            "--set",
            "alps.epsilon=0.3",
        ]
    )
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["method"] == "alps" and metrics["test_error"] < 60
    cli.main(
        [
            "train",
            "--method",
            "amp",
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "b"),
            "--quiet",
            "--set",
            "stages.transform=alps",
        ]
    )
    assert json.loads((tmp_path / "b" / "config.json").read_text())["stages"] == {
        "perturbation": "amp",
        "transform": "alps",
        "loss": "ce",
    }
