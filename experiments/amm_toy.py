"""Fig. 1 of the AMM paper: decision boundaries of linear classifiers trained on the margin term alone.

Writes OUT/amm_toy.png (four panels: AVG+LIN, AVG+EXP, AVG+INV, MIN+LIN, with the test points) and
OUT/margins.json (each boundary, its train/test accuracy and signed margin, and the widest possible margin).
Usage: python experiments/amm_toy.py [--out runs/amm_toy] [--epochs 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from advreg.toy import SETTINGS, evaluate_linear, optimal_margin, rectangles, train_linear  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/amm_toy")
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(args.seed)
    train, test = rectangles(200, generator), rectangles(200, generator)
    results = []
    for aggregation, shrinkage in SETTINGS:
        model = train_linear(aggregation, shrinkage, *train, epochs=args.epochs, seed=args.seed)
        results.append(evaluate_linear(model, aggregation, shrinkage, train, test))
        r = results[-1]
        print(
            f"{aggregation.upper()}+{shrinkage.upper()}: test accuracy {r.test_accuracy:.2f}%, "
            f"train margin {r.train_margin:.4f}, test margin {r.test_margin:.4f}"
        )
    best = optimal_margin(train[0].numpy(), train[1].numpy())
    print(f"widest margin on the training points: {best:.4f}")
    (out / "margins.json").write_text(
        json.dumps(
            {
                "epochs": args.epochs,
                "seed": args.seed,
                "optimal_train_margin": best,
                "settings": [dataclasses.asdict(r) for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    plot(results, test, out / "amm_toy.png")


def plot(results: list, test: tuple[torch.Tensor, torch.Tensor], path: Path) -> None:
    x, y = test[0].numpy(), test[1].numpy()
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4), sharey=True)
    xs = np.linspace(-2.5, 2.5, 2)
    for ax, r in zip(axes, results):
        ax.scatter(x[y == 0, 0], x[y == 0, 1], s=6, c="tab:blue", label="class 0")
        ax.scatter(x[y == 1, 0], x[y == 1, 1], s=6, c="tab:green", label="class 1")
        (w1, w2), b = r.w, r.b
        if abs(w2) > 1e-12 * abs(w1):
            ax.plot(xs, -(w1 * xs + b) / w2, c="red")
        else:
            ax.axvline(-b / w1, c="red")
        ax.set(
            xlim=(-2.5, 2.5),
            ylim=(-5, 5),
            aspect="equal",
            title=f"{r.aggregation.upper()}+{r.shrinkage.upper()}: test acc {r.test_accuracy:.1f}%\n"
            f"margin {r.train_margin:.3f} (train), {r.test_margin:.3f} (test)",
        )
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
