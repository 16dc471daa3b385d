"""The worker of ``tests/test_integrations_lightning.py``'s DDP test: under torchrun (2 processes, gloo), Lightning's
``strategy="ddp"`` trains ``PerturbedModule`` with SAM, each replica on its own shard of every global batch.

``python -m torch.distributed.run --nproc_per_node=2 tests/lightning_ddp_worker.py OUT_DIR`` writes
``OUT_DIR/rank{r}.pt``: this replica's final parameters, its optimizer steps and its gradient all-reduces (counted by
a DDP comm hook). The test imports this file for the shared setting and computes the reference in one process.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

WORLD, B, STEPS, RHO, LR = 2, 8, 4, 0.05, 0.1


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global batches of WORLD·B rows; replica r trains on rows [r·B, (r+1)·B) of each."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(WORLD * B, 6, generator=generator), torch.randint(3, (WORLD * B,), generator=generator))
            for _ in range(STEPS)]


def main(out: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    import advreg
    from advreg.integrations.lightning import PerturbedModule

    rank, reduces = int(os.environ["RANK"]), []

    def counting_hook(state, bucket):  # one call per gradient bucket all-reduced
        reduces.append(bucket.index())
        return torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook(state, bucket)

    class Net(PerturbedModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def on_fit_start(self):  # Lightning registers ddp_comm_hook on CUDA only; the DDP model is there by now
            self.trainer.strategy.model.register_comm_hook(None, counting_hook)

        def configure_optimizers(self):
            return self.perturbed_optimizer(advreg.SAM, torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)

    shard = [(x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]) for x, y in make_data()]
    module = Net()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=WORLD, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         strategy=DDPStrategy(process_group_backend="gloo"))
    trainer.fit(module, torch.utils.data.DataLoader(shard, batch_size=None))
    torch.save({"params": [p.detach() for p in module.net.parameters()], "steps": trainer.global_step,
                "reduces": len(reduces)}, out / f"rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
