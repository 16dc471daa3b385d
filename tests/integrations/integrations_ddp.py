"""The setting shared by the 2-process runs of the framework tests (``lightning_ddp_worker.py``,
``accelerate_worker.py``) and their single-process references: the model, the data, each replica's shard, a DDP comm
hook that counts the gradient all-reduces, and SAM with each replica's own Δ written out from the equations.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

WORLD, B, STEPS, RHO, LR, MOMENTUM = 2, 8, 4, 0.05, 0.1, 0.9  # replicas, rows per replica, steps; SAM and its SGD


def make_model() -> torch.nn.Module:
    """The same float32 MLP 6-16-3 (no BatchNorm, whose buffers DDP would broadcast) in every process."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global batches of WORLD·B rows; replica r trains on rows [r·B, (r+1)·B) of each (``shard``)."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(WORLD * B, 6, generator=generator), torch.randint(3, (WORLD * B,), generator=generator))
            for _ in range(STEPS)]


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t[rank * B:(rank + 1) * B] for t in batch)


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
