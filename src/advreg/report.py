"""``advreg report``: the AMP reproduction report's table and figure from run folders.

The table has one row per run (dataset, model, method, seed, epochs, test and train accuracy of the final weights, in
percent, from ``metrics.json``); the figure draws the test accuracy per epoch of every run (``history.csv``).
Written as ``report.md`` and ``report.png`` (atomically), beside ``report.json`` with the same numbers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from advreg.io import atomic_write_bytes, write_json
from advreg.runs import CONFIG, HISTORY, METRICS, RunFolderError, output_folder, read_config, read_history, read_metrics


@dataclass(frozen=True)
class RunSummary:
    folder: str
    dataset: str
    model: str
    method: str
    seed: int
    epochs: int
    test_accuracy: float  # %
    train_accuracy: float  # %
    curve: tuple[float, ...]  # test accuracy (%) after each epoch


def summarize_run(folder: str | Path) -> RunSummary:
    """The report's numbers of one finished run folder."""
    folder = Path(folder)
    missing = [name for name in (CONFIG, METRICS, HISTORY) if not (folder / name).exists()]
    if missing:
        raise ValueError(
            f"{folder} lacks {', '.join(missing)}: pass folders of finished runs "
            "(advreg train or advreg bench writes them)"
        )
    config, metrics = _described(folder), read_metrics(folder, ("test_error", "train_error"))
    curve = tuple(100.0 - e for e in read_history(folder, "test_error"))
    return RunSummary(
        str(folder),
        config["data"]["name"],
        config["model"]["name"],
        config["method"],
        config["seed"],
        config["epochs"],
        100.0 - metrics["test_error"],
        100.0 - metrics["train_error"],
        curve,
    )


def _described(folder: Path) -> dict[str, Any]:
    """config.json, with the fields the report's row names."""
    config = read_config(folder)
    data, model = config.get("data"), config.get("model")
    if not (
        isinstance(data, dict)
        and isinstance(model, dict)
        and isinstance(data.get("name"), str)
        and isinstance(model.get("name"), str)
        and isinstance(config.get("method"), str)
        and all(isinstance(config.get(k), int) for k in ("seed", "epochs"))
    ):
        raise RunFolderError(
            f"{folder / CONFIG} lacks data.name, model.name, method, seed or epochs; pass folders "
            "that advreg train wrote"
        )
    return config


def markdown(runs: Sequence[RunSummary]) -> str:
    """The reproduction report's table, with the method and seed beside dataset and model."""
    lines = ["| Dataset | Model | Method | Seed | Epochs | Test Accuracy | Train Accuracy |", "|---" * 7 + "|"]
    lines += [
        f"| {r.dataset} | {r.model} | {r.method} | {r.seed} | {r.epochs} | {r.test_accuracy:.2f} | "
        f"{r.train_accuracy:.2f} |"
        for r in runs
    ]
    return "\n".join(lines) + "\n"


def figure(runs: Sequence[RunSummary]):
    """Test accuracy per epoch, one curve per run (the report's Fig. a/b)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for r in runs:
        ax.plot(range(1, len(r.curve) + 1), r.curve, label=f"{r.dataset} {r.model} {r.method} s{r.seed}")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy per epoch")
    ax.legend(fontsize=7)
    return fig


def report(folders: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Write report.md, report.png and report.json for ``folders`` into ``out``; return the paths."""
    if not folders:
        raise ValueError("give at least one run folder to report on")
    runs = [summarize_run(f) for f in folders]
    out = output_folder(out)
    paths = [out / "report.md", out / "report.png", out / "report.json"]
    atomic_write_bytes(paths[0], markdown(runs).encode())
    png = io.BytesIO()
    figure(runs).savefig(png, format="png", dpi=150)
    atomic_write_bytes(paths[1], png.getvalue())
    write_json(paths[2], [r.__dict__ for r in runs])
    return paths
