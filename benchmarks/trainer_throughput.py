"""Is the trainer as fast as a bare hand-written PyTorch loop?  Both measured in this run.

Usage::

    python benchmarks/trainer_throughput.py [--model mlp|preact_resnet18] [--device cpu|cuda] [--rounds 9]
                                            [--precision fp32|bf16|fp16] [--channels-last] [--train-size N]

For ERM and for AMP (N = 1, ε 0.5, ζ 1), it times one training epoch of ``advreg.train`` (``build_run`` and
``train_epoch``, the loop of ``run_epoch``: the loader, the three stages, the optimizer, the running loss and error)
against a loop written
here with plain PyTorch on the same model, data, batch size and optimizer settings: shuffle, zero_grad,
forward, cross-entropy, backward, SGD step (and for AMP the paper's step written out by hand: clean pass,
Δ = min(ζ, ε/‖g‖)·g, pass at θ+Δ, restore θ, SGD step). Epochs alternate between the two for ``--rounds``
rounds after a warm-up epoch each; the table gives the median seconds per epoch (training only) and the
trainer's throughput relative to the bare loop (target: at least 0.95x).

Data: ``mlp`` trains on MNIST-1D (generated offline by the mnist1d package); ``preact_resnet18`` on synthetic
CIFAR-10 files of the real format and size written to a temporary folder (random pixels: the speed is what counts).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import advreg
from advreg import methods
from advreg.config import TrainConfig
from advreg.train import build_run, train_epoch

EPSILON, ZETA = 0.5, 1.0


def config_for(args, method: str, data_dir: str) -> TrainConfig:
    dataset = "mnist1d" if args.model == "mlp" else "cifar10"
    settings = [
        f"data.name={dataset}",
        f"data.dir={data_dir}",
        f"model.name={args.model}",
        f"device={args.device}",
        f"optim.batch_size={args.batch_size}",
        "robust.margin_samples=0",
        f"speed.precision={args.precision}",
        f"speed.channels_last={args.channels_last}",
        "amp.epsilon=0.5" if method == "amp" else None,
    ]
    return methods.resolve(TrainConfig(method=method, epochs=1000), [s for s in settings if s])


def write_synthetic_cifar(folder: Path, train_size: int) -> None:
    """CIFAR-10 binary batches (label byte + 3072 pixel bytes per image) of random content."""
    out = folder / "cifar-10-batches-bin"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = max(1, train_size // 5)
    for name, n in [(f"data_batch_{i}.bin", per) for i in range(1, 6)] + [("test_batch.bin", 100)]:
        labels = rng.integers(0, 10, size=(n, 1), dtype=np.uint8)
        np.concatenate([labels, rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)], axis=1).tofile(out / name)


# -- the bare loop ------------------------------------------------------------------------------------------
class BareLoop:
    """Plain PyTorch on a copy of the run's model and training tensors: nothing of advreg's runs in the epoch."""

    def __init__(self, run, amp: bool, args):
        torch.manual_seed(0)
        self.model = copy.deepcopy(run.model)
        self.x, self.y = run.data.train
        self.batch, self.amp, self.device = args.batch_size, amp, run.device
        o = run.config.optim
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
        )
        self.params = list(self.model.parameters())
        self.theta = [torch.empty_like(p) for p in self.params]
        self.channels_last, self.precision = args.channels_last, args.precision
        self.scaler = torch.amp.GradScaler(run.device.type) if args.precision == "fp16" else None
        self.generator = torch.Generator().manual_seed(0)

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def pass_(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.model(x), y)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        return loss

    def epoch(self) -> None:
        self.model.train()
        order = torch.randperm(len(self.x), generator=self.generator).to(self.device)
        for start in range(0, len(self.x) - self.batch + 1, self.batch):
            idx = order[start : start + self.batch]
            x, y = self.x[idx], self.y[idx]
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            self.pass_(x, y)
            if self.amp:
                self.amp_ascent(x, y)
            if self.scaler is None:
                self.opt.step()
            else:
                self.scaler.step(self.opt)
                self.scaler.update()

    @torch.no_grad()
    def amp_ascent(self, x, y) -> None:
        """θ+Δ with Δ = min(ζ, ε/‖g‖)·g (AMP, N = 1), the pass there, then θ back: .grad holds ∇J(θ+Δ)."""
        grads = [p.grad for p in self.params]
        if self.scaler is not None:
            torch._foreach_mul_(grads, 1.0 / self.scaler.get_scale())
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_copy_(self.theta, self.params)
        torch._foreach_mul_(grads, (EPSILON / norm).clamp(max=ZETA))
        torch._foreach_add_(self.params, grads)
        with torch.enable_grad():
            self.pass_(x, y)  # (BatchNorm statistics move here too: the bare loop does not bother)
        torch._foreach_copy_(self.params, self.theta)


# -- timing -------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def compare(method: str, args, data_dir: str) -> tuple[float, float]:
    run = build_run(config_for(args, method, data_dir))
    bare = BareLoop(run, method == "amp", args)
    trainer_epoch = lambda: train_epoch(run, 0)  # noqa: E731  (the loop of run_epoch, without its evaluation)
    trainer_epoch(), bare.epoch()  # warm-up
    trainer, loop = [], []
    for r in range(args.rounds):
        pair = [(trainer, trainer_epoch), (loop, bare.epoch)]
        for times, fn in pair if r % 2 == 0 else pair[::-1]:
            times.append(timed(fn, run.device))
    return statistics.median(trainer), statistics.median(loop)


# -- report -------------------------------------------------------------------------------------------------
def header(args) -> str:
    device = torch.device(args.device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return "\n".join(
        [
            "advreg trainer vs bare PyTorch loop -- every number below was measured in this run",
            f"command : {shlex.join([sys.executable] + sys.argv)}",
            f"date    : {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            f"device  : {device} ({hw}); torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"python {platform.python_version()}; load {load}",
            f"model   : {args.model}, batch {args.batch_size}, precision {args.precision}, "
            f"channels_last {args.channels_last}; {args.rounds} rounds, median seconds per training epoch",
        ]
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["mlp", "preact_resnet18"], default="mlp")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 50 for mlp, 128 for preact_resnet18")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--train-size", type=int, default=5000, help="synthetic CIFAR training images (preact_resnet18)")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (50 if args.model == "mlp" else 128)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    print(header(args), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model != "mlp":
            write_synthetic_cifar(Path(tmp), args.train_size)
        print(f"{'method':<8} {'trainer s/epoch':>16} {'bare loop s/epoch':>18} {'trainer throughput':>19}")
        for method in ("erm", "amp"):
            trainer, bare = compare(method, args, tmp)
            verdict = "PASS" if bare / trainer >= 0.95 else "FAIL"
            print(
                f"{method:<8} {trainer:>16.3f} {bare:>18.3f} {bare / trainer:>18.3f}x  {verdict} (target >= 0.95x)",
                flush=True,
            )
    print(f"advreg {advreg.__version__}")


if __name__ == "__main__":
    main()
