"""The worker of ``tests/integrations/test_integrations_lightning.py``'s DDP test: under torchrun (2 processes,
gloo), Lightning's
``strategy="ddp"`` trains ``PerturbedModule`` with SAM, each replica on its own shard of every global batch
(``integration_setup`` holds the setting).

``python -m torch.distributed.run --nproc_per_node=2 tests/integrations/lightning_ddp_worker.py OUT_DIR`` writes
``OUT_DIR/rank{r}.pt``: this replica's final parameters, its optimizer steps and its gradient all-reduces.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import integration_setup as S
import torch
import torch.distributed as dist


def main(out: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    import advreg
    from advreg.integrations.lightning import PerturbedModule

    rank, reduces = int(os.environ["RANK"]), []

    class Net(PerturbedModule):
        def __init__(self):
            super().__init__()
            self.net = S.make_model()

        def training_step(self, batch, batch_idx):
            return S.cross_entropy(self.net, batch)

        def on_fit_start(self):  # Lightning registers ddp_comm_hook on CUDA only; the DDP model is there by now
            self.trainer.strategy.model.register_comm_hook(None, S.counting_hook(reduces))

        def configure_optimizers(self):
            return self.perturbed_optimizer(advreg.SAM, torch.optim.SGD, rho=S.RHO, lr=S.LR, momentum=S.MOMENTUM)

    module = Net()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=S.WORLD,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        strategy=DDPStrategy(process_group_backend="gloo"),
    )
    shards = [S.shard(batch, rank) for batch in S.make_data()]
    trainer.fit(module, torch.utils.data.DataLoader(shards, batch_size=None))
    torch.save(
        {
            "params": [p.detach() for p in module.net.parameters()],
            "steps": trainer.global_step,
            "reduces": len(reduces),
        },
        out / f"rank{rank}.pt",
    )
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
