"""Decision regions of a classifier of 2-D inputs (the AMP paper's Fig. 6: ERM's and AMP's boundaries on the
spiral). The model is evaluated in eval mode on a grid and left exactly as it was given."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from advreg.analysis import unchanged


class BoundaryResult(NamedTuple):
    """The grid (``xx``, ``yy`` of shape (res, res), as ``np.meshgrid`` gives) and the predicted class on it;
    unpacks as ``xx, yy, classes``."""

    xx: np.ndarray
    yy: np.ndarray
    classes: np.ndarray  # (res, res) int64

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}xx": self.xx, f"{prefix}yy": self.yy, f"{prefix}classes": self.classes}


def padded_range(x: np.ndarray | torch.Tensor, pad: float = 0.1) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(x_range, y_range)`` of the points ``x`` (N, 2), each widened by ``pad`` of its span on both sides."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min(axis=0), x.max(axis=0)
    margin = pad * (hi - lo)
    return (lo[0] - margin[0], hi[0] + margin[0]), (lo[1] - margin[1], hi[1] + margin[1])


def decision_regions(
    model: nn.Module,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    resolution: int = 300,
    batch_size: int = 10_000,
) -> BoundaryResult:
    """The arg-max class of ``model`` (inputs of shape (N, 2)) on a ``resolution``² grid over the ranges."""
    if not (isinstance(resolution, int) and resolution >= 2) or x_range[0] >= x_range[1] or y_range[0] >= y_range[1]:
        raise ValueError(
            f"need resolution >= 2 and increasing ranges, got {resolution!r}, {x_range} and {y_range}; "
            "pass e.g. padded_range(train_x) as the ranges"
        )
    xx, yy = np.meshgrid(np.linspace(*x_range, resolution), np.linspace(*y_range, resolution))  # (res, res)
    reference = next(model.parameters())
    grid = torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], axis=1)).to(reference.device, reference.dtype)
    with unchanged(model), torch.no_grad():
        model.eval()  # BatchNorm's running statistics, no dropout
        classes = torch.cat([model(grid[i : i + batch_size]).argmax(dim=1) for i in range(0, len(grid), batch_size)])
    return BoundaryResult(xx, yy, classes.cpu().numpy().reshape(xx.shape))


def plot_boundaries(
    results: Sequence[BoundaryResult],
    labels: Sequence[str],
    train_points: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor],
):
    """One panel per run (e.g. ERM, AMP): the decision regions filled, the training points on top by class."""
    from matplotlib.figure import Figure

    if len(results) != len(labels) or not results:
        raise ValueError(f"give one label per result, got {len(results)} results and {len(labels)} labels")
    x, y = (np.asarray(t) for t in train_points)
    k = int(max(y.max(), *(r.classes.max() for r in results))) + 1
    figure = Figure(figsize=(4 * len(results), 4))
    axes = np.atleast_1d(figure.subplots(1, len(results), sharex=True, sharey=True))
    for ax, result, label in zip(axes, results, labels):
        ax.contourf(result.xx, result.yy, result.classes, levels=np.arange(k + 1) - 0.5, cmap="Pastel1", vmin=0, vmax=8)
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="Set1", vmin=0, vmax=8, s=10, edgecolors="k", linewidths=0.3)
        ax.set(title=label, aspect="equal", xlabel="x₁")
    axes[0].set_ylabel("x₂")
    return figure
