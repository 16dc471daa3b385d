"""The empirical risk as the perturbation radius r grows: L(θ* + Δ) for random Δ on the sphere ‖Δ‖ = r and for the
worst Δ that AMP's inner ascent finds in the ball ‖Δ‖ ≤ r (AMP paper, Sec. 5.4, Fig. 8; Appendix E, Fig. 10).

The ascent takes normalised steps, Δ ← Π_r(Δ + ζ·g/‖g‖) with g = ∇L(θ*+Δ) and ζ = step_scale·r/N (2.5 r/N, the
step rule of Madry et al.'s PGD): at a minimum ‖g‖ is tiny, so AMP's raw steps ζg would hardly move at small r and
the curve would depend on ζ; normalised steps reach the sphere after ⌈N/2.5⌉ steps at every r, then slide on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advreg.analysis import unchanged
from advreg.analysis.landscape import (
    as_list,
    check_positive_int,
    check_split,
    eval_subset,
    labels_for,
    loss_and_error,
    trainable,
)
from advreg.data.splits import DataSplits
from advreg.perturb.engine import global_norm


@dataclass(frozen=True)
class RadiusConfig:
    """The radius sweep: the L2 radii of Δ, the random directions per radius and AMP's ascent steps for the worst
    Δ."""

    radii: tuple[float, ...] = tuple(i / 10 for i in range(11))  # 0, 0.1, …, 1.0 (L2, whole parameter vector)
    directions: int = 10  # random Δ per radius, the same unit directions at every radius and split
    worst_steps: int = 10  # N ascent steps of AMP's inner maximisation
    step_scale: float = 2.5  # ζ = step_scale·r/N per normalised step
    splits: tuple[str, ...] = ("train", "test")
    samples: int = 1000  # evaluation subset of each split, the same for every Δ and every model
    seed: int = 0  # the subsets' and the directions' generators
    batch_size: int = 1000

    def __post_init__(self) -> None:
        if not self.radii or any(not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0 for r in self.radii):
            raise ValueError(f"radii must be a non-empty tuple of numbers >= 0, got {self.radii!r}")
        check_positive_int("directions", self.directions, "it is the number of random Δ per radius")
        if isinstance(self.worst_steps, bool) or not isinstance(self.worst_steps, int) or self.worst_steps < 0:
            raise ValueError(f"worst_steps must be an integer >= 0 (0 skips the ascent), got {self.worst_steps!r}")
        if not (isinstance(self.step_scale, (int, float)) and self.step_scale > 0):
            raise ValueError(f"step_scale must be a number > 0 (ζ = step_scale·r/N), got {self.step_scale!r}")
        if not self.splits:
            raise ValueError("splits must name at least one of 'train' and 'test'")
        for split in self.splits:
            check_split(split)
        check_positive_int("samples", self.samples, "it is the size of the evaluation subset")
        check_positive_int("batch_size", self.batch_size, "lower it if evaluation runs out of memory")


@dataclass(frozen=True, eq=False)
class RadiusResult:
    radii: np.ndarray  # (R,)
    splits: tuple[str, ...]  # the rows of the arrays below
    random_mean: np.ndarray  # (P, R): mean over the random directions of L(θ*+Δ), ‖Δ‖ = r
    random_std: np.ndarray  # (P, R): their population standard deviation
    worst: np.ndarray  # (P, R): the largest L(θ*+Δ) along the ascent, ‖Δ‖ ≤ r
    config: RadiusConfig


def sphere_direction(model: nn.Module, radius: float, generator: torch.Generator) -> list[Tensor]:
    """Δ uniform on the sphere ‖Δ‖ = radius of the whole trainable-parameter vector: one Gaussian, scaled as a whole
    (a Gaussian's direction is uniform on the sphere). Drawn on the CPU, so a seed gives the same Δ anywhere."""
    g = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in trainable(model)]
    return _scaled(g, radius / global_norm(g))


def radius_sweep(
    model: nn.Module, data: DataSplits, config: RadiusConfig = RadiusConfig(), *, progress: bool = False
) -> RadiusResult:
    """For each split and radius: the random directions' mean and std loss, and the ascent's worst loss, the model
    in eval mode; it is left unchanged."""
    from tqdm.auto import tqdm

    per_radius = config.directions + (config.worst_steps + 1)
    with tqdm(total=len(config.splits) * len(config.radii) * per_radius, desc="radius", disable=not progress) as bar:
        rows = [_split_curves(model, data, config, split, bar) for split in config.splits]  # P × (3, R)
    curves = np.stack(rows)  # (P, 3, R)
    return RadiusResult(
        np.asarray(config.radii, dtype=float), tuple(config.splits), curves[:, 0], curves[:, 1], curves[:, 2], config
    )


def _split_curves(model: nn.Module, data: DataSplits, config: RadiusConfig, split: str, bar) -> np.ndarray:
    x, y = eval_subset(data, split, config.samples, config.seed)
    out = np.empty((3, len(config.radii)))  # rows: random mean, random std, worst
    with unchanged(model):
        model.eval()
        params, theta = trainable(model), [p.detach().clone() for p in trainable(model)]
        for k, r in enumerate(config.radii):
            losses = _random_losses(model, params, theta, x, y, r, config, bar)
            out[:, k] = losses.mean(), losses.std(), worst_in_ball(model, params, theta, x, y, r, config, bar)[0]
    return out


def _random_losses(
    model: nn.Module,
    params: list[Tensor],
    theta: list[Tensor],
    x: Tensor,
    y: Tensor,
    r: float,
    config: RadiusConfig,
    bar,
) -> np.ndarray:
    generator = torch.Generator().manual_seed(config.seed)  # the same directions at every r: smoother curves
    losses = np.empty(config.directions)
    for i in range(config.directions):
        _set(params, theta, sphere_direction(model, r, generator))
        losses[i] = loss_and_error(model, x, y, config.batch_size)[0]
        bar.update()
    return losses


def worst_in_ball(
    model: nn.Module,
    params: list[Tensor],
    theta: list[Tensor],
    x: Tensor,
    y: Tensor,
    r: float,
    config: RadiusConfig,
    bar,
) -> tuple[float, list[Tensor]]:
    """The largest L(θ*+Δ_t) over the iterates Δ_0 = 0, …, Δ_N of the projected ascent, and the last Δ."""
    delta = [torch.zeros_like(t) for t in theta]
    zeta = config.step_scale * r / max(config.worst_steps, 1)
    worst = -math.inf
    for _ in range(config.worst_steps if r > 0 else 0):  # at r = 0 the ball is θ* alone
        _set(params, theta, delta)
        loss, g = loss_and_grad(model, params, x, y, config.batch_size)
        worst = max(worst, loss)
        delta = _project([dl + gl for dl, gl in zip(delta, _scaled(g, zeta / global_norm(g).clamp_min(1e-30)))], r)
        bar.update()
    _set(params, theta, delta)
    worst = max(worst, loss_and_error(model, x, y, config.batch_size)[0])
    bar.update(1 + (config.worst_steps if r == 0 else 0))
    return worst, delta


def loss_and_grad(
    model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor, batch_size: int
) -> tuple[float, list[Tensor]]:
    """Mean cross-entropy on (x, y), summed like :func:`loss_and_error` (the same number), and its gradient."""
    device = next(model.parameters()).device
    total, grads = 0.0, [torch.zeros_like(p) for p in params]
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        batch_sum = F.cross_entropy(model(xb), yb, reduction="sum")
        total += batch_sum.double().item()
        parts = torch.autograd.grad(batch_sum / len(y), params, allow_unused=True)  # an unused parameter: None
        grads = [g if part is None else g + part for g, part in zip(grads, parts)]
    return total / len(y), grads


def _scaled(vs: list[Tensor], factor: Tensor | float) -> list[Tensor]:
    return [v * factor for v in vs]


def _project(delta: list[Tensor], r: float) -> list[Tensor]:
    """Π_r: Δ·min(1, r/‖Δ‖), the whole vector at once (the paper's ball; AMP's norm="global")."""
    return _scaled(delta, (r / global_norm(delta)).clamp(max=1.0))


@torch.no_grad()
def _set(params: list[Tensor], theta: list[Tensor], delta: list[Tensor]) -> None:
    for p, t, d in zip(params, theta, delta):
        p.copy_(t + d)  # θ* + Δ, from θ* each time


def cost(model: nn.Module, data: DataSplits, config: RadiusConfig = RadiusConfig()) -> str:
    """A one-line estimate of the work, for the CLI to print before it starts."""
    n = {s: min(config.samples, len(getattr(data, s)[1])) for s in config.splits}
    evaluations = len(config.radii) * (config.directions + config.worst_steps + 1)
    sizes = ", ".join(f"{evaluations} of {n[s]} {s}" for s in config.splits)
    return (
        f"{len(config.radii)} radii × ({config.directions} random + {config.worst_steps + 1} ascent) "
        f"evaluations per split: {sizes} samples ({config.worst_steps} per radius also backpropagate)"
    )


def plot(results: RadiusResult | list[RadiusResult], labels: Sequence[str] | None = None):
    """Loss against radius, one panel per split; a colour per run, random directions solid (± std band), the
    ascent's worst case dashed."""
    from matplotlib.figure import Figure

    results = as_list(results)
    labels = labels_for(results, labels)
    splits = results[0].splits
    if any(r.splits != splits for r in results):
        raise ValueError("the results were computed on different splits; compute them with the same config.splits")
    figure = Figure(figsize=(5 * len(splits), 4))
    for p, split in enumerate(splits):
        ax = figure.add_subplot(1, len(splits), p + 1)
        for i, (result, label) in enumerate(zip(results, labels)):
            mean, std = result.random_mean[p], result.random_std[p]
            ax.plot(result.radii, mean, color=f"C{i}", label=f"{label} random")
            ax.fill_between(result.radii, mean - std, mean + std, color=f"C{i}", alpha=0.2, linewidth=0)
            ax.plot(result.radii, result.worst[p], color=f"C{i}", linestyle="--", label=f"{label} worst")
        ax.set(xlabel="radius r = ‖Δ‖", ylabel="loss L(θ* + Δ)", title=f"{split} set")
        ax.legend(fontsize=8)
    return figure


def to_arrays(result: RadiusResult) -> dict[str, np.ndarray]:
    return {
        "radii": result.radii,
        "splits": np.asarray(result.splits),
        "random_mean": result.random_mean,
        "random_std": result.random_std,
        "worst": result.worst,
    }
