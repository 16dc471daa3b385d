"""advreg's optimizers inside PyTorch Lightning (the real package; ``pip install "advreg[lightning]"``).

Each Lightning run is checked against advreg's own ``step(closure)`` loop on the same model, data and seed, with the
scheduler stepped each epoch and the final gradient clipped before the base step, as ``PerturbedModule`` does:
- full precision, SAM and AMP (N = 2), on an MLP with BatchNorm: the same weights and running statistics;
- a checkpoint taken by Lightning and resumed equals the uninterrupted run;
- ``"bf16-mixed"`` equals the loop under ``torch.autocast("cpu", torch.bfloat16)`` (the same arithmetic);
- fp16 with a real ``GradScaler("cpu")`` (on the CPU ``precision="16-mixed"`` makes no scaler, so the same
  ``MixedPrecision`` plugin is given one and passed as ``plugins=``) equals the loop with the scaler passed as
  ``grad_scaler=``, and a
  checkpoint resumes with the scaler's state;
- ``accumulate_grad_batches=2``: Δ from the accumulated batch's gradient, the loop's closure running over both batches;
- ``strategy="ddp"`` with 2 gloo processes: one gradient all-reduce per step (a DDP comm hook counts them), and the
  weights of SAM with each replica's own Δ, written out from the equations (``integration_setup``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
import integration_setup as S
from test_ddp import free_port

import advreg
from advreg.integrations.lightning import PerturbedModule

WORKER = Path(__file__).with_name("lightning_ddp_worker.py")
EPOCHS, BATCH, CLIP = 2, 16, 0.5
KINDS = {
    **S.KINDS,
    # ζ‖g‖ < ε: Δ = ζ·g, which a clipped ∇J(θ) would shrink (‖g‖ ≈ 0.8-1.1 > CLIP), so only the final gradient
    # may be clipped for the runs to agree
    "amp_unprojected": (advreg.AMP, {"epsilon": 10.0, "inner_lr": 0.5, "inner_steps": 1}),
}


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*S.rows(64)), batch_size=BATCH)


class Net(PerturbedModule):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.net = kind, S.make_model(batch_norm=True)

    def training_step(self, batch, batch_idx):
        loss = S.cross_entropy(self.net, batch)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        cls, kwargs = KINDS[self.kind]
        opt = self.perturbed_optimizer(cls, torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def fit(module: Net, root: Path, epochs: int = EPOCHS, ckpt: Path | None = None, **trainer) -> pl.Trainer:
    run = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=CLIP,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **trainer,
    )
    run.fit(module, loader(), ckpt_path=ckpt)
    return run


def reference(
    kind: str, autocast: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None, accumulate: int = 1
) -> torch.nn.Module:
    """advreg's own loop: step(closure) per ``accumulate`` batches, the final gradient clipped before the base step,
    the scheduler stepped each epoch."""
    model, (cls, kwargs) = S.make_model(batch_norm=True), KINDS[kind]
    opt = S.reference_optimizer(model, cls, clip=CLIP, lr=0.1, momentum=0.9, grad_scaler=scaler, **kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(EPOCHS):
        S.step_closure_loop(opt, model, S.windows(list(loader()), accumulate), autocast=autocast, scaler=scaler)
        scheduler.step()
    return model


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_lightning_matches_the_step_closure_loop(kind, tmp_path):
    module = Net(kind)
    fit(module, tmp_path)
    S.assert_same(module.net, reference(kind))
    opt = module.trainer.optimizers[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**EPOCHS)  # the scheduler ran on the advreg optimizer


def test_lightning_checkpoint_resumes_exactly(tmp_path):
    straight = Net("amp")
    fit(straight, tmp_path / "a", epochs=EPOCHS)
    first = Net("amp")
    run = fit(first, tmp_path / "b", epochs=1)
    run.save_checkpoint(tmp_path / "one.ckpt")
    resumed = Net("amp")
    fit(resumed, tmp_path / "c", epochs=EPOCHS, ckpt=tmp_path / "one.ckpt")
    S.assert_same(straight, resumed, rtol=0, atol=0)


def test_lightning_bf16_mixed_matches_the_autocast_loop(tmp_path):
    module = Net("sam")
    fit(module, tmp_path, precision="bf16-mixed")
    S.assert_same(module.net, reference("sam", autocast=torch.bfloat16), rtol=1e-4, atol=1e-5)


def test_lightning_fp16_grad_scaler_path_matches_the_scaled_loop(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    scale = 2.0**8
    module = Net("amp")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    fit(module, tmp_path, plugins=[plugin])
    assert module._advreg_scaler is not None and plugin.scaler is None  # the optimizer drives the scaler
    S.assert_same(
        module.net,
        reference("amp", autocast=torch.float16, scaler=torch.amp.GradScaler("cpu", init_scale=scale)),
        rtol=1e-4,
        atol=1e-5,
    )


def test_lightning_fp16_checkpoint_resumes_with_the_scaler_state(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    def plugin():  # growth_interval=2: the scale doubles every 2 steps, so a resume that lost it would differ
        return [
            MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2))
        ]

    straight = Net("sam")
    fit(straight, tmp_path / "a", plugins=plugin())
    run = fit(Net("sam"), tmp_path / "b", epochs=1, plugins=plugin())
    run.save_checkpoint(tmp_path / "one.ckpt")
    assert torch.load(tmp_path / "one.ckpt", weights_only=True)["advreg_grad_scaler"]["scale"] == 2.0**10
    resumed = Net("sam")
    fit(resumed, tmp_path / "c", ckpt=tmp_path / "one.ckpt", plugins=plugin())
    assert resumed._advreg_scaler.get_scale() == straight._advreg_scaler.get_scale() == 2.0**12
    S.assert_same(straight, resumed, rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_lightning_accumulation_takes_delta_on_the_accumulated_batch(kind, tmp_path):
    module = Net(kind)
    fit(module, tmp_path, accumulate_grad_batches=2)
    assert module.trainer.global_step == EPOCHS * len(loader()) // 2
    S.assert_same(module.net, reference(kind, accumulate=2))


def test_lightning_ddp_takes_one_all_reduce_per_step(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={S.WORLD}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(WORKER),
        str(tmp_path),
    ]
    S.launch(command)
    expected = S.per_replica_sam()
    for rank in range(S.WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["steps"] == S.STEPS and result["reduces"] == S.STEPS  # one bucket, once a step
        S.assert_same(result["params"], expected)
