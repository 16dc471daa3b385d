"""Train the MNIST-1D MLP with AMP under DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/ddp_amp.py --perturb-on global   # --help lists the options

Each epoch every rank draws the same permutation of the training set (a generator seeded by seed and epoch) and
trains on its shard of every global batch. With ``--perturb-on local`` (the default) each replica perturbs the
weights by its own shard's gradient, as the AMP paper's per-batch Δ, and a step costs one all-reduce; ``global``
takes Δ from the all-reduced gradient of the whole global batch (N+1 all-reduces a step). Uses gloo on CPU and
nccl when LOCAL_RANK names a CUDA device. Rank 0 prints the training loss of each epoch and the final test error.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import advreg
from advreg.data import load_dataset
from advreg.models import build


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=100, help="rows per step over all ranks")
    parser.add_argument("--perturb-on", choices=("local", "global"), default="local")
    parser.add_argument("--epsilon", type=float, default=0.5, help="AMP's ball radius ε")
    parser.add_argument("--inner-lr", type=float, default=1.0, help="AMP's ascent step ζ")
    parser.add_argument("--inner-steps", type=int, default=1, help="AMP's N")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def init_distributed() -> torch.device:
    """Join the process group torchrun describes: nccl on this rank's GPU if there is one, else gloo on CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


@torch.no_grad()
def evaluate_error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> float:
    """Each rank counts the mistakes on its share of the test set; the counts are summed over ranks."""
    model.eval()
    mine = slice(rank, None, world)
    counts = torch.tensor(
        [(model(x[mine]).argmax(1) != y[mine]).sum().item(), len(y[mine])], dtype=torch.float64, device=x.device
    )
    dist.all_reduce(counts)
    model.train()
    return (counts[0] / counts[1]).item()


def main() -> None:
    args = parse_args()
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the {world} processes")
    local_batch = args.global_batch // world

    data = load_dataset("mnist1d", seed=args.seed)
    x, y = (t.to(device) for t in data.train)
    x_test, y_test = (t.to(device) for t in data.test)

    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = build("mlp", data.num_classes, input_shape=data.input_shape).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = advreg.AMP(
        ddp.parameters(),
        torch.optim.SGD,
        epsilon=args.epsilon,
        inner_lr=args.inner_lr,
        inner_steps=args.inner_steps,
        lr=args.lr,
        momentum=0.9,
        weight_decay=1e-4,
        no_sync=ddp.no_sync,
        perturb_on=args.perturb_on,
    )

    for epoch in range(args.epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        total, steps = torch.zeros((), device=device), 0
        for start in range(0, len(y) - args.global_batch + 1, args.global_batch):  # full global batches only
            rows = order[start + rank * local_batch : start + (rank + 1) * local_batch].to(device)
            xb, yb = x[rows], y[rows]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(ddp(xb), yb)
                loss.backward()
                return loss

            total += opt.step(closure).detach()  # this rank's loss at θ
            steps += 1
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}: training loss {total.item() / (steps * world):.4f}", flush=True)

    error = evaluate_error(model, x_test, y_test, rank, world)
    if rank == 0:
        print(
            f"test error {100 * error:.2f}% (AMP under DDP, {world} processes, perturb_on={args.perturb_on}, "
            f"global batch {args.global_batch})",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
