"""AMM's regularizer (advreg.losses.AMMLoss.regularizer) against the AMM paper's algorithm run the authors' way.

The reference below is written from the paper (Sec. 3.1-3.3) in the style of the authors' algorithm: correct and
misclassified samples in two DeepFool calls, the top ``num_label`` classes fixed at x (untargeted) or the current
prediction and the label (toward the label), ∇f taken at a detached x + r, every sample of the call stepped each
iteration (the done ones by 0) with a forward that checks them after each step. Each repeat times one regularizer
and its backward for both codes, in alternating order; the medians and their ratio are measured in this run, with
the largest difference of the two regularizer values. Usage: python benchmarks/amm_speed.py [--repeats 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from torch import Tensor, nn

from advreg.losses import AMMLoss, cross_entropy
from advreg.losses.amm import margin_terms, select_min


def paper_deepfool(
    model: nn.Module, x: Tensor, label: Tensor | None, steps: int, overshoot: float, num_label: int, create_graph: bool
) -> tuple[Tensor, Tensor]:
    """DeepFool of the paper (Sec. 3.1): r (N, ...) and whether each sample reached its goal (N,)."""
    with torch.set_grad_enabled(create_graph):
        logits = model(x)  # (N, K), differentiable through r when create_graph
    orig = pred = logits.argmax(dim=1)
    top = logits.topk(min(num_label, logits.shape[1]), dim=1).indices  # (N, C) at x, the prediction first
    r, not_done = torch.zeros_like(x), torch.ones(len(x), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        classes = top if label is None else torch.stack([pred, label], dim=1)  # column 0: the class left
        n, c = classes.shape
        point = (x + r).detach().requires_grad_(True)  # the authors' ∇f: at a detached x + r
        copies = point.unsqueeze(1).expand(n, c, *x.shape[1:]).reshape(n * c, *x.shape[1:])
        chosen = model(copies).gather(1, classes.reshape(-1, 1)).sum()
        (grads,) = torch.autograd.grad(chosen, copies, create_graph=create_graph)
        grads = grads.view(n, c, -1)
        f = logits.gather(1, classes)
        f_diff, w_diff = f[:, 1:] - f[:, :1], grads[:, 1:] - grads[:, :1]
        dist = f_diff.abs() / w_diff.norm(dim=2).clamp_min(1e-12)  # 0/0 for a done sample
        t = dist.detach().argmin(dim=1)
        w = w_diff[torch.arange(n), t]
        step = (dist[torch.arange(n), t] / w.norm(dim=1).clamp_min(1e-12)).unsqueeze(1) * w  # |f'| / ‖w‖² · w
        r = r + (1 + overshoot) * (step * not_done.unsqueeze(1)).view_as(x)
        with torch.set_grad_enabled(create_graph):
            logits = model(x + r)
        pred = logits.argmax(dim=1)
        not_done = not_done & (pred == orig if label is None else pred != label)
        if not bool(not_done.any()):
            break
    return r, ~not_done


def paper_regularizer(stage: AMMLoss, model: nn.Module, x: Tensor, y: Tensor, num_label: int) -> Tensor:
    """λ·L_DD (Eq. 6) with MIN's graph-free selection pass, correct and misclassified samples apart."""
    with torch.no_grad():
        correct = model(x).argmax(dim=1) == y
    total = x.new_zeros(())
    for group, label in ((correct, None), (~correct, y)):
        index = group.nonzero().squeeze(1)
        if index.numel() == 0:
            continue

        def run(rows: Tensor, graph: bool, label: Tensor | None = label) -> tuple[Tensor, Tensor]:
            target = None if label is None else label[rows]
            return paper_deepfool(model, x[rows], target, stage.steps, stage.overshoot, num_label, graph)

        if stage.aggregation == "min":
            r, ok = run(index, False)
            norms = r.flatten(1).norm(dim=1)
            keep = select_min(norms, y[index], correct[index], ok, len(x), stage.top_fraction)
            index = index[keep]
            if index.numel() == 0:
                continue
        r, ok = run(index, True)
        norms = r.flatten(1).norm(dim=1)
        total = (
            total
            + margin_terms(
                norms[ok], correct[index][ok], stage.lam, stage.c, stage.d, stage.shrinkage, stage.clip_value
            ).sum()
        )
    return total / len(x)


def networks() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 150), nn.ReLU(), nn.Linear(150, 10)
    )
    conv = nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )
    return {"MLP 784-500-150-10": mlp, "conv 8-16-100-10": conv}


def batch(model: nn.Module, size: int, wrong: float, device: str) -> tuple[Tensor, Tensor]:
    """Inputs in [0, 1] (N, 1, 28, 28) and labels: the prediction, but another class for a ``wrong`` share."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(size, 1, 28, 28, generator=gen).to(device)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    flip = torch.rand(size, generator=gen).to(device) < wrong
    return x, torch.where(flip, (y + 1 + torch.randint(0, 9, (size,), generator=gen).to(device)) % 10, y)


def timed(fn, model: nn.Module, device: str) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    value = fn()
    value.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, value.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--wrong", type=float, default=0.2, help="share of misclassified samples in the batch")
    parser.add_argument("--candidates", type=int, default=10, help="df_num_label of the authors, amm.candidates")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} "
        f"({args.wrong:.0%} misclassified), K = 10, {args.candidates} candidates, u = 6, λ = 1, "
        f"median of {args.repeats} interleaved repeats, measured in this run"
    )
    print(f"{'network':20s} {'agg':4s} {'advreg s':>9s} {'paper s':>9s} {'ratio':>6s} {'|Δ value|':>10s}")
    for name, model in networks().items():
        model = model.to(args.device).eval()
        x, y = batch(model, args.batch, args.wrong, args.device)
        for aggregation in ("min", "avg"):
            stage = AMMLoss(cross_entropy, lam=1.0, aggregation=aggregation, candidates=args.candidates)
            codes = {
                "advreg": functools.partial(stage.regularizer, model, x, y),
                "paper": functools.partial(paper_regularizer, stage, model, x, y, args.candidates),
            }
            times: dict[str, list[float]] = {"advreg": [], "paper": []}
            values: dict[str, float] = {}
            for repeat in range(args.repeats + 1):  # the first repeat warms up and is not counted
                for code in ("advreg", "paper") if repeat % 2 else ("paper", "advreg"):
                    seconds, values[code] = timed(codes[code], model, args.device)
                    if repeat:
                        times[code].append(seconds)
            ours, theirs = statistics.median(times["advreg"]), statistics.median(times["paper"])
            print(
                f"{name:20s} {aggregation:4s} {ours:9.4f} {theirs:9.4f} {ours / theirs:6.2f} "
                f"{abs(values['advreg'] - values['paper']):10.2e}"
            )


if __name__ == "__main__":
    main()
