"""advreg's optimizers with Hugging Face Accelerate (the real package; ``pip install "advreg[accelerate]"``).

- One process: ``accelerator.prepare`` + ``accelerator.backward`` + ``advreg.integrations.accelerate.step`` equals
  advreg's own ``step(closure)`` loop, bit for bit (the same arithmetic), with ``max_grad_norm`` clipping the final
  gradient;
- fp16's scaler: on the CPU Accelerate makes none (fp16 autocast there is not native), so the test gives the
  Accelerator a real ``torch.amp.GradScaler("cpu")`` as its ``scaler``: the run equals the loop with that scaler;
- 2 processes under ``accelerate launch`` (gloo): Δ from the global batch (``perturb_on="global"``) equals the
  single-process run on the global batch; the default local Δ runs its ascent pass under ``no_sync`` (one gradient
  all-reduce per step) and equals the per-replica SAM of ``test_integrations_lightning``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

accelerate = pytest.importorskip("accelerate")
import integrations_ddp as S
from test_ddp import free_port

import advreg
from advreg.integrations.accelerate import perturbed_optimizer, step

WORKER = Path(__file__).with_name("accelerate_worker.py")


def reference(batches, max_grad_norm=None, scaler=None) -> list[torch.Tensor]:
    """advreg's own loop on the same model: SAM step(closure) per batch."""
    model = S.make_model()
    opt = advreg.SAM(model.parameters(), torch.optim.SGD, rho=S.RHO, lr=S.LR, momentum=S.MOMENTUM, grad_scaler=scaler)
    if max_grad_norm is not None:
        opt.base_optimizer.register_step_pre_hook(
            lambda *_: torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_grad_norm) and None)
    for x, y in batches:
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss
        opt.step(closure)
        if scaler is not None:
            scaler.update()
    return [p.detach() for p in model.parameters()]


def accelerate_run(accelerator, batches, max_grad_norm=None) -> list[torch.Tensor]:
    model = accelerator.prepare(S.make_model())
    opt = accelerator.prepare(perturbed_optimizer(accelerator, model, advreg.SAM, torch.optim.SGD, rho=S.RHO,
                                                  lr=S.LR, momentum=S.MOMENTUM, max_grad_norm=max_grad_norm))
    for x, y in batches:
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            return loss
        step(accelerator, opt, closure)
    return [p.detach() for p in model.parameters()]


def test_accelerate_matches_the_step_closure_loop():
    got = accelerate_run(accelerate.Accelerator(cpu=True), S.make_data(), max_grad_norm=0.3)
    for a, b in zip(got, reference(S.make_data(), max_grad_norm=0.3)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_accelerate_grad_scaler_path_matches_the_scaled_loop():
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    got = accelerate_run(accelerator, S.make_data())
    expected = reference(S.make_data(), scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert accelerator.scaler.get_scale() == 2.0 ** 10  # no overflow, and fewer steps than the growth interval


def test_accelerate_refuses_gradient_accumulation():
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        perturbed_optimizer(accelerator, S.make_model(), advreg.SAM, torch.optim.SGD, rho=0.05, lr=0.1)


def test_accelerate_launch_two_processes_match_the_single_process_run(tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={S.WORLD}",
               "--num_machines=1", f"--main_process_port={free_port()}", "--mixed_precision=no", "--dynamo_backend=no",
               str(WORKER), str(tmp_path)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, f"accelerate launch failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(S.WORLD)]
    single = reference(S.make_data())
    local = S.per_replica_sam()
    for result in ranks:
        assert result["global"]["reduces"] == 2 * S.STEPS  # Δ from the all-reduced gradient: 2 passes synced
        assert result["local"]["reduces"] == S.STEPS  # the ascent pass under no_sync
        for a, b in zip(result["global"]["params"], single):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(result["local"]["params"], local):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
