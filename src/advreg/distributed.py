"""``advreg train`` under ``torchrun``: distributed data parallel with ``torch.distributed``.

Every replica reads the same data and draws the same shuffled global batches (``optim.batch_size``) and
augmentation; replica r trains on the r-th of ``world`` slices of each batch. The model is wrapped in
``DistributedDataParallel``, and the weight perturbation's own passes run under its ``no_sync`` (one gradient
all-reduce per step; ``speed.perturb_on``). Replicas r > 0 reseed their own random stream (dropout, MixUp and ALPS
partners, PGD starts), saved per replica in the checkpoint. Replica 0 writes the run folder; every replica evaluates
the same weights, so all of them hold the same numbers.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class Replicas:
    rank: int
    world: int
    local_rank: int
    owns_group: bool  # this module initialized the process group, so it tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
        """This replica's slice of a global batch and the weight of its mean loss, n_r·world/n, so that the
        all-reduced average of the replicas' gradients is the gradient of the whole batch's mean loss (the slices
        differ by one row at most; the weight is 1 when they are equal)."""
        n = len(y)
        if n < self.world:
            raise ValueError(
                f"a batch of {n} rows cannot feed {self.world} replicas; choose an optim.batch_size "
                f"whose remainder in the training set is 0 or at least {self.world}"
            )
        xs, ys = x.tensor_split(self.world), y.tensor_split(self.world)
        return xs[self.rank], ys[self.rank], len(ys[self.rank]) * self.world / n

    def sum(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, t: Tensor) -> list[Tensor]:
        """Every replica's ``t`` (a small CPU or GPU tensor, such as a random state), in rank order."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, t.cpu())
        return out

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def all_true(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every replica (a collective: each replica calls it)."""
        nccl = dist.get_backend() == "nccl"
        flag = torch.tensor(int(ok), device=torch.device("cuda", torch.cuda.current_device()) if nccl else None)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        gc.collect()  # the run's DDP wrapper, if reference cycles keep it, goes now and not at interpreter exit
        if self.owns_group:
            dist.destroy_process_group()


def from_environment(device: str) -> Replicas | None:
    """The replicas ``torchrun`` launched (WORLD_SIZE > 1 in the environment), or None for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch has no torch.distributed; run a single process")
    if device.startswith("cuda:"):
        raise ValueError(
            f"device={device} would put every replica on one GPU; use --set device=cuda, and each "
            "process takes the GPU of its LOCAL_RANK"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)  # before NCCL starts: its collectives use the current device
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Replicas(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def replica_device(device: torch.device, replicas: Replicas | None) -> torch.device:
    """Each replica's own GPU (its LOCAL_RANK) when the run asks for CUDA."""
    if replicas is None or device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", replicas.local_rank)
