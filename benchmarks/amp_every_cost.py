"""What does AMP's efficient mode (``amp.every=k``) cost per epoch, relative to ERM?  Measured in this run.

Usage::

    python benchmarks/amp_every_cost.py [--rounds 40] [--ks 2,4,8] [--reuse delta,gradient] [--alpha 0.4]
                                        [--threads 1]

Rows ERM, AMP and AMP every k (for each ``amp.reuse`` asked: the kept Δ, or LookSAM's reused gradient), each built
by advreg's trainer (``build_run``) on MNIST-1D with the MLP and the
README's Table 1 settings (AMP ε 0.5, ζ 1, N 1), train one epoch at a time (``train_epoch``: the training seconds
that ``advreg bench`` reports), interleaved epoch by epoch in a rotating order in one process, so that machine load
hits every row alike. The table gives the median milliseconds per epoch and the ratio to ERM's.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from advreg.config import TrainConfig
from advreg.methods import resolve
from advreg.train import build_run, train_epoch


def rows(ks: list[int], reuses: list[str], alpha: float) -> dict[str, tuple[str, list[str]]]:
    efficient = {
        f"every {k} {reuse}": ("amp", [f"amp.every={k}", f"amp.reuse={reuse}", f"amp.alpha={alpha}"])
        for reuse in reuses
        for k in ks
    }
    return {"erm": ("erm", []), "amp": ("amp", []), **efficient}


def measure(rounds: int, ks: list[int], reuses: list[str], alpha: float) -> dict[str, list[float]]:
    runs = {
        name: build_run(resolve(TrainConfig(method=method, epochs=rounds + 2), settings))
        for name, (method, settings) in rows(ks, reuses, alpha).items()
    }
    names = list(runs)
    for name in names:
        train_epoch(runs[name], 0)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            train_epoch(runs[name], r + 1)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument(
        "--ks",
        default="2,4,8",
        help="comma-separated k of the efficient rows (a huge k times the steps between refreshes alone)",
    )
    p.add_argument("--reuse", default="delta,gradient", help="comma-separated amp.reuse of the efficient rows")
    p.add_argument(
        "--alpha",
        type=float,
        default=0.4,
        help="amp.alpha of reuse=gradient (the time does not depend on it; a large one with a huge k diverges)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier times on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"advreg AMP every-k cost -- measured in this run\ncommand : {shlex.join([sys.executable] + sys.argv)}\n"
        f"date    : {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\nmachine : {_cpu()}, "
        f"torch {torch.__version__}, {args.threads} thread(s), load {load}\n"
    )
    seconds = measure(
        args.rounds,
        [int(k) for k in args.ks.split(",") if k.strip()],
        [r.strip() for r in args.reuse.split(",") if r.strip()],
        args.alpha,
    )
    erm = statistics.median(seconds["erm"])
    print(f"{'row':<24} {'ms/epoch':>9} {'x ERM':>7}   (median of {args.rounds} interleaved epochs)")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<24} {median * 1e3:>9.1f} {median / erm:>7.2f}")


if __name__ == "__main__":
    main()
