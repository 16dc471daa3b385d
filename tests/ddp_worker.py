"""The worker of ``tests/test_ddp.py``: under torchrun (2 processes, gloo), trains every case of ``CASES`` under DDP.

``python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT_DIR`` writes ``OUT_DIR/rank{r}.pt``:
for each case, this replica's final parameters and the number of gradient all-reduces of each step. The test
imports this file for the shared setting (model, data, cases) and computes its references in one process.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import advreg
from advreg.models import build

WORLD, B, STEPS = 2, 6, 4  # replicas, rows per replica, steps; the global batch is WORLD·B rows
BASE = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}  # the base SGD of every case
AMP = {"epsilon": 0.05, "inner_lr": 1.0}  # ζ‖g‖ > ε here, so the projection is active
CASES = {  # name -> (perturbed optimizer or None for plain SGD, its keywords)
    "sgd": (None, {}),
    "amp1_global": (advreg.AMP, {**AMP, "inner_steps": 1, "perturb_on": "global"}),
    "amp2_global": (advreg.AMP, {**AMP, "inner_steps": 2, "perturb_on": "global"}),
    "amp1_local": (advreg.AMP, {**AMP, "inner_steps": 1}),
    "amp2_local": (advreg.AMP, {**AMP, "inner_steps": 2}),
    "amp1_global_gradient": (
        advreg.AMP,
        {**AMP, "inner_steps": 1, "perturb_on": "global", "every": 2, "reuse": "gradient", "alpha": 0.7},
    ),
    "amp1_local_gradient": (advreg.AMP, {**AMP, "inner_steps": 1, "every": 2, "reuse": "gradient", "alpha": 0.7}),
    "amp2_local_gradient": (advreg.AMP, {**AMP, "inner_steps": 2, "every": 2, "reuse": "gradient", "alpha": 0.7}),
    "sam_local": (advreg.SAM, {"rho": 0.05}),
    "awp_local": (advreg.AWP, {"gamma": 0.05, "steps": 2}),
    "amp2_global_two_call": (advreg.AMP, {**AMP, "inner_steps": 2, "perturb_on": "global"}),
    "sam_global_two_call": (advreg.SAM, {"rho": 0.05, "perturb_on": "global"}),
}
TWO_CALL = {"amp2_global_two_call", "sam_global_two_call"}  # trained with first_step / ascent_step / second_step


def make_model() -> torch.nn.Module:
    """The same float64 MLP 5-7-3 (no BatchNorm) in every process."""
    torch.manual_seed(0)
    return build("mlp", 3, input_shape=(5,), hidden=(7,)).double()


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global batches of WORLD·B rows; replica r trains on rows [r·B, (r+1)·B) of each."""
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(WORLD * B, 5, generator=generator, dtype=torch.float64),
            torch.randint(3, (WORLD * B,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * B : (rank + 1) * B]


def make_optimizer(case: str, params, **engine) -> torch.optim.Optimizer:
    """The case's optimizer; ``engine`` (e.g. ``no_sync``) goes to the perturbed ones only."""
    cls, kwargs = CASES[case]
    if cls is None:
        return torch.optim.SGD(params, **BASE)
    return cls(params, torch.optim.SGD, **kwargs, **engine, **BASE)


def train(case: str, rank: int) -> dict:
    """Train ``case`` under DDP; count the gradient all-reduces (calls of the communication hook) of each step."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(make_model())
    calls = [0]

    def counting_hook(group, bucket):
        calls[0] += 1
        return allreduce_hook(group, bucket)

    ddp.register_comm_hook(dist.group.WORLD, counting_hook)
    opt = make_optimizer(case, ddp.parameters(), no_sync=ddp.no_sync)
    allreduces = []
    for x, y in make_data():
        x, y = shard(x, rank), shard(y, rank)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            return loss

        calls[0] = 0
        if case in TWO_CALL:
            two_call_step(opt, lambda: F.cross_entropy(ddp(x), y).backward())
        else:
            opt.step(closure)
        allreduces.append(calls[0])
    return {"params": [p.detach().clone() for p in ddp.module.parameters()], "allreduces": allreduces}


def two_call_step(opt: torch.optim.Optimizer, backward) -> None:
    """The two-call form of one step: N backwards for the Δ of N inner steps, then the final one."""
    backward()
    opt.first_step(zero_grad=True)
    for _ in range(getattr(opt, "inner_steps", 1) - 1):
        backward()
        opt.ascent_step(zero_grad=True)
    backward()
    opt.second_step(zero_grad=True)


def main(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD, f"run with --nproc_per_node={WORLD}"
    results = {case: train(case, rank) for case in CASES}
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()  # every all-reduce of both replicas is done
    gc.collect()  # nothing of the runs holds the group when it goes
    dist.destroy_process_group()


def exit_now() -> None:
    """Leave without interpreter finalization. Once in CI a replica aborted with "terminate called without an
    active exception" and no Python traceback; the likeliest place is finalization, where a gloo thread that
    still releases a tensor of the Python communication hook needs the GIL. The results are saved by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_now()
