"""The 2-D toy of the AMM paper (Sec. 3.3.3, Fig. 1): linear classifiers trained on the margin term alone.

Two classes drawn uniformly from the rectangles [-1.01, -0.99] × [-4, 2] and [0.99, 1.01] × [-2, 4], 200 training
and 200 test points each; f(x) = wᵀx + b (a 2-output linear layer, whose boundary is f₁ - f₀ = 0) trained to
minimize λ·L_DD with λ = c = d = 1: SGD, batch 20, 1000 epochs, lr 0.1 halved every 250 epochs, momentum 0.9,
weight decay 1e-4. The widest separating margin is 0.99 (the line x₁ = 0); AVG+LIN settles near the normal of
the line between the class centres (-1, -1) and (1, 1), MIN should approach the widest margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import Tensor, nn

from advreg.losses.amm import AMMLoss

RECTANGLES = (((-1.01, -0.99), (-4.0, 2.0)), ((0.99, 1.01), (-2.0, 4.0)))  # class 0, class 1: (x₁ range, x₂ range)
SETTINGS = (("avg", "lin"), ("avg", "exp"), ("avg", "inv"), ("min", "lin"))


def rectangles(per_class: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``per_class`` points of each class, uniform in its rectangle; float64 (N, 2) inputs and (N,) labels."""
    xs, ys = [], []
    for label, ((x_lo, x_hi), (y_lo, y_hi)) in enumerate(RECTANGLES):
        u = torch.rand(per_class, 2, generator=generator, dtype=torch.float64)
        xs.append(torch.stack([x_lo + (x_hi - x_lo) * u[:, 0], y_lo + (y_hi - y_lo) * u[:, 1]], dim=1))
        ys.append(torch.full((per_class,), label))
    return torch.cat(xs), torch.cat(ys)


@dataclass
class ToyResult:
    aggregation: str
    shrinkage: str
    w: list[float]  # the boundary w·x + b = 0 of f₁ - f₀
    b: float
    train_accuracy: float
    test_accuracy: float
    train_margin: float  # signed: min over points of y·(w·x + b)/‖w‖, y = ±1 (negative if some point is wrong)
    test_margin: float


def signed_margin(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray) -> float:
    """min_i s_i·(w·x_i + b)/‖w‖ with s = +1 for class 1 and -1 for class 0: the margin if positive."""
    s = np.where(y == 1, 1.0, -1.0)
    return float((s * (x @ w + b)).min() / np.linalg.norm(w))


def optimal_margin(x: np.ndarray, y: np.ndarray) -> float:
    """The widest margin of any line (the hard-margin SVM's), by a 1-D search over the normal's angle."""

    def negative_margin(angle: float) -> float:
        w = np.array([math.cos(angle), math.sin(angle)])
        return -(((x[y == 1] @ w).min() - (x[y == 0] @ w).max()) / 2)  # the best offset centres the gap

    angles = np.linspace(-math.pi / 2, math.pi / 2, 3601)
    start = angles[int(np.argmin([negative_margin(a) for a in angles]))]
    best = minimize_scalar(
        negative_margin, bounds=(start - 1e-3, start + 1e-3), method="bounded", options={"xatol": 1e-12}
    )
    return float(-best.fun)


def train_linear(
    aggregation: str,
    shrinkage: str,
    x: Tensor,
    y: Tensor,
    epochs: int = 1000,
    seed: int = 0,
    lam: float = 1.0,
    c: float = 1.0,
    d: float = 1.0,
) -> nn.Linear:
    """The paper's toy training: the margin term alone (no cross-entropy), SGD as described above."""
    torch.manual_seed(seed)
    model = nn.Linear(2, 2).double()
    regularizer = AMMLoss(None, lam=lam, c=c, d=d, aggregation=aggregation, shrinkage=shrinkage)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=250, gamma=0.5)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(20):
            optimizer.zero_grad()
            loss = regularizer.regularizer(model, x[batch], y[batch])
            if loss.requires_grad:  # MIN may keep no sample of a batch
                loss.backward()
                optimizer.step()
        schedule.step()
    return model


def evaluate_linear(
    model: nn.Linear, aggregation: str, shrinkage: str, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
) -> ToyResult:
    weight, bias = model.weight.detach().numpy(), model.bias.detach().numpy()
    w, b = weight[1] - weight[0], float(bias[1] - bias[0])
    (x_tr, y_tr), (x_te, y_te) = ((x.numpy(), y.numpy()) for x, y in (train, test))

    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        return float(100.0 * ((x @ w + b > 0) == (y == 1)).mean())

    return ToyResult(
        aggregation,
        shrinkage,
        w.tolist(),
        b,
        accuracy(x_tr, y_tr),
        accuracy(x_te, y_te),
        signed_margin(w, b, x_tr, y_tr),
        signed_margin(w, b, x_te, y_te),
    )
