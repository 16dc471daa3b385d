"""ECE (AMP paper, Appendix D), NLL and error against definitions written out in the test."""

import math

import pytest
import torch
import torch.nn.functional as F

from advreg.metrics import calibration_error, error_rate, expected_calibration_error, nll


def brute_force_ece(confidence, correct, n_bins=15):
    """Appendix D literally: bins I_m = ((m-1)/M, m/M], ECE = Σ |B_m|/n |acc - conf|."""
    n, total = len(confidence), 0.0
    for m in range(1, n_bins + 1):
        lo, hi = (m - 1) / n_bins, m / n_bins
        members = [i for i in range(n) if lo < confidence[i] <= hi]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            conf = sum(confidence[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - conf)
    return total


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_the_definition_on_random_predictions(n_bins):
    gen = torch.Generator().manual_seed(n_bins)
    logits = 3 * torch.randn(500, 10, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 10, (500,), generator=gen)
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    expected = brute_force_ece(conf.tolist(), (pred == targets).tolist(), n_bins)
    assert expected_calibration_error(logits, targets, n_bins) == pytest.approx(expected, abs=1e-12)
    assert expected > 0.01  # not a trivial case


def test_confidence_exactly_one_is_counted_in_the_last_bin():
    # a wrong prediction made with confidence 1.0: torchmetrics' open last bin would report ECE 0
    logits = torch.tensor([[100.0, 0.0]], dtype=torch.float64)
    assert logits.softmax(1).max().item() == 1.0
    assert expected_calibration_error(logits, torch.tensor([1])) == pytest.approx(1.0)


def test_bin_edges_are_closed_on_the_right():
    # 2/15 belongs to bin (1/15, 2/15], not to (2/15, 3/15]: with the other sample there, the gaps cancel
    conf = torch.tensor([2 / 15, 0.14], dtype=torch.float64)
    correct = torch.tensor([True, False])
    assert calibration_error(conf, correct) == pytest.approx(brute_force_ece(conf.tolist(), [1, 0]))
    same_bin = torch.tensor([2 / 15, 2 / 15 - 1e-3], dtype=torch.float64)
    assert calibration_error(same_bin, correct) == pytest.approx(brute_force_ece(same_bin.tolist(), [1, 0]), abs=1e-12)
    assert calibration_error(same_bin, correct) == pytest.approx(abs(0.5 - (2 / 15 - 5e-4)), abs=1e-12)


def test_perfectly_calibrated_bins_give_zero():
    conf = torch.full((10,), 0.7, dtype=torch.float64)
    correct = torch.tensor([1] * 7 + [0] * 3, dtype=torch.bool)
    assert calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)


def test_bad_bins_and_shapes_raise():
    with pytest.raises(ValueError, match="n_bins"):
        calibration_error(torch.ones(3), torch.ones(3, dtype=torch.bool), n_bins=0)
    with pytest.raises(ValueError, match="1-D"):
        calibration_error(torch.ones(3), torch.ones(4, dtype=torch.bool))


def test_nll_and_error():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    targets = torch.tensor([0, 2, 2])
    expected = (
        -(
            math.log(math.exp(2) / (math.exp(2) + 2))
            + math.log(1 / (2 + math.e))
            + math.log(math.exp(5) / (math.exp(5) + 2))
        )
        / 3
    )
    assert nll(logits, targets) == pytest.approx(expected, rel=1e-6)
    assert nll(logits, targets) == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert error_rate(logits, targets) == pytest.approx(1 / 3)


def test_top5_error_with_many_classes_only():
    from advreg.evaluate import evaluate

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 20)
    x, y = torch.randn(50, 4), torch.randint(0, 20, (50,))
    logits = model(x).detach()
    ranks = (logits > logits.gather(1, y[:, None])).sum(dim=1)  # how many classes score above the label
    assert evaluate(model, x, y)["top5_error"] == pytest.approx(100.0 * (ranks >= 5).double().mean().item())
    assert "top5_error" not in evaluate(torch.nn.Linear(4, 10), x, y % 10)
