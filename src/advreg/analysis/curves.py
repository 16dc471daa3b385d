"""Training curves of run folders (the AMP paper's Fig. 11): training and test loss and error per epoch, read
from each run's history.csv, and the robust errors where the run tracked them (adversarial training)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from advreg.runs import HISTORY, read_history_table

# (column, panel title); a panel is drawn when at least one run has its column
PANELS = (
    ("train_loss", "Training loss"),
    ("test_loss", "Test loss"),
    ("train_error", "Training error (%)"),
    ("test_error", "Test error (%)"),
    ("val_robust_error", "Validation robust error (%)"),
    ("test_robust_error", "Test robust error (%)"),
)
REQUIRED = ("epoch", *(column for column, _ in PANELS[:4]))  # every history's; the robust errors are optional


@dataclass(frozen=True)
class CurvesResult:
    """One history per run: column name -> (epochs,) float array, every column of its history.csv."""

    folders: tuple[str, ...]
    histories: tuple[dict[str, np.ndarray], ...]

    def panels(self) -> list[tuple[str, str]]:
        return [(c, title) for c, title in PANELS if any(c in h for h in self.histories)]

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"run{i}_{column}": values for i, h in enumerate(self.histories) for column, values in h.items()}


def read_history(folder: str | Path) -> dict[str, np.ndarray]:
    """history.csv of a run folder as column -> float array (an empty cell is NaN), with epoch and the training and
    test loss and error: a RunFolderError (a ValueError) names a file that lacks them or holds no number."""
    if not (Path(folder) / HISTORY).exists():
        raise ValueError(f"{folder} has no history.csv; pass run folders written by advreg train or advreg bench")
    table = read_history_table(folder, REQUIRED)
    return {column: np.array(values) for column, values in table.items()}


def load_curves(run_folders: Sequence[str | Path]) -> CurvesResult:
    """The histories of ``run_folders``, in that order."""
    if not run_folders:
        raise ValueError("give at least one run folder")
    return CurvesResult(tuple(str(f) for f in run_folders), tuple(read_history(f) for f in run_folders))


def plot_curves(result: CurvesResult, labels: Sequence[str] | None = None):
    """One panel per quantity (loss and error, training and test; robust errors when tracked), one line per run."""
    from matplotlib.figure import Figure

    labels = ["/".join(Path(f).parts[-2:]) for f in result.folders] if labels is None else list(labels)
    if len(labels) != len(result.histories):
        raise ValueError(f"give one label per run, got {len(labels)} labels for {len(result.histories)} runs")
    panels = result.panels()
    columns = 2 if len(panels) <= 4 else 3
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4 * columns, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, (column, title) in zip(axes, panels):
        for history, label in zip(result.histories, labels):
            if column in history:
                ax.plot(history["epoch"], history[column], marker=".", label=label)
        ax.set(title=title, xlabel="epoch")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    return figure
