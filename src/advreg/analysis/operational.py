"""The AMP paper's pictures that need no model: the operational region (Corollary 2, Fig. 4), the AMP loss as a
max-pooling of a 1-D empirical risk (Fig. 1), and the scalar example where AMP is not adversarial training
(Appendix C, Fig. 9). Zheng, Zhang & Mao, CVPR 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# ε²/(2σ₁²) of Fig. 4 (right): the figure is an image and its text gives no values, so these are ours
FIG4_RATIOS = (0.1, 0.25, 0.5, 1.0, 2.0)
GOLDEN = (math.sqrt(5) - 1) / 2  # 1/φ


# ---------------------------------------------------------------- Corollary 2 and Fig. 4: the operational region


def _check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"ratio is ε²/(2σ₁²) and must be a finite number > 0, got {ratio!r}; pass e.g. 0.5")


def r_threshold(beta: np.ndarray, ratio: float) -> np.ndarray:
    """Corollary 2's lower bound on r, 1/(1 + (2σ₁²/ε²) log β), where β > exp(-ε²/(2σ₁²)); +inf elsewhere."""
    _check_ratio(ratio)
    beta = np.asarray(beta, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = 1.0 + np.log(beta) / ratio  # 2σ₁²/ε² = 1/ratio
        return np.where((beta > math.exp(-ratio)) & (beta < 1), 1.0 / denominator, np.inf)


def in_region(beta: np.ndarray, r: np.ndarray, ratio: float) -> np.ndarray:
    """Eq. (15): β > exp(-ε²/(2σ₁²)) and r > 1/(1 + (2σ₁²/ε²) log β), i.e. γ*_{2,AMP} < γ*_{1,AMP} (Eq. 14).

    ``ratio`` is ε²/(2σ₁²); ``beta`` and ``r`` broadcast. Points outside the corollary's setting (β not in (0, 1),
    r ≤ 0) are outside the region: there the ERM minimum of μ₁ is not the lower one, so nothing is deviated from.
    """
    _check_ratio(ratio)
    beta, r = np.broadcast_arrays(np.asarray(beta, dtype=np.float64), np.asarray(r, dtype=np.float64))
    setting = (beta > 0) & (beta < 1) & (r > 0)
    return setting & (beta > math.exp(-ratio)) & (r > r_threshold(beta, ratio))


@dataclass(frozen=True)
class OperationalResult:
    """Corollary 2's region on a (β, r) grid: ``mask[k, i, j]`` is ``in_region(betas[j], rs[i], ratios[k])``."""

    ratios: np.ndarray  # (k,)
    betas: np.ndarray  # (nb,)
    rs: np.ndarray  # (nr,)
    mask: np.ndarray  # (k, nr, nb) bool
    thresholds: np.ndarray  # (k, nb): the lower bound on r, +inf where no r qualifies

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "ratios": self.ratios,
            "betas": self.betas,
            "rs": self.rs,
            "mask": self.mask,
            "thresholds": self.thresholds,
        }


def region_grid(
    ratios: tuple[float, ...] = FIG4_RATIOS, betas: np.ndarray | None = None, rs: np.ndarray | None = None
) -> OperationalResult:
    """The region for each ε²/(2σ₁²) in ``ratios`` on a grid; default β in (0, 1), r in (0, 10]."""
    betas = np.linspace(0.0, 1.0, 401)[1:-1] if betas is None else np.asarray(betas, dtype=np.float64)
    rs = np.linspace(0.0, 10.0, 401)[1:] if rs is None else np.asarray(rs, dtype=np.float64)
    if betas.ndim != 1 or rs.ndim != 1 or not len(ratios):
        raise ValueError("betas and rs must be 1-D arrays and ratios non-empty; pass e.g. ratios=(0.5, 1.0)")
    mask = np.stack([in_region(betas[None, :], rs[:, None], q) for q in ratios])
    thresholds = np.stack([r_threshold(betas, q) for q in ratios])
    return OperationalResult(np.asarray(ratios, dtype=np.float64), betas, rs, mask, thresholds)


def plot_region(result: OperationalResult):
    """Fig. 4 (right): one filled region per ε²/(2σ₁²) in the (β, r) plane, the smaller ratios on top."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 4), layout="constrained")
    ax = figure.add_subplot()
    top = result.rs.max()
    colors = _colors(len(result.ratios))
    for k in np.argsort(-result.ratios):  # the regions are nested: draw the largest first
        lower = np.minimum(result.thresholds[k], top)
        ax.fill_between(
            result.betas,
            lower,
            top,
            where=lower < top,
            color=colors[k],
            alpha=0.6,
            linewidth=0,
            label=f"ε²/2σ₁² = {result.ratios[k]:g}",
        )
    ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle="--")  # r > 1: μ₂ must be flatter
    ax.set(
        xlim=(0, 1),
        ylim=(0, top),
        xlabel="β = A₂/A₁",
        ylabel="r = σ₂²/σ₁²",
        title="Operational region of AMP (Corollary 2)",
    )
    ax.legend(loc="upper left", fontsize=8)
    return figure


def _colors(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["viridis"](v) for v in np.linspace(0.1, 0.9, n)]


# ---------------------------------------------------------------- Fig. 1: the AMP loss of a 1-D empirical risk


def gaussian_well(theta: np.ndarray, mu: float, sigma: float, depth: float) -> np.ndarray:
    """The paper's inverted Gaussian surface (Eq. 7) in 1-D without its constant: -A exp(-(θ-μ)²/(2σ²))."""
    return -depth * np.exp(-((np.asarray(theta) - mu) ** 2) / (2 * sigma**2))


def sharp_flat_loss(theta: np.ndarray) -> np.ndarray:
    """Our 1-D empirical risk for Fig. 1: C = 1 minus two Gaussian wells (Eq. 7), a sharp deep one at θ = -1.5
    (A₁ = 1, σ₁ = 0.25) and a flat shallower one at θ = 1.5 (A₂ = 0.8, σ₂ = 1). ERM picks the sharp one; with
    ε = 0.5 (ε²/2σ₁² = 2, β = 0.8, r = 16, inside Corollary 2's region) AMP picks the flat one."""
    return 1.0 + gaussian_well(theta, -1.5, 0.25, 1.0) + gaussian_well(theta, 1.5, 1.0, 0.8)


def amp_loss_1d(
    loss: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, epsilon: float, points: int = 2001
) -> np.ndarray:
    """L_AMP(θ) = max_{|δ|≤ε} L(θ+δ) (Eq. 3 in 1-D) as a dense max over ``points`` δ in [-ε, ε], ends included."""
    if not epsilon >= 0 or points < 2:
        raise ValueError(f"epsilon must be >= 0 and points >= 2, got {epsilon!r} and {points!r}")
    deltas = np.linspace(-epsilon, epsilon, points)  # (P,)
    theta = np.asarray(theta, dtype=np.float64)
    return np.asarray(loss(theta[..., None] + deltas)).max(axis=-1)  # (*θ,)


@dataclass(frozen=True)
class Amp1dResult:
    """The curves of Fig. 1 on a θ grid, and where each is lowest."""

    theta: np.ndarray
    erm: np.ndarray
    amp: np.ndarray
    epsilon: float
    theta_erm: float = field(init=False)
    theta_amp: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "theta_erm", float(self.theta[np.argmin(self.erm)]))
        object.__setattr__(self, "theta_amp", float(self.theta[np.argmin(self.amp)]))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"theta": self.theta, "erm": self.erm, "amp": self.amp}


def amp_1d(
    epsilon: float = 0.5, theta: np.ndarray | None = None, loss: Callable[[np.ndarray], np.ndarray] = sharp_flat_loss
) -> Amp1dResult:
    """``loss`` and its AMP loss on ``theta`` (default [-4, 5])."""
    theta = np.linspace(-4.0, 5.0, 1801) if theta is None else np.asarray(theta, dtype=np.float64)
    return Amp1dResult(theta, np.asarray(loss(theta), dtype=np.float64), amp_loss_1d(loss, theta, epsilon), epsilon)


def plot_amp_1d(result: Amp1dResult):
    """Fig. 1: the empirical risk (left); the same with its AMP loss, a max-pool of width 2ε (right, blue)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.5), layout="constrained")
    left, right = figure.subplots(1, 2, sharey=True)
    for ax in (left, right):
        ax.plot(result.theta, result.erm, color="0.2", label="L_ERM")
        ax.set_xlabel("θ")
    left.axvline(result.theta_erm, color="tab:red", linestyle=":", label=f"ERM minimum θ = {result.theta_erm:.2f}")
    right.plot(result.theta, result.amp, color="tab:blue", label=f"L_AMP (ε = {result.epsilon:g})")
    right.axvline(result.theta_amp, color="tab:blue", linestyle=":", label=f"AMP minimum θ = {result.theta_amp:.2f}")
    left.set(ylabel="loss", title="Empirical risk")
    right.set_title("AMP loss")
    for ax in (left, right):
        ax.legend(fontsize=8)
    return figure


# ---------------------------------------------------------------- Fig. 9: AMP is not adversarial training


def g(z: np.ndarray) -> np.ndarray:
    """Appendix C's loss: g(z) = z for z ≥ 0, -2z for z < 0."""
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, z, -2.0 * z)


def scalar_objectives(theta: np.ndarray, epsilon: float, x: float = 1.0, points: int = 2001) -> dict[str, np.ndarray]:
    """ℓ(x; θ) = g(θx) on one example: ERM g(θx); AMP max_{|δ|≤ε} g((θ+δ)x) (the weight perturbed); adversarial
    training max_{|δ|≤ε} g(θ(x+δ)) (the input perturbed); the maxima are dense over δ, ends included."""
    theta = np.asarray(theta, dtype=np.float64)
    deltas = np.linspace(-epsilon, epsilon, points)  # (P,)
    return {
        "erm": g(theta * x),
        "amp": g((theta[..., None] + deltas) * x).max(axis=-1),
        "adv": g(theta[..., None] * (x + deltas)).max(axis=-1),
    }


def golden_minimum(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-10) -> float:
    """Minimizer of a unimodal ``f`` on [lo, hi] by golden-section search (all three objectives are convex)."""
    a, b = lo, hi
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(d)
    return (a + b) / 2


@dataclass(frozen=True)
class ScalarExampleResult:
    """Fig. 9 for one ε: the three objectives on a θ grid and their minimizers (the paper: 0, 0 and ε/3)."""

    epsilon: float
    theta: np.ndarray
    objectives: dict[str, np.ndarray]
    minimizers: dict[str, float]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"theta": self.theta, **self.objectives}


def scalar_example(epsilon: float = 0.3, theta: np.ndarray | None = None) -> ScalarExampleResult:
    """θ*_ERM, θ*_ADV and θ*_AMP of Appendix C's example (x = 1), each found by golden-section search."""
    if not (isinstance(epsilon, (int, float)) and epsilon > 0):
        raise ValueError(f"epsilon must be a number > 0 (the perturbation radius), got {epsilon!r}")
    span = 2.0 * epsilon + 1.0
    minimizers = {
        name: golden_minimum(lambda t, n=name: float(scalar_objectives(np.array(t), epsilon)[n]), -span, span)
        for name in ("erm", "adv", "amp")
    }
    theta = np.linspace(-span, span, 801) if theta is None else np.asarray(theta, dtype=np.float64)
    return ScalarExampleResult(float(epsilon), theta, scalar_objectives(theta, epsilon), minimizers)


def plot_scalar_example(result: ScalarExampleResult):
    """Fig. 9: the ERM, adversarial-training and AMP losses against θ, with their minimizers."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5), layout="constrained")
    ax = figure.add_subplot()
    styles = {
        "erm": ("ERM", "tab:red", "-"),
        "adv": ("adversarial training", "tab:green", "--"),
        "amp": ("AMP", "tab:blue", "-"),
    }
    for name, (label, color, line) in styles.items():
        theta_star = result.minimizers[name]
        ax.plot(
            result.theta,
            result.objectives[name],
            color=color,
            linestyle=line,
            label=f"{label}: θ* = {round(theta_star, 3) + 0.0:.3f}",
        )  # no "-0.000"
        ax.axvline(theta_star, color=color, linestyle=":", linewidth=0.8)
    ax.set(xlabel="θ", ylabel="loss", title=f"g(θx), x = 1, ε = {result.epsilon:g}  (θ*_AMP = ε/3)")
    ax.legend(fontsize=8)
    return figure
