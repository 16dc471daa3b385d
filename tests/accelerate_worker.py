"""The worker of ``tests/test_integrations_accelerate.py``: under ``accelerate launch`` (2 CPU processes, gloo),
trains SAM through ``advreg.integrations.accelerate``, each replica on its own shard of every global batch.

``accelerate launch --multi_gpu --num_processes 2 tests/accelerate_worker.py OUT_DIR`` writes ``OUT_DIR/rank{r}.pt``: for
each case (Δ from the global batch's gradient, or each replica's own), the final parameters and the gradient
all-reduces of the run (counted by a DDP comm hook). The test imports this file for the shared setting.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

WORLD, B, STEPS, RHO, LR = 2, 8, 4, 0.05, 0.1
CASES = ("global", "local")  # perturb_on


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global batches of WORLD·B rows; replica r trains on rows [r·B, (r+1)·B) of each."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(WORLD * B, 6, generator=generator), torch.randint(3, (WORLD * B,), generator=generator))
            for _ in range(STEPS)]


def train(accelerator, case: str) -> dict:
    import advreg
    from advreg.integrations.accelerate import perturbed_optimizer, step

    reduces = []

    def counting_hook(state, bucket):  # one call per gradient bucket all-reduced
        reduces.append(bucket.index())
        return allreduce_hook(state, bucket)

    model = accelerator.prepare(make_model())
    model.register_comm_hook(None, counting_hook)  # prepare wrapped it in DDP
    opt = accelerator.prepare(perturbed_optimizer(accelerator, model, advreg.SAM, torch.optim.SGD, rho=RHO, lr=LR,
                                                  momentum=0.9, perturb_on=case))
    rank = accelerator.process_index
    for x, y in make_data():
        x, y = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            return loss
        step(accelerator, opt, closure)
    return {"params": [p.detach().clone() for p in model.parameters()], "reduces": len(reduces)}


def main(out: Path) -> None:
    import accelerate
    accelerator = accelerate.Accelerator(cpu=True)
    results = {case: train(accelerator, case) for case in CASES}
    torch.save(results, out / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
