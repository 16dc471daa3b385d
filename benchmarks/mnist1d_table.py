"""Train several methods over several seeds on MNIST-1D and print a mean ± std table (the README's results).

Each run is an ordinary run folder under --out (``<method>_s<seed>``), so an interrupted table resumes.
Usage: python benchmarks/mnist1d_table.py --methods erm,amp,sam --seeds 3 --epochs 100 --out runs/table
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from advreg.config import TrainConfig
from advreg.io import read_json
from advreg.train import train

COLUMNS = (("test_error", "test error %"), ("test_nll", "test NLL"), ("test_ece", "test ECE %"),
           ("train_error", "train error %"), ("train_seconds", "seconds"))


def run_all(methods: list[str], seeds: int, epochs: int, out: Path) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    for method in methods:
        for seed in range(seeds):
            folder = out / f"{method}_s{seed}"
            done = folder / "metrics.json"
            config = TrainConfig(method=method, seed=seed, epochs=epochs)
            metrics = read_json(done) if done.exists() else train(config, folder, resume=True, progress=False)
            results.setdefault(method, []).append(metrics)
    return results


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| method | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for method, runs in results.items():
        cells = []
        for key, _ in COLUMNS:
            values = [r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}" if key != "test_nll"
                         else f"{statistics.mean(values):.3f} ± {spread:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="erm,amp,sam")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--out", type=Path, default=Path("runs/mnist1d_table"))
    args = parser.parse_args()
    results = run_all(args.methods.split(","), args.seeds, args.epochs, args.out)
    print(f"MNIST-1D, MLP 100-100, {args.epochs} epochs, mean ± std over {args.seeds} seeds (std: sample)")
    print(table(results))


if __name__ == "__main__":
    main()
