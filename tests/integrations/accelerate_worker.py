"""The worker of ``tests/integrations/test_integrations_accelerate.py``: under ``accelerate launch`` (2 CPU
processes, gloo),
trains SAM through ``advreg.integrations.accelerate``, each replica on its own shard of every global batch
(``integration_setup`` holds the setting); ``train`` is the single-process run of the tests as well.

``accelerate launch --multi_gpu --num_processes 2 tests/integrations/accelerate_worker.py OUT_DIR`` writes
``OUT_DIR/rank{r}.pt``:
for each ``perturb_on`` (Δ from the global batch's gradient, or each replica's own), the final parameters and the
run's gradient all-reduces.
"""

from __future__ import annotations

import sys
from pathlib import Path

import integration_setup as S
import torch

CASES = ("global", "local")  # perturb_on


def train(accelerator, batches, counts: list[int] | None = None, **options) -> list[torch.Tensor]:
    """SAM through ``advreg.integrations.accelerate`` on ``batches``; ``counts`` (the DDP runs) gets one entry per
    gradient all-reduce; ``options`` go to ``perturbed_optimizer``."""
    import advreg
    from advreg.integrations.accelerate import perturbed_optimizer, step

    model = accelerator.prepare(S.make_model())
    if counts is not None:
        model.register_comm_hook(None, S.counting_hook(counts))  # prepare wrapped it in DDP
    opt = accelerator.prepare(
        perturbed_optimizer(
            accelerator, model, advreg.SAM, torch.optim.SGD, rho=S.RHO, lr=S.LR, momentum=S.MOMENTUM, **options
        )
    )
    for batch in batches:
        step(accelerator, opt, S.closure(opt, model, [batch], backward=accelerator.backward))
    return [p.detach().clone() for p in model.parameters()]


def main(out: Path) -> None:
    import accelerate

    accelerator = accelerate.Accelerator(cpu=True)
    shards = [S.shard(batch, accelerator.process_index) for batch in S.make_data()]
    results = {}
    for case in CASES:
        reduces = []
        results[case] = {"params": train(accelerator, shards, reduces, perturb_on=case), "reduces": len(reduces)}
    torch.save(results, out / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
