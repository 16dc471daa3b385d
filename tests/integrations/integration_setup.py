"""The setting shared by the framework tests (``test_integrations_*``) and their workers (``lightning_ddp_worker.py``,
``accelerate_worker.py``): the model, the data, advreg's own ``step(closure)`` loop that each framework's run is
compared against, and for the 2-process runs each replica's shard, a DDP comm hook that counts the gradient
all-reduces, and SAM with each replica's own Δ written out from the equations.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, Callable

import torch
import torch.nn.functional as F

import advreg

WORLD, B, STEPS, RHO, LR, MOMENTUM = 2, 8, 4, 0.05, 0.1, 0.9  # replicas, rows per replica, steps; SAM and its SGD
KINDS = {"sam": (advreg.SAM, {"rho": 0.05}), "amp": (advreg.AMP, {"epsilon": 0.05, "inner_lr": 1.0, "inner_steps": 2})}
Batch = Any  # what the loss function of a test takes: an (x, y) pair, or the Transformers' dict of inputs


def make_model(batch_norm: bool = False) -> torch.nn.Module:
    """The same float32 MLP 6-16-3 in every process and run; the DDP runs have no BatchNorm (DDP would broadcast its
    buffers), the single-process ones do (advreg must hold its statistics during the ascent passes)."""
    torch.manual_seed(0)
    norm = [torch.nn.BatchNorm1d(16)] if batch_norm else []
    return torch.nn.Sequential(torch.nn.Linear(6, 16), *norm, torch.nn.ReLU(), torch.nn.Linear(16, 3))


def rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n seeded rows: 6 features, a label of 3 classes."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=generator), torch.randint(3, (n,), generator=generator)


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global batches of WORLD·B rows; replica r trains on rows [r·B, (r+1)·B) of each (``shard``)."""
    return list(zip(*(t.split(WORLD * B) for t in rows(STEPS * WORLD * B))))


def cross_entropy(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def windows(batches: list[Batch], k: int) -> list[list[Batch]]:
    """The micro-batches of each update: k consecutive batches (gradient accumulation over k)."""
    return [batches[start : start + k] for start in range(0, len(batches), k)]


def reference_optimizer(model: torch.nn.Module, kind: type, clip: float | None = None, **kwargs: Any):
    """advreg's ``kind`` over SGD on ``model``; with ``clip``, the final gradient's norm clipped to it just before the
    base step, where the frameworks' max-norm clipping acts (a clipped ∇J(θ) would change Δ)."""
    opt = kind(model.parameters(), torch.optim.SGD, model=model, **kwargs)
    if clip is not None:
        opt.base_optimizer.register_step_pre_hook(
            lambda *_: torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip) and None
        )
    return opt


def closure(
    opt,
    model: torch.nn.Module,
    window: list[Batch],
    loss_of: Callable = cross_entropy,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
) -> Callable[[], torch.Tensor]:
    """The closure of one update: zero the gradients, back-propagate each of the k micro-batches' loss/k (under
    ``autocast``, scaled by ``scaler``, or through a framework's ``backward`` such as ``accelerator.backward``) and
    return the summed loss."""

    def run() -> torch.Tensor:
        opt.zero_grad()
        total = 0.0
        for batch in window:
            with torch.autocast("cpu", autocast, enabled=autocast is not None):
                loss = loss_of(model, batch) / len(window)
            if backward is not None:
                backward(loss)
            else:
                (loss if scaler is None else scaler.scale(loss)).backward()
            total = total + loss.detach()
        return total

    return run


def step_closure_loop(
    opt,
    model: torch.nn.Module,
    updates: list[list[Batch]],
    scaler=None,
    after_update: Callable[[], Any] = lambda: None,
    **closure_options: Any,
) -> None:
    """advreg's own loop: ``opt.step(closure)`` per update's micro-batches, then the scaler's update and
    ``after_update`` (a per-update schedule's step)."""
    for window in updates:
        opt.step(closure(opt, model, window, scaler=scaler, **closure_options))
        if scaler is not None:
            scaler.update()
        after_update()


def assert_same(a, b, **tol: float) -> None:
    """Each tensor of ``a`` equals the same one of ``b`` (modules: their state dicts, in order; else sequences of
    tensors) within ``tol``, by default rtol 1e-5 and atol 1e-6."""
    tol = tol or {"rtol": 1e-5, "atol": 1e-6}
    a, b = (dict(m.state_dict()) if isinstance(m, torch.nn.Module) else dict(enumerate(m)) for m in (a, b))
    for (name, x), y in zip(a.items(), b.values(), strict=True):
        torch.testing.assert_close(x, y, **tol, msg=str(name))


def launch(command: list[str]) -> None:
    """Run a launcher of the 2-process workers (one thread a process); a failure shows the end of their output."""
    done = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{command[2]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t[rank * B : (rank + 1) * B] for t in batch)


def counting_hook(counts: list[int]) -> Callable[[Any, Any], Any]:
    """A DDP comm hook that all-reduces as DDP does and appends to ``counts`` once per gradient bucket."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        counts.append(bucket.index())
        return allreduce_hook(state, bucket)

    return hook


def per_replica_sam() -> list[torch.Tensor]:
    """SAM with each replica's own Δ_r = ρ·g_r/‖g_r‖ (g_r: its shard's gradient at θ); SGD steps at θ with the mean
    over replicas of ∇J_r(θ+Δ_r), the gradient that one all-reduce of the final pass gives."""
    model = make_model()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    for batch in make_data():
        total = [torch.zeros_like(p) for p in params]
        for r in range(WORLD):
            x, y = shard(batch, r)
            g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            scale = (RHO / torch.linalg.vector_norm(torch.stack([t.norm() for t in g]))).item()
            with torch.no_grad():
                torch._foreach_add_(params, g, alpha=scale)  # to θ+Δ_r
            perturbed = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            total = [t + h / WORLD for t, h in zip(total, perturbed)]
            with torch.no_grad():
                torch._foreach_add_(params, g, alpha=-scale)  # back to θ (to rounding; the reference's own)
        for p, t in zip(params, total):
            p.grad = t
        opt.step()
    return [p.detach() for p in params]
