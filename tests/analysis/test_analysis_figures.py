"""The AMP paper's figures: operational region (Corollary 2, Fig. 4), the 1-D AMP loss (Fig. 1), the scalar example
(Fig. 9), the spiral data (Fig. 6) and decision regions, reliability diagrams and ECE (Fig. 7), curves (Fig. 11).

Each is checked against a reference written here: the paper's formulas evaluated by hand, brute-force maxima,
``model(grid).argmax`` and the numbers the runs themselves wrote.
"""

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from advreg.analysis import save
from advreg.analysis.boundary import BoundaryResult, decision_regions, padded_range, plot_boundaries
from advreg.analysis.calibration import bin_statistics, plot_reliability, reliability, selected_runs
from advreg.analysis.curves import load_curves, plot_curves
from advreg.analysis.operational import (
    amp_1d,
    amp_loss_1d,
    in_region,
    plot_amp_1d,
    plot_region,
    plot_scalar_example,
    region_grid,
    scalar_example,
    scalar_objectives,
    sharp_flat_loss,
)
from advreg.data import spiral
from advreg.metrics import calibration_error

torch.set_num_threads(1)


# ---------------------------------------------------------------- Corollary 2, Fig. 4

# (β, r, ε²/2σ₁², inside?) computed by hand from Eq. (15): ratio 1: exp(-1) = 0.3679, and at β = 0.5 the bound
# is 1/(1 + ln 0.5) = 3.2589; ratio 0.5: exp(-0.5) = 0.6065, at β = 0.9 the bound is 1/(1 + 2 ln 0.9) = 1.2670
HAND_POINTS = [
    (0.5, 3.30, 1.0, True),
    (0.5, 3.22, 1.0, False),
    (0.3, 100.0, 1.0, False),
    (0.38, 100.0, 1.0, True),
    (0.9, 1.28, 0.5, True),
    (0.9, 1.25, 0.5, False),
    (0.6, 50.0, 0.5, False),
    (0.62, 50.0, 0.5, True),
    (0.99, 1.03, 0.5, True),
    (0.99, 1.01, 0.5, False),
    (1.2, 10.0, 1.0, False),
]


@pytest.mark.parametrize("beta, r, ratio, inside", HAND_POINTS)
def test_region_matches_hand_evaluated_corollary_2(beta, r, ratio, inside):
    assert bool(in_region(beta, r, ratio)) is inside


def test_region_is_where_the_flat_minimum_has_the_lower_amp_loss():
    # Eq. (14) directly, with Theorem 1: γ*_AMP = C - A exp(-ε²/2σ²), C₁ = C₂, A₂ = βA₁, σ₂² = rσ₁²
    rng = np.random.default_rng(0)
    beta, r, ratio = rng.uniform(0.01, 0.999, 4000), rng.uniform(0.05, 20, 4000), rng.uniform(0.05, 3, 4000)
    gamma1 = 1.0 - 2.0 * np.exp(-ratio)
    gamma2 = 1.0 - 2.0 * beta * np.exp(-ratio / r)
    clear = np.abs(gamma1 - gamma2) > 1e-9
    got = np.array([in_region(b, s, q) for b, s, q in zip(beta, r, ratio)])
    assert got[clear].tolist() == (gamma2 < gamma1)[clear].tolist()
    assert 0.05 < got.mean() < 0.95  # both sides sampled


def test_region_grid_is_nested_in_the_ratio_and_plots():
    result = region_grid(ratios=(0.25, 0.5, 1.0, 2.0))
    assert result.mask.shape == (4, len(result.rs), len(result.betas))
    for k, q in enumerate(result.ratios):
        assert np.array_equal(result.mask[k], in_region(result.betas[None, :], result.rs[:, None], q))
    assert all((result.mask[k] <= result.mask[k + 1]).all() for k in range(3))  # a larger ε, a larger region
    assert not result.mask[:, result.rs <= 1].any()  # μ₂ must be flatter: r > 1
    assert isinstance(plot_region(result), Figure)
    with pytest.raises(ValueError, match="ratio"):
        in_region(0.5, 2.0, 0.0)


# ---------------------------------------------------------------- Fig. 1


def test_amp_loss_1d_is_the_max_over_the_window():
    eps = 0.5
    for theta in (-2.0, -1.5, -1.1, 0.0, 1.4, 3.0):
        window = np.linspace(theta - eps, theta + eps, 200_001)  # brute force, independent of the δ grid
        assert amp_loss_1d(sharp_flat_loss, np.array([theta]), eps)[0] == pytest.approx(
            sharp_flat_loss(window).max(), abs=1e-6
        )
    quadratic = amp_loss_1d(lambda t: t**2, np.array([0.0, 0.3, -1.0]), 0.2)
    assert quadratic == pytest.approx([0.04, 0.25, 1.44])


def test_amp_1d_prefers_the_flat_minimum():
    result = amp_1d(epsilon=0.5)
    assert result.theta_erm == pytest.approx(-1.5, abs=0.01)  # the sharp, deeper minimum
    assert result.theta_amp == pytest.approx(1.5, abs=0.05)  # the flat one
    assert (result.amp >= result.erm - 1e-12).all()
    assert isinstance(plot_amp_1d(result), Figure)


# ---------------------------------------------------------------- Fig. 9


def _g(z):
    return np.where(z >= 0, z, -2 * z)


@pytest.mark.parametrize("eps", [0.1, 0.3, 1.0, 2.5])
def test_scalar_example_minimizers_match_appendix_c(eps):
    result = scalar_example(eps)
    assert result.minimizers["amp"] == pytest.approx(eps / 3, abs=1e-3)
    assert result.minimizers["erm"] == pytest.approx(0.0, abs=1e-3)
    assert result.minimizers["adv"] == pytest.approx(0.0, abs=1e-3)


def test_scalar_objectives_match_closed_forms():
    theta, eps = np.linspace(-2, 2, 41), 0.4
    got = scalar_objectives(theta, eps)
    assert got["erm"] == pytest.approx(_g(theta))
    assert got["amp"] == pytest.approx(np.maximum(_g(theta - eps), _g(theta + eps)))  # g convex: the window's ends
    assert got["adv"] == pytest.approx(np.maximum(_g(theta * (1 - eps)), _g(theta * (1 + eps))))
    assert isinstance(plot_scalar_example(scalar_example(eps)), Figure)


# ---------------------------------------------------------------- spiral


def test_spiral_shapes_balance_and_determinism():
    x, y = spiral.make_spiral(50, 3, 0.2, seed=4)
    assert x.shape == (150, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [50, 50, 50]
    assert x.norm(dim=1).max() <= 1 + 1e-6
    again, other = spiral.make_spiral(50, 3, 0.2, seed=4), spiral.make_spiral(50, 3, 0.2, seed=5)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1]) and not torch.equal(x, other[0])


def test_spiral_is_the_cs231n_generator_without_noise():
    x, y = spiral.make_spiral(20, 2, 0.0, seed=0)
    r = np.linspace(0, 1, 20)
    for k in range(2):
        t = np.linspace(4 * k, 4 * (k + 1), 20)
        assert x[y == k].numpy() == pytest.approx(np.c_[r * np.sin(t), r * np.cos(t)], abs=1e-6)


def test_load_spiral_splits():
    data = spiral.load_spiral(seed=0)
    assert (len(data.train[1]), len(data.val[1]), len(data.test[1])) == (270, 30, 300)
    assert torch.bincount(data.val[1]).tolist() == [10, 10, 10]
    assert data.num_classes == 3 and data.input_shape == (2,)
    assert not torch.equal(data.test[0], spiral.make_spiral(seed=spiral.TRAIN_SEED)[0])  # its own draw
    same, other = spiral.load_spiral(seed=0), spiral.load_spiral(seed=1)
    assert torch.equal(same.val[0], data.val[0]) and not torch.equal(other.val[0], data.val[0])
    assert torch.equal(other.test[0], data.test[0])  # the test set does not depend on the run seed
    with pytest.raises(ValueError, match="val_fraction"):
        spiral.load_spiral(seed=0, val_fraction=1.0)


# ---------------------------------------------------------------- decision regions


def test_decision_regions_match_argmax_and_leave_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    model(torch.randn(32, 2) * 2 + 1).sum().backward()  # running statistics away from their start, and a .grad
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    result = decision_regions(model, (-1.0, 1.0), (-1.5, 0.5), resolution=40)
    xs, ys = np.linspace(-1, 1, 40), np.linspace(-1.5, 0.5, 40)
    grid = torch.tensor([[a, b] for b in ys for a in xs], dtype=torch.float32)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(grid).argmax(dim=1).reshape(40, 40).numpy()
    assert np.array_equal(result.classes, expected) and len(np.unique(expected)) > 1
    assert result.xx[0, :] == pytest.approx(xs) and result.yy[:, 0] == pytest.approx(ys)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    data = spiral.load_spiral(seed=0)
    x_range, y_range = padded_range(data.train[0])
    results = [decision_regions(model, x_range, y_range, resolution=20) for _ in range(2)]
    figure = plot_boundaries(results, ["ERM", "AMP"], data.train)
    assert isinstance(figure, Figure) and isinstance(results[0], BoundaryResult)


# ---------------------------------------------------------------- calibration and curves on a tiny bench


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from advreg.cli import main

    out = tmp_path_factory.mktemp("bench")
    main(
        [
            "bench",
            "--dataset",
            "digits",
            "--methods",
            "erm",
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--set",
            "model.hidden=8",
            "--jobs",
            "1",
            "--quiet",
        ]
    )
    return out


def test_bins_are_those_of_metrics():
    rng = np.random.default_rng(1)
    confidence = torch.tensor(np.r_[rng.uniform(0.1, 1.0, 500), np.arange(1, 16) / 15, 1.0])  # edges and 1.0
    correct = torch.tensor(rng.uniform(size=len(confidence)) < confidence.numpy())
    counts, accuracy, mean = bin_statistics(confidence, correct)
    ece = np.nansum(counts / len(confidence) * np.abs(accuracy - mean))
    assert counts.sum() == len(confidence)
    assert ece == pytest.approx(calibration_error(confidence, correct), abs=1e-12)


def test_reliability_matches_the_runs_metrics(bench, tmp_path):
    result = reliability(bench)
    assert result.methods == ("erm",) and len(result.ece["erm"]) == 2
    for folder, ece in zip(result.folders["erm"], result.ece["erm"]):
        assert ece == pytest.approx(json.loads((Path(folder) / "metrics.json").read_text())["test_ece"], abs=1e-9)
    assert result.counts.sum() == 359 * 2  # digits' test set, pooled over the seeds
    mean, std = result.ece_mean_std("erm")
    assert mean == pytest.approx(np.mean(result.ece["erm"])) and std == pytest.approx(np.std(result.ece["erm"], ddof=1))
    paths = save(tmp_path, "reliability", plot_reliability(result), result.arrays(), result.info())
    assert all(p.exists() for p in paths.values())
    assert set(np.load(paths["npz"], allow_pickle=False)) >= {"counts", "accuracy", "ece_mean"}
    assert json.loads(paths["json"].read_text())["methods"] == ["erm"]


def test_selected_runs_needs_a_bench(tmp_path):
    with pytest.raises(ValueError, match="results.csv"):
        selected_runs(tmp_path)


def test_curves_are_the_history(bench, tmp_path):
    folders = selected_runs(bench)["erm"]
    result = load_curves(folders)
    for folder, history in zip(folders, result.histories):
        with open(f"{folder}/history.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        for column in ("epoch", "train_loss", "train_error", "test_loss", "test_error"):
            assert history[column].tolist() == [float(r[column]) for r in rows]
    robust = tmp_path / "robust"
    robust.mkdir()
    (robust / "history.csv").write_text(
        "epoch,train_loss,train_error,test_loss,test_error,test_robust_error\n1,2.0,50,2.1,55,90\n2,1.0,30,1.5,40,80\n"
    )
    mixed = load_curves([*folders, robust])
    assert "test_robust_error" in [c for c, _ in mixed.panels()]
    assert mixed.histories[-1]["test_robust_error"].tolist() == [90.0, 80.0]
    figure = plot_curves(mixed, ["seed 0", "seed 1", "robust"])
    paths = save(tmp_path / "out", "curves", figure, mixed.arrays(), {"folders": mixed.folders})
    assert {p.suffix for p in paths.values() if p.exists()} == {".png", ".npz", ".json"}


def test_saving_the_model_free_figures(tmp_path):
    for name, result, plot in [
        ("region", region_grid((0.5, 1.0)), plot_region),
        ("amp1d", amp_1d(), plot_amp_1d),
        ("scalar", scalar_example(0.3), plot_scalar_example),
    ]:
        paths = save(tmp_path, name, plot(result), result.arrays(), {"name": name})
        loaded = np.load(paths["npz"], allow_pickle=False)
        assert all(np.array_equal(loaded[k], v) for k, v in result.arrays().items())
    assert not math.isnan(scalar_example(0.3).minimizers["amp"])
