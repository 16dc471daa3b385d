"""Loss surfaces around θ*: L(θ* + α·d) and L(θ* + α·d + β·e) along filter-normalised random directions.

Li et al., "Visualizing the loss landscape of neural nets" (NeurIPS 2018, Sec. 4), as in the AMP paper's Fig. 12-13;
with an ``attack``, the AWP paper's weight-loss landscape (Appendix B, Algorithm 1): at every point the loss is on PGD
examples crafted anew for that perturbed model. Also the evaluation helpers that radius.py and hessian.py share: a
seeded subset of a split, its mean loss.
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
from advreg.attacks import pgd
from advreg.data.splits import DataSplits
from advreg.evaluate import AttackSettings

SPLITS = ("train", "test")


# ---- shared by the three analyses -------------------------------------------------------------------------------


def eval_subset(data: DataSplits, split: str, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """``samples`` rows of ``data.<split>`` (all of them if it has fewer), drawn without replacement by a generator
    seeded with ``seed`` and kept in data order: the same rows for every model, so runs compare on one subset."""
    check_split(split)
    x, y = getattr(data, split)
    if len(y) == 0:
        raise ValueError(f"the {split} split of {data.name!r} is empty; choose the other split")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=generator)[: min(samples, len(y))].sort().values
    return x[idx], y[idx]


@torch.no_grad()
def loss_and_error(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and error (%) of ``model`` as it is now (the caller sets eval mode) on (x, y)."""
    device = next(model.parameters()).device
    total, wrong = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        logits = model(xb)  # (B, K)
        total += F.cross_entropy(logits, yb, reduction="sum").double().item()
        wrong += int((logits.argmax(dim=1) != yb).sum().item())
    return total / len(y), 100.0 * wrong / len(y)


def trainable(model: nn.Module) -> list[Tensor]:
    """The parameters that the analyses move: those that train (a frozen layer is part of the architecture)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True; unfreeze the layers to analyse")
    return params


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def check_positive_int(name: str, value: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}; {hint}")


def labels_for(results: Sequence, labels: Sequence[str] | None) -> list[str]:
    """``labels``, or ``run 0``, ``run 1``, … when none are given; one per result."""
    labels = [f"run {i}" for i in range(len(results))] if labels is None else list(labels)
    if len(labels) != len(results):
        raise ValueError(f"got {len(results)} results but {len(labels)} labels; pass one label per result")
    return labels


def as_list(results) -> list:
    return list(results) if isinstance(results, (list, tuple)) else [results]


# ---- the landscape ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LandscapeConfig:
    """The loss landscape's grid: a curve or a surface, its points per axis and its span."""

    dims: int = 1  # 1: a curve along d; 2: a surface over (d, e)
    steps: int = 41  # points per axis; odd, so that α = 0 is on the grid
    span: float = 1.0  # α, β ∈ [−span, span], in units of the filter norms
    samples: int = 1000  # evaluation subset of the split, the same for every point and every model
    split: str = "train"
    seed: int = 0  # the subset's and the directions' generators
    batch_size: int = 1000

    def __post_init__(self) -> None:
        if self.dims not in (1, 2):
            raise ValueError(f"dims must be 1 (a curve) or 2 (a surface), got {self.dims!r}")
        check_positive_int("steps", self.steps, "it is the number of points per axis (Li et al. use 51)")
        if not (isinstance(self.span, (int, float)) and math.isfinite(self.span) and self.span > 0):
            raise ValueError(f"span must be a number > 0 (α ∈ [−span, span]), got {self.span!r}")
        check_positive_int("samples", self.samples, "it is the size of the evaluation subset")
        check_positive_int("batch_size", self.batch_size, "lower it if evaluation runs out of memory")
        check_split(self.split)


@dataclass(frozen=True, eq=False)
class LandscapeResult:
    alphas: np.ndarray  # (S,)
    betas: np.ndarray | None  # (S,) for dims = 2
    loss: np.ndarray  # (S,) or (S, S): loss[i, j] at θ* + α_i·d + β_j·e
    error: np.ndarray  # same shape, %
    config: LandscapeConfig
    attack: AttackSettings | None = None  # set: the loss is on PGD examples of each perturbed model (AWP)


def random_direction(model: nn.Module, generator: torch.Generator, ignore_bias_bn: bool = True) -> list[Tensor]:
    """A Gaussian direction, one tensor per trainable parameter, with each filter rescaled to its weights' norm.

    A filter is a slice along dim 0 (an output row of a Linear, an output channel of a Conv), so that the
    direction moves every unit in proportion to its own scale (Li et al., Eq. 1); this is what makes the plots of
    two networks comparable despite scale invariance. Tensors of dim ≤ 1 (biases, BatchNorm) get 0, or, with
    ``ignore_bias_bn=False``, are rescaled as one filter. Drawn on the CPU, so a seed gives the same d anywhere.
    """
    return [
        _filter_normalised(
            p.detach(), torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device), ignore_bias_bn
        )
        for p in trainable(model)
    ]


def _filter_normalised(theta: Tensor, d: Tensor, ignore_bias_bn: bool) -> Tensor:
    if theta.dim() <= 1:
        return torch.zeros_like(d) if ignore_bias_bn else d * (theta.norm() / (d.norm() + 1e-10))
    scale = theta.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-10)  # (F,) ‖θ_f‖ / ‖d_f‖
    return d * scale.view(-1, *[1] * (theta.dim() - 1))  # broadcast over each filter's slice


def landscape(
    model: nn.Module,
    data: DataSplits,
    config: LandscapeConfig = LandscapeConfig(),
    *,
    attack: AttackSettings | None = None,
    progress: bool = False,
) -> LandscapeResult:
    """The loss and error on the seeded subset at every grid point, the model in eval mode; it is left unchanged.

    With ``attack``, the adversarial loss ρ(θ* + α·d) of the AWP paper's Algorithm 1: PGD examples of the subset
    are crafted for each perturbed model (random starts from a generator seeded per point, as reproducible)."""
    from tqdm.auto import tqdm

    x, y = eval_subset(data, config.split, config.samples, config.seed)
    alphas = np.linspace(-config.span, config.span, config.steps)
    betas = alphas.copy() if config.dims == 2 else None
    grid = [(a, b) for a in alphas for b in (betas if betas is not None else [0.0])]  # row-major: α outer
    values = np.empty((len(grid), 2))
    with unchanged(model):
        model.eval()
        generator = torch.Generator().manual_seed(config.seed)
        d = random_direction(model, generator)
        e = random_direction(model, generator) if config.dims == 2 else [torch.zeros_like(t) for t in d]
        params, theta = trainable(model), [p.detach().clone() for p in trainable(model)]
        for k, (a, b) in enumerate(tqdm(grid, desc="landscape", disable=not progress)):
            _move(params, theta, d, e, float(a), float(b))
            inputs = x if attack is None else _adversarial(model, x, y, attack, config, seed=k)
            values[k] = loss_and_error(model, inputs, y, config.batch_size)
    shape = (config.steps,) * config.dims
    return LandscapeResult(alphas, betas, values[:, 0].reshape(shape), values[:, 1].reshape(shape), config, attack)


def _adversarial(
    model: nn.Module, x: Tensor, y: Tensor, s: AttackSettings, config: LandscapeConfig, seed: int
) -> Tensor:
    generator = torch.Generator().manual_seed(config.seed * 100_003 + seed)
    return torch.cat(
        [
            pgd(
                model,
                x[i : i + config.batch_size],
                y[i : i + config.batch_size],
                s.eps,
                s.alpha,
                s.steps,
                norm=s.norm,
                box=s.box,
                generator=generator,
            )
            for i in range(0, len(y), config.batch_size)
        ]
    )


@torch.no_grad()
def _move(params: list[Tensor], theta: list[Tensor], d: list[Tensor], e: list[Tensor], a: float, b: float) -> None:
    for p, t, dp, ep in zip(params, theta, d, e):
        p.copy_(t + a * dp + b * ep)  # from θ* each time: no drift from repeated additions


def cost(model: nn.Module, data: DataSplits, config: LandscapeConfig = LandscapeConfig()) -> str:
    """A one-line estimate of the work, for the CLI to print before it starts."""
    n = min(config.samples, len(getattr(data, config.split)[1]))
    points = config.steps**config.dims
    grid = f"{config.steps} × {config.steps} = {points}" if config.dims == 2 else f"{points}"
    weights = sum(p.numel() for p in trainable(model))
    return f"{grid} evaluations of {n} {config.split} samples ({weights:,} parameters)"


def plot(results: LandscapeResult | list[LandscapeResult], labels: Sequence[str] | None = None):
    """1-D: the runs' loss curves on one axes. 2-D: a contour panel per run (top row, shared levels) and a 3-D
    surface of each (bottom row)."""
    results = as_list(results)
    labels = labels_for(results, labels)
    dims = {r.config.dims for r in results}
    if len(dims) != 1:
        raise ValueError("plot 1-D and 2-D landscapes separately; the results mix both")
    return _plot_curves(results, labels) if dims == {1} else _plot_surfaces(results, labels)


def _plot_curves(results: list[LandscapeResult], labels: list[str]):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4), layout="constrained")
    ax = figure.add_subplot(1, 1, 1)
    for result, label in zip(results, labels):
        ax.plot(result.alphas, result.loss, label=label)
    kind = "adversarial loss (PGD per point)" if results[0].attack is not None else "loss"
    ax.set(
        xlabel="α (filter-normalised direction)",
        ylabel=f"{results[0].config.split} {kind}",
        title="loss along a random direction",
    )
    ax.legend()
    return figure


def _plot_surfaces(results: list[LandscapeResult], labels: list[str]):
    import mpl_toolkits.mplot3d  # noqa: F401  (registers the "3d" projection on older matplotlib)
    from matplotlib.figure import Figure

    n = len(results)
    figure = Figure(figsize=(4.5 * n, 8.5), layout="constrained")
    low, high = min(r.loss.min() for r in results), max(r.loss.max() for r in results)
    levels = contour_levels(low, high)  # shared: the panels compare by eye
    for i, (result, label) in enumerate(zip(results, labels)):
        a, b = np.meshgrid(result.alphas, result.betas, indexing="ij")  # (S, S), like loss
        flat = figure.add_subplot(2, n, i + 1)
        contours = flat.contour(a, b, result.loss, levels=levels)
        flat.clabel(contours, fontsize=6)
        flat.set(xlabel="α", ylabel="β", title=label, aspect="equal")
        surface = figure.add_subplot(2, n, n + i + 1, projection="3d")
        surface.plot_surface(a, b, result.loss, cmap="viridis", linewidth=0)
        surface.set(xlabel="α", ylabel="β", zlabel="loss", zlim=(low, high) if high > low else None)
    return figure


def contour_levels(low: float, high: float) -> np.ndarray | None:
    """21 contour levels: geometric when the loss spans decades (a minimum near 0 would get one line), else linear."""
    if not high > low:
        return None
    if low > 0 and high / low > 100:
        return np.geomspace(low, high, 21)
    return np.linspace(low, high, 21)


def to_arrays(result: LandscapeResult) -> dict[str, np.ndarray]:
    arrays = {"alphas": result.alphas, "loss": result.loss, "error": result.error}
    if result.betas is not None:
        arrays["betas"] = result.betas
    return arrays
