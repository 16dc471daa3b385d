"""Curvature at θ*: the top Hessian eigenvalue by power iteration and the trace by Hutchinson's estimator.

Power iteration stops on the residual r = ‖Hv − λv‖ of the unit iterate v and λ = vᵀHv: H is symmetric, so some
eigenvalue lies within r of λ, and r ≤ tol·|λ| bounds the error by tol·|λ| even when the top two eigenvalues are
close (where λ's change between iterations is far smaller than its error).

Both use only Hessian-vector products Hv = ∇(∇L·v) (Pearlmutter 1994) of the mean cross-entropy on a seeded
evaluation subset, the model in eval mode (no dropout, BatchNorm on running statistics), as PyHessian does
(Yao et al. 2020); Hutchinson: tr H = E[zᵀHz] for Rademacher z (Hutchinson 1989).
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
from advreg.analysis.landscape import as_list, check_positive_int, check_split, eval_subset, labels_for, trainable
from advreg.data.splits import DataSplits


@dataclass(frozen=True)
class HessianConfig:
    """Power iteration for the Hessian's top eigenvalue: its cap on iterations and its tolerance."""

    iterations: int = 100  # power iteration's cap
    tol: float = 1e-4  # stop when the residual ‖Hv − λv‖ is at most tol·|λ|
    probes: int = 100  # Hutchinson's Rademacher vectors
    samples: int = 1000  # evaluation subset of the split
    split: str = "train"
    seed: int = 0  # the subset's, the start vector's and the probes' generators
    batch_size: int = 1000

    def __post_init__(self) -> None:
        check_positive_int("iterations", self.iterations, "it caps the power iteration")
        if not (isinstance(self.tol, (int, float)) and self.tol > 0):
            raise ValueError(f"tol must be a number > 0 (the residual relative to |λ|, e.g. 1e-4), got {self.tol!r}")
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 2:
            raise ValueError(f"probes must be an integer >= 2 so that a standard error exists, got {self.probes!r}")
        check_positive_int("samples", self.samples, "it is the size of the evaluation subset")
        check_positive_int("batch_size", self.batch_size, "lower it if the double backward runs out of memory")
        check_split(self.split)


@dataclass(frozen=True, eq=False)
class EigenResult:
    eigenvalue: float  # the Rayleigh quotient vᵀHv at the last iterate: the largest-magnitude eigenvalue, signed
    iterations: int
    converged: bool  # residual <= tol·|λ| before the cap
    residual: float  # ‖Hv − λv‖ at the last iterate: an eigenvalue of H lies within it of λ
    history: np.ndarray  # (iterations,) λ per iteration
    eigenvector: list[Tensor]  # the last iterate v (unit norm), shaped like the trainable parameters


@dataclass(frozen=True, eq=False)
class TraceResult:
    mean: float
    stderr: float  # std of the probes' zᵀHz (ddof 1) / √probes
    history: np.ndarray  # (probes,) the running mean
    samples: np.ndarray  # (probes,) each probe's zᵀHz


@dataclass(frozen=True, eq=False)
class HessianResult:
    eigenvalue: float
    eigen_iterations: int
    converged: bool
    eigen_residual: float  # ‖Hv − λv‖ of the last iterate
    eigen_history: np.ndarray  # (iterations,)
    trace_mean: float
    trace_stderr: float
    trace_history: np.ndarray  # (probes,)
    trace_samples: np.ndarray  # (probes,)
    config: HessianConfig


def hvp(model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor, v: list[Tensor], batch_size: int) -> list[Tensor]:
    """Hv for the mean cross-entropy on (x, y) as the model is now (the caller sets eval mode), batch by batch:
    H = Σ_b (n_b/n)·H_b, so the result does not depend on the batch size."""
    device = next(model.parameters()).device
    out = [torch.zeros_like(p) for p in params]
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        loss = F.cross_entropy(model(xb), yb, reduction="sum") / len(y)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        dot = sum((g * u).sum() for g, u in zip(grads, v) if g is not None)  # ∇L·v, still differentiable
        out = [o if part is None else o + part for o, part in zip(out, _grad_of(dot, params))]
    return out


def _grad_of(dot: Tensor | int, params: list[Tensor]) -> list[Tensor | None]:
    if not (torch.is_tensor(dot) and dot.requires_grad):  # ∇L does not depend on θ (or no parameter is used): H = 0
        return [None] * len(params)
    return list(torch.autograd.grad(dot, params, allow_unused=True))


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return sum((u.double() * w.double()).sum() for u, w in zip(a, b)).item()


def top_eigenvalue(
    model: nn.Module, data: DataSplits, config: HessianConfig = HessianConfig(), *, progress: bool = False
) -> EigenResult:
    """Power iteration v ← Hv/‖Hv‖ from a seeded Gaussian v; λ = vᵀHv, stopped when ‖Hv − λv‖ ≤ tol·|λ|. It finds
    the largest-magnitude eigenvalue (with its sign); the model is left unchanged."""
    x, y = eval_subset(data, config.split, config.samples, config.seed)
    with unchanged(model):
        model.eval()
        params = trainable(model)
        generator = torch.Generator().manual_seed(config.seed)
        v = _normalised([torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params])
        history: list[float] = []
        for step in _steps(config.iterations, "power iteration", progress):
            hv = hvp(model, params, x, y, v, config.batch_size)
            history.append(_dot(v, hv))
            residual = _residual(hv, v, history[-1])
            converged = residual <= config.tol * abs(history[-1])  # also Hv = 0: v is an eigenvector of 0
            if converged or step == config.iterations - 1:
                break  # v, λ and the residual belong together
            v = _normalised(hv)
    return EigenResult(history[-1], len(history), converged, residual, np.asarray(history), v)


def _residual(hv: list[Tensor], v: list[Tensor], eigenvalue: float) -> float:
    """‖Hv − λv‖, summed in float64 tensor by tensor (not √(‖Hv‖² − λ²), which cancels to noise near convergence)."""
    return math.sqrt(sum(((h.double() - eigenvalue * u.double()) ** 2).sum() for h, u in zip(hv, v)).item())


def _steps(n: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, disable=not progress, leave=False)


def _normalised(v: list[Tensor]) -> list[Tensor]:
    norm = math.sqrt(_dot(v, v))
    return [t / norm for t in v]


def trace(
    model: nn.Module, data: DataSplits, config: HessianConfig = HessianConfig(), *, progress: bool = False
) -> TraceResult:
    """Hutchinson's tr H ≈ mean of zᵀHz over seeded Rademacher z, ± its standard error; the model is left unchanged."""
    x, y = eval_subset(data, config.split, config.samples, config.seed)
    samples = np.empty(config.probes)
    with unchanged(model):
        model.eval()
        params = trainable(model)
        generator = torch.Generator().manual_seed(config.seed)
        for i in _steps(config.probes, "Hutchinson", progress):
            z = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype) for p in params]
            samples[i] = _dot(z, hvp(model, params, x, y, z, config.batch_size))
    running = np.cumsum(samples) / np.arange(1, config.probes + 1)
    return TraceResult(float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(config.probes)), running, samples)


def hessian(
    model: nn.Module, data: DataSplits, config: HessianConfig = HessianConfig(), *, progress: bool = False
) -> HessianResult:
    """:func:`top_eigenvalue` and :func:`trace` with one config; the model is left unchanged."""
    eigen = top_eigenvalue(model, data, config, progress=progress)
    tr = trace(model, data, config, progress=progress)
    return HessianResult(
        eigen.eigenvalue,
        eigen.iterations,
        eigen.converged,
        eigen.residual,
        eigen.history,
        tr.mean,
        tr.stderr,
        tr.history,
        tr.samples,
        config,
    )


def cost(model: nn.Module, data: DataSplits, config: HessianConfig = HessianConfig()) -> str:
    """A one-line estimate of the work, for the CLI to print before it starts."""
    n = min(config.samples, len(getattr(data, config.split)[1]))
    weights = sum(p.numel() for p in trainable(model))
    return (
        f"at most {config.iterations} + {config.probes} = {config.iterations + config.probes} Hessian-vector "
        f"products on {n} {config.split} samples ({weights:,} parameters)"
    )


def plot(results: HessianResult | list[HessianResult], labels: Sequence[str] | None = None):
    """Two panels: power iteration's eigenvalue per iteration, and Hutchinson's running trace ± standard error."""
    from matplotlib.figure import Figure

    results = as_list(results)
    labels = labels_for(results, labels)
    figure = Figure(figsize=(10, 4), layout="constrained")
    eig, tr = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for i, (result, label) in enumerate(zip(results, labels)):
        eig.plot(
            np.arange(1, len(result.eigen_history) + 1),
            result.eigen_history,
            color=f"C{i}",
            label=f"{label}: λ = {result.eigenvalue:.4g}" + ("" if result.converged else " (not converged)"),
        )
        k = np.arange(1, len(result.trace_history) + 1)
        band = _running_stderr(result.trace_samples)
        tr.plot(
            k,
            result.trace_history,
            color=f"C{i}",
            label=f"{label}: {result.trace_mean:.4g} ± {result.trace_stderr:.2g}",
        )
        tr.fill_between(
            k, result.trace_history - band, result.trace_history + band, color=f"C{i}", alpha=0.2, linewidth=0
        )
    eig.set(xlabel="power iteration", ylabel="top eigenvalue λ", title="top Hessian eigenvalue")
    tr.set(xlabel="probes", ylabel="tr H (running mean ± s.e.)", title="Hessian trace (Hutchinson)")
    eig.legend(fontsize=8)
    tr.legend(fontsize=8)
    return figure


def _running_stderr(samples: np.ndarray) -> np.ndarray:
    """(P,) the standard error after each probe; 0 after the first, where it is undefined."""
    k = np.arange(1, len(samples) + 1)
    mean = np.cumsum(samples) / k
    var = np.maximum(np.cumsum(samples**2) / k - mean**2, 0.0) * k / np.maximum(k - 1, 1)  # ddof 1
    return np.sqrt(var / k)


def to_arrays(result: HessianResult) -> dict[str, np.ndarray]:
    return {
        "eigenvalue": np.asarray(result.eigenvalue),
        "eigen_iterations": np.asarray(result.eigen_iterations),
        "converged": np.asarray(result.converged),
        "eigen_residual": np.asarray(result.eigen_residual),
        "eigen_history": result.eigen_history,
        "trace_mean": np.asarray(result.trace_mean),
        "trace_stderr": np.asarray(result.trace_stderr),
        "trace_history": result.trace_history,
        "trace_samples": result.trace_samples,
    }
