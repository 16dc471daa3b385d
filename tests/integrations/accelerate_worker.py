"""The worker of ``tests/integrations/test_integrations_accelerate.py``: under ``accelerate launch`` (2 CPU processes, gloo),
trains SAM through ``advreg.integrations.accelerate``, each replica on its own shard of every global batch
(``integrations_ddp`` holds the setting).

``accelerate launch --multi_gpu --num_processes 2 tests/integrations/accelerate_worker.py OUT_DIR`` writes ``OUT_DIR/rank{r}.pt``:
for each ``perturb_on`` (Δ from the global batch's gradient, or each replica's own), the final parameters and the
run's gradient all-reduces.
"""
from __future__ import annotations

import sys
from pathlib import Path

import integrations_ddp as S
import torch
import torch.nn.functional as F

CASES = ("global", "local")  # perturb_on


def train(accelerator, case: str) -> dict:
    import advreg
    from advreg.integrations.accelerate import perturbed_optimizer, step

    reduces = []
    model = accelerator.prepare(S.make_model())
    model.register_comm_hook(None, S.counting_hook(reduces))  # prepare wrapped it in DDP
    opt = accelerator.prepare(perturbed_optimizer(accelerator, model, advreg.SAM, torch.optim.SGD, rho=S.RHO,
                                                  lr=S.LR, momentum=S.MOMENTUM, perturb_on=case))
    for batch in S.make_data():
        x, y = S.shard(batch, accelerator.process_index)

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
