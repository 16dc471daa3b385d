"""advreg's optimizers with Hugging Face Accelerate (the real package; ``pip install "advreg[accelerate]"``).

- One process: ``accelerator.prepare`` + ``accelerator.backward`` + ``advreg.integrations.accelerate.step`` equals
  advreg's own ``step(closure)`` loop, bit for bit (the same arithmetic), with ``max_grad_norm`` clipping the final
  gradient;
- fp16's scaler: on the CPU Accelerate makes none (fp16 autocast there is not native), so the test gives the
  Accelerator a real ``torch.amp.GradScaler("cpu")`` as its ``scaler``: the run equals the loop with that scaler;
- 2 processes under ``accelerate launch`` (gloo): Δ from the global batch (``perturb_on="global"``) equals the
  single-process run on the global batch; the default local Δ runs its ascent pass under ``no_sync`` (one gradient
  all-reduce per step) and equals the per-replica SAM written out in ``integration_setup``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
import integration_setup as S
from accelerate_worker import train
from test_ddp import free_port

import advreg
from advreg.integrations.accelerate import perturbed_optimizer

WORKER = Path(__file__).with_name("accelerate_worker.py")


def reference(batches, max_grad_norm=None, scaler=None) -> torch.nn.Module:
    """advreg's own loop on the same model: SAM step(closure) per batch."""
    model = S.make_model()
    opt = S.reference_optimizer(
        model, advreg.SAM, clip=max_grad_norm, rho=S.RHO, lr=S.LR, momentum=S.MOMENTUM, grad_scaler=scaler
    )
    S.step_closure_loop(opt, model, S.windows(batches, 1), scaler=scaler)
    return model


def test_accelerate_matches_the_step_closure_loop():
    got = train(accelerate.Accelerator(cpu=True), S.make_data(), max_grad_norm=0.3)
    S.assert_same(got, reference(S.make_data(), max_grad_norm=0.3).parameters(), rtol=0, atol=0)


def test_accelerate_grad_scaler_path_matches_the_scaled_loop():
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    got = train(accelerator, S.make_data())
    expected = reference(S.make_data(), scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    S.assert_same(got, expected.parameters(), rtol=1e-6, atol=1e-7)
    assert accelerator.scaler.get_scale() == 2.0**10  # no overflow, and fewer steps than the growth interval


def test_accelerate_refuses_gradient_accumulation():
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        perturbed_optimizer(accelerator, S.make_model(), advreg.SAM, torch.optim.SGD, rho=0.05, lr=0.1)


def test_accelerate_launch_two_processes_match_the_single_process_run(tmp_path):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={S.WORLD}",
        "--num_machines=1",
        f"--main_process_port={free_port()}",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        str(WORKER),
        str(tmp_path),
    ]
    S.launch(command)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(S.WORLD)]
    single = list(reference(S.make_data()).parameters())
    local = S.per_replica_sam()
    for result in ranks:
        assert result["global"]["reduces"] == 2 * S.STEPS  # Δ from the all-reduced gradient: 2 passes synced
        assert result["local"]["reduces"] == S.STEPS  # the ascent pass under no_sync
        S.assert_same(result["global"]["params"], single)
        S.assert_same(result["local"]["params"], local)
