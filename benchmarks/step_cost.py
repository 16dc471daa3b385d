"""What does one AMP / SAM / AWP / RWP step cost compared with plain SGD?  Measured, in this run.

Usage::

    python benchmarks/step_cost.py [--device cpu|cuda] [--batch-size 50] [--steps 200]
                                   [--width 100] [--repeats 5] [--mem-width 2048]

What is measured
----------------
* **Time** of one optimizer step -- forward, backward and update, the closure included -- for
  plain ``torch.optim.SGD`` (momentum 0.9, weight decay 1e-4), ``advreg.AMP`` with N = 1, 2, 3
  inner steps, ``advreg.SAM``, ``advreg.AWP`` (K2 = 1) and ``advreg.RWP``, all wrapping that
  same SGD (on the clean loss here: the PGD examples of adversarial training are the transform's cost).  The model is the MNIST-1D MLP
  (40 -> width -> width -> 10, ReLU) on a fixed synthetic batch of MNIST-1D shape (x of shape
  (B, 40), labels in 0..9, fixed seeds).  After warm-up steps the methods run in ``--repeats``
  round-robin rounds of ``--steps`` steps each (the order rotates every round), so that machine
  noise hits all methods alike; the time per step of a method is the median over its rounds.
  The clock is ``time.perf_counter``, read after ``torch.cuda.synchronize()`` on CUDA.
* **Peak memory** of the steps, relative to SGD.  On CUDA: ``torch.cuda.max_memory_allocated``
  minus the allocation just before the first step (peak stats reset there), in this process.
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
* **Optimizer state**: the exact bytes of the tensors in ``optimizer.state`` (public API; for
  AMP/SAM it is the wrapped SGD's state).  Scratch buffers that a perturbation keeps outside its
  state (e.g. the copy of theta) are not in it; they show up in the peak memory only.

How to read the output
----------------------
``ratio`` is a method's median time per step divided by SGD's, from this run.  The expected
value next to it is the number of forward/backward passes per step (AMP: N+1, SAM and AWP: 2, SGD and RWP: 1);
a measured ratio below it means the fixed per-step costs (Python overhead, the update) weigh in,
above it that the perturbation's own arithmetic (norms, copies, a host sync for the finiteness
check) costs something.  The default MLP has ~15k parameters, so its memory rise is mostly
allocator and RSS noise (MiBs); read the memory ratios of the wide MLP (``--mem-width`` hidden
units, parameters dominate) for what the methods cost in memory.
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

NUM_CLASSES = 10
INPUT_DIM = 40  # MNIST-1D: 40 samples per sequence
SGD_KWARGS = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
AMP_KWARGS = dict(epsilon=0.5, inner_lr=1.0)
SAM_KWARGS = dict(rho=0.05)
SEED = 0
MIB = 2**20


# -- the methods ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    passes: int  # forward/backward passes per step (closure calls)
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _amp(n: int) -> Method:
    return Method(f"AMP N={n}", n + 1,
                  lambda params: advreg.AMP(params, torch.optim.SGD, inner_steps=n, **AMP_KWARGS, **SGD_KWARGS))


METHODS = [Method("SGD", 1, lambda params: torch.optim.SGD(params, **SGD_KWARGS)),
           _amp(1), _amp(2), _amp(3),
           Method("SAM", 2, lambda params: advreg.SAM(params, torch.optim.SGD, **SAM_KWARGS, **SGD_KWARGS)),
           Method("AWP K2=1", 2, lambda params: advreg.AWP(params, torch.optim.SGD, gamma=0.01, **SGD_KWARGS)),
           Method("RWP", 1, lambda params: advreg.RWP(params, torch.optim.SGD, gamma=0.01, **SGD_KWARGS))]
BY_NAME = {m.name: m for m in METHODS}


# -- model, data, one training setup --------------------------------------------------------------
def build_model(width: int) -> tuple[nn.Module, str]:
    """The MNIST-1D MLP 40 -> width -> width -> 10 and where it came from (the library's builder if present)."""
    try:
        from advreg.models import build
    except ImportError:
        return _fallback_mlp(width), "nn.Sequential defined in this script (advreg.models.build not found)"
    model = build("mlp", num_classes=NUM_CLASSES, input_shape=(INPUT_DIM,), hidden=(width, width))
    return model, f'advreg.models.build("mlp", num_classes={NUM_CLASSES}, input_shape=({INPUT_DIM},), ' \
                  f'hidden=({width}, {width}))'


def _fallback_mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(INPUT_DIM, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, NUM_CLASSES))


@dataclass
class Setup:
    model: nn.Module
    opt: torch.optim.Optimizer
    closure: Callable[[], torch.Tensor]


def make_setup(method: Method, width: int, batch_size: int, device: torch.device) -> Setup:
    """A freshly initialised model (same seed for every method), its optimizer and a closure."""
    torch.manual_seed(SEED)
    model = build_model(width)[0].to(device).train()
    gen = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(batch_size, INPUT_DIM, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen).to(device)
    opt = method.make(list(model.parameters()))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return Setup(model, opt, closure)


def run_steps(setup: Setup, n: int) -> torch.Tensor:
    loss = None
    for _ in range(n):
        loss = setup.opt.step(setup.closure)
    return loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- time -----------------------------------------------------------------------------------------
def time_methods(args, device: torch.device) -> dict[str, list[float]]:
    """ms per step of every method in every round: warm-up, then rotating round-robin blocks."""
    setups = {m.name: make_setup(m, args.width, args.batch_size, device) for m in METHODS}
    for name, setup in setups.items():
        run_steps(setup, args.warmup)
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in setups}
    names = list(setups)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
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


def _prime_autograd(device: torch.device) -> None:
    """One tiny forward/backward so that one-time autograd/kernel set-up is not billed to a method."""
    tiny = _fallback_mlp(8).to(device)
    F.cross_entropy(tiny(torch.randn(2, INPUT_DIM, device=device)), torch.zeros(2, dtype=torch.long,
                                                                               device=device)).backward()


def measure_memory_cpu_here(method: Method, width: int, args) -> dict:
    """In this (fresh) process: rise of peak RSS over the RSS just before the first step."""
    device = torch.device("cpu")
    _prime_autograd(device)
    setup = make_setup(method, width, args.batch_size, device)
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
    rise = None if peak is None else max(peak - before, 0) * 1024
    return {"peak_rise": rise, "source": source, "state": state_bytes(setup.opt),
            "params": param_bytes(setup.model), "n_params": n_params(setup.model)}


def measure_memory_cpu(method: Method, width: int, args) -> dict:
    """Runs :func:`measure_memory_cpu_here` in a fresh interpreter (this script, hidden flags)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--device", "cpu", "--batch-size", str(args.batch_size),
           "--mem-steps", str(args.mem_steps), "--threads", str(torch.get_num_threads()),
           "--_mem-worker", method.name, "--_mem-worker-width", str(width)]
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
    _prime_autograd(device)
    setup = make_setup(method, width, args.batch_size, device)
    gc.collect()
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_steps(setup, args.mem_steps)
    sync(device)
    result = {"peak_rise": torch.cuda.max_memory_allocated(device) - before, "source": "max_memory_allocated",
              "state": state_bytes(setup.opt), "params": param_bytes(setup.model), "n_params": n_params(setup.model)}
    del setup
    gc.collect()
    torch.cuda.empty_cache()
    return result


def measure_memory(args, device: torch.device, widths: list[int]) -> dict[int, dict[str, dict]]:
    """{width: {method: result}}.  The CPU workers run a few at a time (RSS is per process, so they
    do not disturb each other's numbers; torch's import dominates their run time)."""
    jobs = [(w, m) for w in widths for m in METHODS]
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
    model, source = build_model(args.width)
    env = "".join(f"{k}={shlex.quote(os.environ[k])} " for k in ("PYTHONPATH", "CUDA_VISIBLE_DEVICES")
                  if os.environ.get(k))
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = _cpu_model() or platform.processor() or platform.machine()
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
        f"data    : synthetic MNIST-1D batch, B={args.batch_size}; seeds fixed",
        f"methods : SGD {_kw(SGD_KWARGS)}; AMP {_kw(AMP_KWARGS)} (+SGD); SAM {_kw(SAM_KWARGS)} (+SGD); AWP and RWP gamma=0.01 (+SGD)",
    ]
    return "\n".join(lines)


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


def time_table(samples: dict[str, list[float]], args) -> str:
    med = {name: statistics.median(s) for name, s in samples.items()}
    base = med["SGD"]
    rows = [f"Time per step: median of {args.repeats} round-robin rounds x {args.steps} steps "
            f"(after {args.warmup} warm-up steps per method)",
            f"{'method':<10} {'ms/step':>9} {'min-max over rounds':>21} {'ratio to SGD':>13} {'expected (passes)':>18}"]
    for m in METHODS:
        s = samples[m.name]
        rows.append(f"{m.name:<10} {med[m.name]:>9.3f} {f'{min(s):.3f}-{max(s):.3f}':>21} "
                    f"{med[m.name] / base:>12.2f}x {m.passes:>17}x")
    return "\n".join(rows)


def memory_table(mem: dict[str, dict], width: int, label: str, steps: int) -> str:
    base, source, params = mem["SGD"]["peak_rise"], mem["SGD"]["source"], mem["SGD"]["params"]
    unit, scale = ("KiB", 1024) if params < 4 * MIB else ("MiB", MIB)
    rows = [f"Peak memory, {label}: MLP {INPUT_DIM}-{width}-{width}-{NUM_CLASSES}, "
            f"{mem['SGD']['n_params']:,} parameters = {params / scale:,.1f} {unit}; "
            f"rise of {source} over {steps} step(s) from the first",
            f"{'method':<10} {f'peak rise {unit}':>14} {'ratio to SGD':>13} {f'opt.state {unit}':>14} "
            f"{'state/params':>13}"]
    for m in METHODS:
        r = mem[m.name]
        rise = "n/a" if r["peak_rise"] is None else f"{r['peak_rise'] / scale:,.1f}"
        ratio = "n/a" if r["peak_rise"] is None or not base else f"{r['peak_rise'] / base:.2f}x"
        rows.append(f"{m.name:<10} {rise:>14} {ratio:>13} {r['state'] / scale:>14,.1f} "
                    f"{r['state'] / r['params']:>12.2f}x")
    return "\n".join(rows)


# -- command line ---------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device,
                   help="default here: %(default)s (cuda when available)")
    p.add_argument("--batch-size", type=int, default=50, help="default: %(default)s")
    p.add_argument("--steps", type=int, default=200, help="timed steps per method per round (default: %(default)s)")
    p.add_argument("--width", type=int, default=100, help="hidden units of the timed MLP (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="round-robin rounds; the median is reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20,
                   help="untimed steps per method before the rounds (default: %(default)s)")
    p.add_argument("--mem-width", type=int, default=2048,
                   help="hidden units of the wide MLP whose memory is also measured; 0 skips it (default: %(default)s)")
    p.add_argument("--mem-steps", type=int, default=3, help="steps per memory measurement (default: %(default)s)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory measurements")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--_mem-worker", dest="mem_worker", choices=list(BY_NAME), help=argparse.SUPPRESS)
    p.add_argument("--_mem-worker-width", dest="mem_worker_width", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "width", "repeats", "mem_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.mem_width < 0:
        p.error("--warmup and --mem-width must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_worker:  # hidden: one CPU memory measurement in this fresh process
        result = measure_memory_cpu_here(BY_NAME[args.mem_worker], args.mem_worker_width, args)
        print(json.dumps(result))
        return
    device = torch.device(args.device)
    started = time.perf_counter()
    print(header(args, device), flush=True)
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > usable_cpus():
        print("WARNING : the machine is busy (1-min load above the usable CPUs): times are inflated and noisy;"
              " rerun on an idle machine for numbers to quote")
    print()
    print(time_table(time_methods(args, device), args), flush=True)
    if args.memory:
        widths = [(args.width, "timed MLP (--width; for a tiny model mostly allocator noise)")]
        if args.mem_width and args.mem_width != args.width:
            widths.append((args.mem_width, "wide MLP (--mem-width; read these ratios when parameters dominate)"))
        mem = measure_memory(args, device, [width for width, _ in widths])
        for width, label in widths:
            print()
            print(memory_table(mem[width], width, label, args.mem_steps), flush=True)
    print(f"\ntotal benchmark time: {time.perf_counter() - started:.1f} s; {_load()} at the end")


if __name__ == "__main__":
    main()
