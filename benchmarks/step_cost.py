"""What does one AMP / SAM / AWP / RWP step cost compared with plain SGD?  Measured, in this run.

Usage::

    python benchmarks/step_cost.py [--model mlp|preact_resnet18] [--device cpu|cuda]
                                   [--precision fp32|bf16|fp16] [--channels-last]
                                   [--batch-size B] [--steps S] [--warmup W] [--repeats 5]
                                   [--width 100] [--mem-width 2048] [--no-memory]
                                   [--every 4] [--only "AMP N=1,AMP k=4 delta"]

What is measured
----------------
* **Time** of one optimizer step -- forward, backward and update, the closure included -- for
  plain ``torch.optim.SGD`` (momentum 0.9, weight decay 1e-4), ``advreg.AMP`` with N = 1, 2, 3
  inner steps, ``advreg.SAM``, ``advreg.AWP`` (K2 = 1) and ``advreg.RWP``, all wrapping that
  same SGD (on the clean loss here: the PGD examples of adversarial training are the transform's cost)
  and given ``model=`` (BatchNorm statistics are copied directly, no forward hook).  The model is
  the MNIST-1D MLP (40 -> width -> width -> 10, ReLU) on a fixed synthetic batch of MNIST-1D shape
  (x of shape (B, 40), labels in 0..9, fixed seeds), or with ``--model preact_resnet18``
  PreActResNet18 (BatchNorm, 11M parameters) on a fixed synthetic image batch (B, 3, 32, 32).
  A pseudo-method ``passes`` runs the closure alone (zero_grad, forward, loss, backward; no
  update): it prices one pass, so that what a method costs *outside* its passes can be read off.
  After warm-up steps the methods run in ``--repeats`` round-robin rounds of ``--steps`` steps each
  (the order rotates every round), so that machine noise hits all methods alike; the time per step
  of a method is the median over its rounds.  The clock is ``time.perf_counter``, read after
  ``torch.cuda.synchronize()`` on CUDA (where ``cudnn.benchmark`` is on).
* **AMP every k steps** (``--every K``, default 4; 1 leaves them out): two more timed rows, AMP N = 1 with
  ``every=K`` and ``reuse="delta"`` or ``reuse="gradient"`` (the efficient mode: one refresh of 2 passes and
  K - 1 steps of one pass, so 1 + 1/K passes a step on average). The steps of a round are rounded up to a
  multiple of K, so that every round holds the same number of refreshes. ``--only`` times a subset of the rows
  (SGD and the passes always run), e.g. to keep a CPU ResNet run short.
* **Precision**: ``--precision bf16|fp16`` runs forward and loss under ``torch.autocast``; fp16 adds
  a ``torch.amp.GradScaler`` per method (the closure calls ``scaler.scale(loss).backward()``, the
  perturbed optimizers get ``grad_scaler=``, plain SGD steps through ``scaler.step``, and
  ``scaler.update()`` follows every step).  ``--channels-last`` puts the ResNet and its input in
  ``torch.channels_last``.  These are the GPU fast path.
* **Peak memory** of the steps, relative to SGD.  On CUDA: ``torch.cuda.max_memory_allocated``
  minus the allocation just before the first step (peak stats reset there), in this process,
  after one untimed pass of the same model (kernel selection is not billed to a method).
  On CPU there are no allocator statistics, so every (method, width) runs in a fresh
  subprocess, which reports the rise of its peak resident set size over its RSS just before the
  first step.  The peak is the kernel's high-water mark ``VmHWM`` (reset right before the steps
  via ``/proc/self/clear_refs``); ``getrusage(RUSAGE_SELF).ru_maxrss`` is only a fallback,
  because on Linux a child started by ``subprocess`` inherits the parent's ``ru_maxrss`` across
  exec (it would show this script's own peak, not the child's).  The workers run with glibc's
  mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the RSS at once
  and the number follows live tensors, not heap fragmentation (which otherwise adds a
  parameter-sized block in some runs and not others); up to 4 workers run at a time.
  Both ways, the model's parameters exist before the baseline and are not counted: the rise is
  gradients + optimizer state + the perturbation's buffers + temporaries (activations, foreach
  intermediates).  The first step is included on purpose, since it allocates most of them.
  For the MLP both the timed width and a wide one (``--mem-width``, parameters dominate) are
  measured; for the ResNet, the timed model itself.
* **Optimizer state**: the exact bytes of the tensors in ``optimizer.state`` (public API; for
  AMP/SAM it is the wrapped SGD's state).  Scratch buffers that a perturbation keeps outside its
  state (e.g. the copy of theta) are not in it; they show up in the peak memory only.

How to read the output
----------------------
``ratio`` is a method's median time per step divided by SGD's, from this run.  The expected
value next to it is the number of forward/backward passes per step (AMP: N+1, SAM and AWP: 2, SGD and RWP: 1).
``outside`` is the time a method spends outside its passes, as a percentage of an SGD step::

    outside = (T_method - T_SGD - (passes - 1) * T_passes) / T_SGD

SGD is one pass plus the update, so this is what the method adds beyond its extra passes: Delta,
norms, projection, the copy and restore of theta, BatchNorm bookkeeping, host syncs, Python.  It is
a difference of large numbers, so its spread over the rounds (printed beside it) is the honest
error bar.  The last line checks issue 11's targets for AMP N = 1: ratio <= 2.0 and outside <= 3%.
``extra buffers`` in the memory tables is (peak rise - SGD's peak rise) / parameter bytes: how
many parameter-sized buffers a method needs beyond SGD (target for AMP N = 1: <= 2).  The default
MLP has ~15k parameters, so its memory rise is mostly allocator and RSS noise (MiBs); read the
wide MLP (``--mem-width`` hidden units, parameters dominate) for what the methods cost in memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import advreg
from advreg.losses import OnLogits
from advreg.transforms import identity

NUM_CLASSES = 10
INPUT_DIM = 40  # MNIST-1D: 40 samples per sequence
IMAGE_SHAPE = (3, 32, 32)  # CIFAR-10
SGD_KWARGS = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
AMP_KWARGS = dict(epsilon=0.5, inner_lr=1.0)
SAM_KWARGS = dict(rho=0.05)
SEED = 0
MIB = 2**20
MODELS = ("mlp", "preact_resnet18")
PRECISIONS = ("fp32", "bf16", "fp16")
# per model: defaults of the options left out (on CPU one ResNet step at batch 128 takes seconds)
MODEL_DEFAULTS = {
    "mlp": dict(batch_size=50, steps=200, warmup=20),
    "preact_resnet18": dict(batch_size=128, steps=10, warmup=3),
}
TARGET_RATIO, TARGET_OUTSIDE_PCT, TARGET_EXTRA_BUFFERS = 2.0, 3.0, 2.0  # issue 11, AMP with N = 1
TARGET_EVERY_RATIO = 1.25  # issue 11, the efficient mode: at most 1.25x ERM's time


# -- the methods ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    passes: int  # forward/backward passes per step (closure calls)
    make: Callable[..., torch.optim.Optimizer]  # (params, model, grad scaler or None) -> optimizer
    update: bool = True  # False: the pseudo-method "passes", the closure alone (no step)


def _sgd(params, model, scaler) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, **SGD_KWARGS)


def _perturbed(cls, **kwargs) -> Callable[..., torch.optim.Optimizer]:
    return lambda params, model, scaler: cls(
        params, torch.optim.SGD, model=model, grad_scaler=scaler, **kwargs, **SGD_KWARGS
    )


def _amp(n: int) -> Method:
    return Method(f"AMP N={n}", n + 1, _perturbed(advreg.AMP, inner_steps=n, **AMP_KWARGS))


def _amp_every(k: int, reuse: str) -> Method:
    return Method(
        f"AMP k={k} {reuse}",
        1 + 1 / k,
        _perturbed(advreg.AMP, inner_steps=1, every=k, reuse=reuse, alpha=0.4, **AMP_KWARGS),
    )


def timed_methods(args) -> list[Method]:
    """The rows of the time table: METHODS (those --only names, and always SGD and the passes), then AMP every k."""
    keep = None if args.only is None else {name.strip() for name in args.only.split(",")} | {"SGD", "passes"}
    every = [_amp_every(args.every, reuse) for reuse in ("delta", "gradient")] if args.every > 1 else []
    return [m for m in METHODS + every if keep is None or m.name in keep]


METHODS = [
    Method("SGD", 1, _sgd),
    Method("passes", 1, _sgd, update=False),
    _amp(1),
    _amp(2),
    _amp(3),
    Method("SAM", 2, _perturbed(advreg.SAM, **SAM_KWARGS)),
    Method("AWP K2=1", 2, _perturbed(advreg.AWP, gamma=0.01)),
    Method("RWP", 1, _perturbed(advreg.RWP, gamma=0.01)),
]
BY_NAME = {m.name: m for m in METHODS}
OPTIMIZERS = [m for m in METHODS if m.update]  # what the memory tables list


# -- model, data, one training setup --------------------------------------------------------------
def build_model(name: str, width: int) -> tuple[nn.Module, str]:
    """The network and where it came from: the MNIST-1D MLP 40 -> width -> width -> 10 (the library's
    builder if present) or PreActResNet18 for 32x32 RGB images."""
    if name == "preact_resnet18":
        from advreg.models import build

        return build(
            name, NUM_CLASSES, input_shape=IMAGE_SHAPE
        ), f'advreg.models.build("{name}", {NUM_CLASSES}, input_shape={IMAGE_SHAPE})'
    try:
        from advreg.models import build
    except ImportError:
        return _fallback_mlp(width), "nn.Sequential defined in this script (advreg.models.build not found)"
    model = build("mlp", num_classes=NUM_CLASSES, input_shape=(INPUT_DIM,), hidden=(width, width))
    return (
        model,
        f'advreg.models.build("mlp", num_classes={NUM_CLASSES}, input_shape=({INPUT_DIM},), hidden=({width}, {width}))',
    )


def _fallback_mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(INPUT_DIM, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, NUM_CLASSES)
    )


def make_batch(args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic batch: MNIST-1D shaped (B, 40) for the MLP, CIFAR shaped (B, 3, 32, 32) otherwise."""
    gen = torch.Generator().manual_seed(SEED + 1)
    shape = (INPUT_DIM,) if args.model == "mlp" else IMAGE_SHAPE
    x = torch.randn(args.batch_size, *shape, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=gen).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


@dataclass
class Setup:
    model: nn.Module
    opt: torch.optim.Optimizer
    step: Callable[[], torch.Tensor]  # one step of the method (the closure alone for "passes")


def make_setup(method: Method, args, width: int, device: torch.device) -> Setup:
    """A freshly initialised model (same seed for every method), its optimizer and its step: advreg.Step on the
    batch (cross-entropy, the precision and grad scaler of ``args``), or the closure alone for "passes"."""
    torch.manual_seed(SEED)
    model = build_model(args.model, width)[0].to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = make_batch(args, device)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    opt = method.make(list(model.parameters()), model, scaler)
    step = advreg.Step(model, identity, OnLogits(F.cross_entropy), opt, NUM_CLASSES, args.precision, scaler)
    if method.update:
        return Setup(model, opt, lambda: step(x, y).loss)

    def closure() -> torch.Tensor:  # what each pass of a step costs: zero_grad, forward, loss, backward
        opt.zero_grad()
        with step.autocast(device.type):
            loss = F.cross_entropy(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        return loss

    return Setup(model, opt, closure)


def run_steps(setup: Setup, n: int) -> torch.Tensor:
    loss = None
    for _ in range(n):
        loss = setup.step()
    return loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- time -----------------------------------------------------------------------------------------
def time_methods(args, device: torch.device) -> dict[str, list[float]]:
    """ms per step of every method in every round: warm-up, then rotating round-robin blocks."""
    setups = {m.name: make_setup(m, args, args.width, device) for m in timed_methods(args)}
    for setup in setups.values():
        run_steps(setup, args.warmup)
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in setups}
    names = list(setups)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            run_steps(setups[name], args.steps)
            sync(device)
            samples[name].append((time.perf_counter() - start) / args.steps * 1e3)
    for name, setup in setups.items():
        loss = run_steps(setup, 1)
        if not torch.isfinite(loss):
            print(f"warning: {name} ended with a non-finite loss; its timings may be unrepresentative")
    return samples


# -- memory ---------------------------------------------------------------------------------------
def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensors in ``opt.state`` (momentum buffers and the like)."""
    seen, total = set(), 0
    for per_param in opt.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark VmHWM of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def _ru_maxrss_kib() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    scale = 1 if sys.platform.startswith("linux") else 1 / 1024  # macOS reports bytes
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def _prime(method: Method, args, width: int, device: torch.device) -> None:
    """One-time set-up is not billed to a method: two steps of the method on a tiny MLP (autograd's and the
    method's ops' own set-up, a few MiB of RSS on CPU that do not grow with the model), and on CUDA one pass of
    the measured model (cuBLAS handles, cudnn.benchmark's search and its workspaces)."""
    tiny = _fallback_mlp(8).to(device)
    opt = method.make(list(tiny.parameters()), tiny, None)
    x, y = torch.randn(2, INPUT_DIM, device=device), torch.zeros(2, dtype=torch.long, device=device)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(tiny(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    if device.type == "cuda":
        run_steps(make_setup(BY_NAME["passes"], args, width, device), 1)
        gc.collect()
        torch.cuda.empty_cache()


def _memory_result(peak_rise: int | None, source: str, setup: Setup) -> dict:
    return {
        "peak_rise": peak_rise,
        "source": source,
        "state": state_bytes(setup.opt),
        "params": param_bytes(setup.model),
        "n_params": n_params(setup.model),
    }


def measure_memory_cpu_here(method: Method, width: int, args) -> dict:
    """In this (fresh) process: rise of peak RSS over the RSS just before the first step."""
    device = torch.device("cpu")
    _prime(method, args, width, device)
    setup = make_setup(method, args, width, device)
    gc.collect()
    before = _proc_status_kib("VmRSS")
    maxrss_before = _ru_maxrss_kib()
    hwm_ok = before is not None and _reset_peak_rss()
    run_steps(setup, args.mem_steps)
    if hwm_ok:
        peak, source = _proc_status_kib("VmHWM"), "VmHWM"
    elif before is not None and maxrss_before is not None and maxrss_before <= before:
        peak, source = _ru_maxrss_kib(), "ru_maxrss"
    else:
        peak, source = None, "unavailable"
    return _memory_result(None if peak is None else max(peak - before, 0) * 1024, source, setup)


def measure_memory_cpu(method: Method, width: int, args) -> dict:
    """Runs :func:`measure_memory_cpu_here` in a fresh interpreter (this script, hidden flags)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--device",
        "cpu",
        "--model",
        args.model,
        "--precision",
        args.precision,
        "--batch-size",
        str(args.batch_size),
        "--mem-steps",
        str(args.mem_steps),
        "--threads",
        str(torch.get_num_threads()),
        "--_mem-worker",
        method.name,
        "--_mem-worker-width",
        str(width),
    ]
    cmd += ["--channels-last"] if args.channels_last else []
    # A fixed glibc mmap threshold (no dynamic raise) hands a freed tensor back to the OS at once, so
    # RSS follows the live tensors instead of heap fragmentation, which otherwise varies from run
    # to run by a parameter-sized block.  No effect outside glibc.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {method.name} (width {width}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory_cuda(method: Method, width: int, args, device: torch.device) -> dict:
    """In this process: max_memory_allocated minus memory_allocated just before the first step."""
    _prime(method, args, width, device)
    setup = make_setup(method, args, width, device)
    gc.collect()
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_steps(setup, args.mem_steps)
    sync(device)
    result = _memory_result(torch.cuda.max_memory_allocated(device) - before, "max_memory_allocated", setup)
    del setup
    gc.collect()
    torch.cuda.empty_cache()
    return result


def measure_memory(args, device: torch.device, widths: list[int]) -> dict[int, dict[str, dict]]:
    """{width: {method: result}}.  The CPU workers run a few at a time (RSS is per process, so they
    do not disturb each other's numbers; torch's import dominates their run time)."""
    jobs = [(w, m) for w in widths for m in OPTIMIZERS]
    if device.type == "cuda":
        results = [measure_memory_cuda(m, w, args, device) for w, m in jobs]
    else:
        with ThreadPoolExecutor(max_workers=max(1, min(4, usable_cpus()))) as pool:
            results = list(pool.map(lambda job: measure_memory_cpu(job[1], job[0], args), jobs))
    out: dict[int, dict[str, dict]] = {w: {} for w in widths}
    for (w, m), r in zip(jobs, results):
        out[w][m.name] = r
    return out


# -- report ---------------------------------------------------------------------------------------
def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def header(args, device: torch.device) -> str:
    model, source = build_model(args.model, args.width)
    env = "".join(
        f"{k}={shlex.quote(os.environ[k])} " for k in ("PYTHONPATH", "CUDA_VISIBLE_DEVICES") if os.environ.get(k)
    )
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device) + f", cudnn.benchmark {torch.backends.cudnn.benchmark}"
    else:
        hw = _cpu_model() or platform.processor() or platform.machine()
    data = (
        f"synthetic MNIST-1D batch ({args.batch_size}, {INPUT_DIM})"
        if args.model == "mlp"
        else f"synthetic image batch ({args.batch_size}, {', '.join(map(str, IMAGE_SHAPE))})"
    )
    lines = [
        "advreg step cost -- every number below was measured in this run",
        f"command : {env}{shlex.join([sys.executable] + sys.argv)}",
        f"date    : {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"device  : {device} ({hw})",
        f"torch   : {torch.__version__}, threads {torch.get_num_threads()} (of {usable_cpus()} usable CPUs), "
        f"python {platform.python_version()}",
        f"load    : {_load()} (other processes on this machine inflate and scatter the times)",
        f"advreg  : {getattr(advreg, '__version__', '?')} from {os.path.dirname(advreg.__file__)}",
        f"model   : {source}: {n_params(model):,} parameters",
        f"numerics: {_precision(args)}",
        f"data    : {data}; seeds fixed",
        f"methods : SGD {_kw(SGD_KWARGS)}; AMP {_kw(AMP_KWARGS)} (+SGD); SAM {_kw(SAM_KWARGS)} (+SGD); "
        "AWP and RWP gamma=0.01 (+SGD); all given model= (and grad_scaler= under fp16)",
    ]
    return "\n".join(lines)


def _precision(args) -> str:
    kind = {
        "fp32": "float32, no autocast",
        "bf16": "autocast bfloat16 (forward and loss)",
        "fp16": "autocast float16 (forward and loss) + GradScaler",
    }[args.precision]
    return f"{args.precision} ({kind}); channels_last {args.channels_last}"


def _load() -> str:
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"


def _kw(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def outside_pct(t: float, passes: int, t_sgd: float, t_passes: float) -> float:
    """Time outside the passes, % of an SGD step: what a method adds beyond its passes - 1 extra passes."""
    return 100 * (t - t_sgd - (passes - 1) * t_passes) / t_sgd


def _outside(samples: dict[str, list[float]], m: Method) -> tuple[float, float, float]:
    """Outside % from the medians, and its min and max over the rounds (each round's own times)."""
    med = {name: statistics.median(s) for name, s in samples.items()}
    per_round = [
        outside_pct(t, m.passes, sgd, passes)
        for t, sgd, passes in zip(samples[m.name], samples["SGD"], samples["passes"])
    ]
    return outside_pct(med[m.name], m.passes, med["SGD"], med["passes"]), min(per_round), max(per_round)


def time_table(samples: dict[str, list[float]], args) -> str:
    med = {name: statistics.median(s) for name, s in samples.items()}
    base = med["SGD"]
    width = max(10, *(len(m.name) for m in timed_methods(args)))
    rows = [
        f"Time per step: median of {args.repeats} round-robin rounds x {args.steps} steps "
        f"(after {args.warmup} warm-up steps per method)",
        f"{'method':<{width}} {'ms/step':>9} {'min-max over rounds':>21} {'ratio to SGD':>13} "
        f"{'expected (passes)':>18} {'outside, % of SGD':>18} {'min..max over rounds':>21}",
    ]
    for m in timed_methods(args):
        s = samples[m.name]
        row = (
            f"{m.name:<{width}} {med[m.name]:>9.3f} {f'{min(s):.3f}-{max(s):.3f}':>21} "
            f"{med[m.name] / base:>12.2f}x {f'{m.passes:.3g}x' if m.update else '-':>18}"
        )
        if m.update and m.name != "SGD":
            value, lo, hi = _outside(samples, m)
            row += f" {value:>17.1f}% {f'{lo:.1f}..{hi:.1f}%':>21}"
        rows.append(row)
    update = base - med["passes"]
    rows += [
        "passes = the closure alone (zero_grad, forward, loss, backward), no update; "
        f"SGD's update = SGD - passes = {update:.3f} ms ({100 * update / base:.1f}% of an SGD step)",
        "outside = (T - T_SGD - (passes - 1) * T_passes) / T_SGD: what a method adds beyond its extra "
        "passes (Delta, norms, projection, theta copy/restore, BatchNorm bookkeeping, syncs, Python)",
    ]
    return "\n".join(rows)


def time_verdict(samples: dict[str, list[float]], args, device: torch.device) -> str:
    """Issue 11's time targets for AMP N=1 and for AMP every k, from the medians, with each round's own value as
    the error bar."""
    med = {name: statistics.median(s) for name, s in samples.items()}
    every = [_every_verdict(samples, m.name) for m in timed_methods(args) if m.name.startswith("AMP k=")]
    if "AMP N=1" not in samples:
        return "\n".join(["Issue 11, AMP N=1: not timed (--only)", *every])
    ratios = [amp / sgd for amp, sgd in zip(samples["AMP N=1"], samples["SGD"])]
    ratio = med["AMP N=1"] / med["SGD"]
    outside, lo, hi = _outside(samples, BY_NAME["AMP N=1"])
    return (
        f"Issue 11, AMP N=1 ({args.model}, {device.type}, {args.precision}, batch {args.batch_size}): "
        f"ratio {ratio:.2f}x (rounds {min(ratios):.2f}..{max(ratios):.2f}x) <= {TARGET_RATIO:.1f}x: "
        f"{_verdict(ratio, min(ratios), max(ratios), TARGET_RATIO)}; outside the passes {outside:.1f}% of an "
        f"SGD step (rounds {lo:.1f}..{hi:.1f}%) <= {TARGET_OUTSIDE_PCT:.0f}%: "
        f"{_verdict(outside, lo, hi, TARGET_OUTSIDE_PCT)}" + "".join("\n" + line for line in every)
    )


def _every_verdict(samples: dict[str, list[float]], name: str) -> str:
    ratios = [t / sgd for t, sgd in zip(samples[name], samples["SGD"])]
    ratio = statistics.median(samples[name]) / statistics.median(samples["SGD"])
    return (
        f"Issue 11, {name}: {ratio:.2f}x an SGD step (rounds {min(ratios):.2f}..{max(ratios):.2f}x) <= "
        f"{TARGET_EVERY_RATIO:.2f}x: {_verdict(ratio, min(ratios), max(ratios), TARGET_EVERY_RATIO)}"
    )


def _verdict(value: float, lo: float, hi: float, target: float) -> str:
    """PASS or FAIL by the median's value; flagged when the rounds fall on both sides of the target."""
    return _pass(value <= target) + (" (unresolved: the rounds straddle the target)" if lo <= target < hi else "")


def _pass(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def memory_table(mem: dict[str, dict], title: str, steps: int) -> str:
    base, source, params = mem["SGD"]["peak_rise"], mem["SGD"]["source"], mem["SGD"]["params"]
    unit, scale = ("KiB", 1024) if params < 4 * MIB else ("MiB", MIB)
    rows = [
        f"Peak memory, {title}, {mem['SGD']['n_params']:,} parameters = {params / scale:,.1f} {unit}; "
        f"rise of {source} over {steps} step(s) from the first",
        f"{'method':<10} {f'peak rise {unit}':>14} {'ratio to SGD':>13} {'extra buffers':>14} "
        f"{f'opt.state {unit}':>14} {'state/params':>13}",
    ]
    for m in OPTIMIZERS:
        r = mem[m.name]
        rise = "n/a" if r["peak_rise"] is None else f"{r['peak_rise'] / scale:,.1f}"
        ratio = "n/a" if r["peak_rise"] is None or not base else f"{r['peak_rise'] / base:.2f}x"
        rows.append(
            f"{m.name:<10} {rise:>14} {ratio:>13} {_extra_buffers(mem, m.name):>14} "
            f"{r['state'] / scale:>14,.1f} {r['state'] / r['params']:>12.2f}x"
        )
    rows.append("extra buffers = (peak rise - SGD's peak rise) / parameter bytes")
    return "\n".join(rows)


def _extra_buffers(mem: dict[str, dict], name: str, digits: int = 2) -> str:
    rise, base = mem[name]["peak_rise"], mem["SGD"]["peak_rise"]
    return "n/a" if rise is None or base is None else f"{(rise - base) / mem[name]['params']:+.{digits}f}"


def memory_verdict(mem: dict[str, dict], title: str) -> str:
    extra = _extra_buffers(mem, "AMP N=1")
    verdict = "n/a" if extra == "n/a" else _pass(float(extra) <= TARGET_EXTRA_BUFFERS)
    noise = " (parameters < 1 MiB: RSS noise dominates)" if mem["SGD"]["params"] < MIB and verdict != "n/a" else ""
    return (
        f"Issue 11, AMP N=1 memory ({title}): {extra} parameter-sized buffers beyond SGD's peak "
        f"<= {TARGET_EXTRA_BUFFERS:.0f}: {verdict}{noise}"
    )


def memory_report(args, device: torch.device) -> tuple[str, str]:
    """The memory tables and the verdict line: the MLP at the timed width and at --mem-width (the verdict's
    table), or the ResNet."""
    if args.model == "mlp":
        mlp = f"MLP {INPUT_DIM}-{{0}}-{{0}}-{NUM_CLASSES}".format
        widths = [(args.width, f"timed {mlp(args.width)} (for a tiny model mostly allocator noise)")]
        if args.mem_width and args.mem_width != args.width:
            widths.append((args.mem_width, f"wide {mlp(args.mem_width)} (--mem-width; parameters dominate)"))
    else:
        widths = [(args.width, f"PreActResNet18, batch {args.batch_size}")]
    mem = measure_memory(args, device, [width for width, _ in widths])
    parts = [memory_table(mem[width], title, args.mem_steps) for width, title in widths]
    width, title = widths[-1]
    return "\n\n".join(parts), memory_verdict(mem[width], title.split(" (")[0])


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="mlp", help="default: %(default)s")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=default_device,
        help="default here: %(default)s (cuda when available)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="autocast of forward and loss; fp16 adds a GradScaler (default: %(default)s)",
    )
    p.add_argument("--channels-last", action="store_true", help="ResNet and input in torch.channels_last")
    p.add_argument("--batch-size", type=int, default=None, help="default: 50 (mlp), 128 (preact_resnet18)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per method per round (default: 200 (mlp), 10 (preact_resnet18))",
    )
    p.add_argument("--width", type=int, default=100, help="hidden units of the timed MLP (default: %(default)s)")
    p.add_argument(
        "--repeats", type=int, default=5, help="round-robin rounds; the median is reported (default: %(default)s)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per method before the rounds (default: 20 (mlp), 3 (preact_resnet18))",
    )
    p.add_argument(
        "--mem-width",
        type=int,
        default=2048,
        help="MLP only: hidden units of the wide MLP whose memory is also measured; 0 skips it (default: %(default)s)",
    )
    p.add_argument("--mem-steps", type=int, default=3, help="steps per memory measurement (default: %(default)s)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory measurements")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument(
        "--every",
        type=int,
        default=4,
        help="k of the rows AMP every k (reuse delta and gradient); 1 leaves them out (default: %(default)s)",
    )
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated rows to time (SGD and passes always run), e.g. 'AMP N=1,AMP k=4 delta'",
    )
    p.add_argument("--_mem-worker", dest="mem_worker", choices=[m.name for m in OPTIMIZERS], help=argparse.SUPPRESS)
    p.add_argument("--_mem-worker-width", dest="mem_worker_width", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    _check(p, args)
    if args.every > 1:  # the same number of refreshes in every round
        args.steps = -(-args.steps // args.every) * args.every
    return args


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch_size", "steps", "width", "repeats", "mem_steps", "every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.mem_width < 0:
        p.error("--warmup and --mem-width must be >= 0")
    if args.channels_last and args.model == "mlp":
        p.error("--channels-last is for --model preact_resnet18 (the MLP has no 4-d tensors)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_worker:  # hidden: one CPU memory measurement in this fresh process
        result = measure_memory_cpu_here(BY_NAME[args.mem_worker], args.mem_worker_width, args)
        print(json.dumps(result))
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once (in warm-up)
    started = time.perf_counter()
    print(header(args, device), flush=True)
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > usable_cpus():
        print(
            "WARNING : the machine is busy (1-min load above the usable CPUs): times are inflated and noisy;"
            " rerun on an idle machine for numbers to quote"
        )
    print()
    samples = time_methods(args, device)
    print(time_table(samples, args), flush=True)
    verdicts = [time_verdict(samples, args, device)]
    if args.memory:
        tables, verdict = memory_report(args, device)
        print("\n" + tables, flush=True)
        verdicts.append(verdict)
    print("\n" + "\n".join(verdicts))
    print(f"\ntotal benchmark time: {time.perf_counter() - started:.1f} s; {_load()} at the end")


if __name__ == "__main__":
    main()
