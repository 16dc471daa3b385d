"""Reliability diagrams and expected calibration errors of a bench's selected runs (the AMP paper's Fig. 7).

The bins are those of :mod:`advreg.metrics` (Appendix D): I_m = ((m-1)/M, m/M], M = 15, a confidence of 1.0 in the
last bin. The diagram pools the test predictions of a method's seeds; the ECE is per run (as in metrics.json,
in percent) and then mean ± std over the seeds (std over seeds with n-1, as the bench's summary).
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from advreg.evaluate import predict_logits
from advreg.metrics import expected_calibration_error


def bin_index(confidence: Tensor, n_bins: int = 15) -> Tensor:
    """The bin m-1 of each confidence, I_m = ((m-1)/M, m/M]: the same bucketing as ``metrics.calibration_error``."""
    upper = torch.arange(1, n_bins + 1, dtype=torch.float64, device=confidence.device) / n_bins  # m/M
    return torch.bucketize(confidence.double(), upper, right=False).clamp(max=n_bins - 1)


def bin_statistics(confidence: Tensor, correct: Tensor, n_bins: int = 15) -> tuple[np.ndarray, ...]:
    """``(counts, accuracy, mean confidence)`` per bin, each (M,); accuracy and confidence NaN in empty bins."""
    bins = bin_index(confidence, n_bins)
    counts = torch.bincount(bins, minlength=n_bins).double()
    hits = torch.bincount(bins, weights=correct.double(), minlength=n_bins)
    mass = torch.bincount(bins, weights=confidence.double(), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts.cpu().numpy().astype(np.int64), (hits / counts).cpu().numpy(), (mass / counts).cpu().numpy()


@dataclass(frozen=True)
class CalibrationResult:
    """Per method (row order of ``methods``): the pooled reliability diagram and the ECE (%) of each run."""

    methods: tuple[str, ...]
    n_bins: int
    counts: np.ndarray  # (methods, M) int
    accuracy: np.ndarray  # (methods, M), NaN in an empty bin
    confidence: np.ndarray  # (methods, M)
    ece: dict[str, tuple[float, ...]]  # method -> ECE (%) per selected run, in results.csv order
    folders: dict[str, tuple[str, ...]]

    def ece_mean_std(self, method: str) -> tuple[float, float]:
        values = self.ece[method]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "counts": self.counts,
            "accuracy": self.accuracy,
            "confidence": self.confidence,
            "ece_mean": np.array([self.ece_mean_std(m)[0] for m in self.methods]),
            "ece_std": np.array([self.ece_mean_std(m)[1] for m in self.methods]),
        }

    def info(self) -> dict:
        return {"n_bins": self.n_bins, "methods": list(self.methods), "ece_percent": self.ece, "folders": self.folders}


def selected_runs(bench: str | Path) -> dict[str, list[str]]:
    """Method -> the run folders of its selected grid point (results.csv ``selected`` True), failed runs left out."""
    path = Path(bench) / "results.csv"
    if not path.exists():
        raise ValueError(f"{bench} holds no results.csv; pass the --out folder of a finished advreg bench")
    runs: dict[str, list[str]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["selected"] == "True" and not row.get("error"):
                runs.setdefault(row["method"], []).append(row["folder"])
    if not runs:
        raise ValueError(f"{path} has no selected, finished run; rerun the bench so that its runs finish")
    return runs


def run_test_logits(folder: str | Path) -> tuple[Tensor, Tensor]:
    """The test logits (N, K) of a run's final model, as metrics.json's test numbers were computed, and labels."""
    from advreg.robustness import load_run  # late: it pulls in training and the attacks

    _, data, model = load_run(folder)
    x, y = data.test
    return predict_logits(model, x), y


def reliability(bench: str | Path, n_bins: int = 15) -> CalibrationResult:
    """The reliability diagram (pooled over seeds) and per-run ECE of each method's selected runs in ``bench``."""
    runs = selected_runs(bench)
    rows, ece = [], {}
    for method, folders in runs.items():
        predictions = [run_test_logits(f) for f in folders]
        ece[method] = tuple(100.0 * expected_calibration_error(logits, y, n_bins) for logits, y in predictions)
        probs = torch.cat([torch.softmax(logits.double(), dim=1) for logits, _ in predictions])  # (seeds·N, K)
        confidence, predicted = probs.max(dim=1)
        correct = predicted == torch.cat([y for _, y in predictions])
        rows.append(bin_statistics(confidence, correct, n_bins))
    counts, accuracy, mean_confidence = (np.stack(column) for column in zip(*rows))
    return CalibrationResult(
        tuple(runs), n_bins, counts, accuracy, mean_confidence, ece, {m: tuple(f) for m, f in runs.items()}
    )


def plot_reliability(result: CalibrationResult):
    """Fig. 7 and its diagrams: one reliability diagram per method (accuracy per confidence bin against the
    diagonal, the mean confidence marked), then the ECE per method, mean ± std over seeds."""
    from matplotlib.figure import Figure

    n = len(result.methods)
    cols = min(n + 1, 5)  # panels wrap after 5, the ECE chart last
    rows = -(-(n + 1) // cols)
    figure = Figure(figsize=(3.2 * cols, 3.4 * rows), layout="constrained")
    grid = figure.subplots(rows, cols, squeeze=False).ravel()
    for spare in grid[n + 1 :]:
        spare.set_visible(False)
    axes = grid[: n + 1]
    edges = np.linspace(0.0, 1.0, result.n_bins + 1)
    for i, (ax, method) in enumerate(zip(axes, result.methods)):
        accuracy = np.nan_to_num(result.accuracy[i])  # an empty bin: no bar
        ax.bar(
            edges[:-1],
            accuracy,
            width=1 / result.n_bins,
            align="edge",
            color="tab:blue",
            edgecolor="k",
            linewidth=0.5,
            label="accuracy",
        )
        ax.plot(result.confidence[i], result.accuracy[i], "o", color="tab:red", markersize=3, label="mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="0.4", linewidth=0.8)
        ax.set(
            xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{method}: ECE {result.ece_mean_std(method)[0]:.2f}%"
        )
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    stats = [result.ece_mean_std(m) for m in result.methods]
    axes[-1].bar(range(n), [s[0] for s in stats], yerr=[s[1] for s in stats], color="tab:gray", capsize=3)
    axes[-1].set_xticks(range(n), result.methods, rotation=45, ha="right")
    axes[-1].set(ylabel="ECE (%)", title="Expected calibration error")
    return figure
