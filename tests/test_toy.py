"""The AMM paper's 2-D toy (Fig. 1): the data, the widest margin, and MIN against AVG on the margin term alone."""

import math

import numpy as np
import torch

from advreg.toy import evaluate_linear, optimal_margin, rectangles, signed_margin, train_linear


def test_rectangles_lie_in_the_papers_boxes():
    x, y = rectangles(200, torch.Generator().manual_seed(0))
    assert x.shape == (400, 2) and torch.equal(torch.bincount(y), torch.tensor([200, 200]))
    a, b = x[y == 0], x[y == 1]
    assert a[:, 0].min() >= -1.01 and a[:, 0].max() <= -0.99 and a[:, 1].min() >= -4 and a[:, 1].max() <= 2
    assert b[:, 0].min() >= 0.99 and b[:, 0].max() <= 1.01 and b[:, 1].min() >= -2 and b[:, 1].max() <= 4


def test_optimal_margin_is_the_best_line_found_by_brute_force():
    x, y = (t.numpy() for t in rectangles(60, torch.Generator().manual_seed(1)))
    best = optimal_margin(x, y)
    brute = max(
        (((x[y == 1] @ w).min() - (x[y == 0] @ w).max()) / 2)
        for w in (np.array([math.cos(a), math.sin(a)]) for a in np.linspace(-1.5, 1.5, 30001))
    )
    assert best >= brute - 1e-12 and best - brute < 1e-5  # the grid is 1e-4 rad apart
    assert 0.98 < best < 1.0  # the gap between x₁ = -0.99 and 0.99, give or take the sampled extremes
    w = np.array([1.0, 0.0])
    assert signed_margin(w, 0.0, x, y) == (np.abs(x[:, 0])).min()


def test_min_reaches_the_widest_margin_where_avg_lin_does_not():
    generator = torch.Generator().manual_seed(0)
    train, test = rectangles(100, generator), rectangles(100, generator)
    best = optimal_margin(train[0].numpy(), train[1].numpy())
    results = {
        agg: evaluate_linear(train_linear(agg, "lin", *train, epochs=15), agg, "lin", train, test)
        for agg in ("min", "avg")
    }
    assert results["min"].train_margin > 0.97 * best and results["min"].test_accuracy == 100.0
    assert results["avg"].train_margin < 0  # the normal of the line between the class centres misclassifies
