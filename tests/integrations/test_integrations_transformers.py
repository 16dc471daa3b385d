"""advreg's optimizers in the Transformers ``Trainer`` (the real package; ``pip install "advreg[transformers]"``).

A tiny ``PreTrainedModel`` built from its config (no download; HF_HUB_OFFLINE=1) trains with ``PerturbedTrainer``;
the micro-batches the Trainer drew are recorded, and advreg's own ``step(closure)`` loop on the same model and
batches must reach the same weights: SGD with the Trainer's linear schedule, each update's closure over its k
micro-batches (loss/k each), the final gradient clipped to ``max_grad_norm`` before the base step.
- AMP (N = 2) and SAM with gradient accumulation k = 2, full precision;
- ``bf16=True`` against the loop under ``torch.autocast("cpu", torch.bfloat16)``;
- a checkpoint resumed (``resume_from_checkpoint``) equals the uninterrupted run, with SGD's momentum.
The refusal of a ready-made ``optimizers=`` is checked too.
- ``fp16=True``'s grad scaler path: on the CPU the Trainer's Accelerator makes no scaler (nor fp16 autocast), so the
  test gives it a real ``torch.amp.GradScaler("cpu")``: the run equals the loop with that scaler, and an overflowed
  step is skipped with θ as it was, the scale halved once and the Trainer's scheduler step skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
import integration_setup as S

import advreg
from advreg.integrations.transformers import PerturbedTrainer

STEPS, BATCH, ACCUMULATE, LR, CLIP = 4, 8, 2, 0.1, 0.5


class TinyConfig(transformers.PretrainedConfig):
    model_type = "advreg-tiny"

    def __init__(self, loss_factor: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.loss_factor = loss_factor


class TinyClassifier(transformers.PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.net = S.make_model(batch_norm=True)

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels) * self.config.loss_factor, "logits": logits}


def make_model(**config) -> TinyClassifier:
    return TinyClassifier(TinyConfig(**config))


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = S.rows(STEPS * BATCH * ACCUMULATE)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Recording(PerturbedTrainer):
    """Records each micro-batch the Trainer hands over, for the reference loop."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def train(kind: str, out, resume=None, scaler=None, model=None, **args) -> Recording:
    cls, kwargs = S.KINDS[kind]
    arguments = transformers.TrainingArguments(
        **{
            "output_dir": str(out),
            "per_device_train_batch_size": BATCH,
            "gradient_accumulation_steps": ACCUMULATE,
            "max_steps": STEPS,
            "learning_rate": LR,
            "optim": "sgd",
            "lr_scheduler_type": "linear",
            "weight_decay": 0.0,
            "max_grad_norm": CLIP,
            "use_cpu": True,
            "report_to": [],
            "save_strategy": "steps",
            "save_steps": 2,
            "logging_steps": 1,
            "seed": 0,
            "dataloader_num_workers": 0,
            "disable_tqdm": True,
            **args,
        }
    )
    trainer = Recording(
        model=make_model() if model is None else model,
        args=arguments,
        train_dataset=Rows(),
        perturbation=cls,
        perturbation_kwargs=kwargs,
    )
    trainer.seen = []
    if scaler is not None:  # on the CPU the Trainer's Accelerator makes none; prepare() hands this one on
        trainer.accelerator.scaler = scaler
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def reference(
    kind: str,
    micro_batches: list[dict],
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> TinyClassifier:
    """advreg's own loop on the Trainer's micro-batches: step(closure) per ACCUMULATE of them, the final gradient
    clipped to max_grad_norm before the base step, the Trainer's "linear" schedule (no warmup) stepped each update."""
    model, (cls, kwargs) = make_model(), S.KINDS[kind]
    model.train()
    opt = S.reference_optimizer(model, cls, clip=CLIP, lr=LR, grad_scaler=scaler, **kwargs)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, (STEPS - t) / STEPS))
    S.step_closure_loop(
        opt,
        model,
        S.windows(micro_batches, ACCUMULATE),
        scaler=scaler,
        after_update=schedule.step,
        loss_of=lambda model, batch: model(**batch)["loss"],
        autocast=autocast,
    )
    return model


@pytest.mark.parametrize("kind", sorted(S.KINDS))
def test_trainer_matches_the_step_closure_loop_with_accumulation(kind, tmp_path):
    trainer = train(kind, tmp_path)
    assert len(trainer.seen) == STEPS * ACCUMULATE and trainer.state.global_step == STEPS
    S.assert_same(trainer.model, reference(kind, trainer.seen))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and all(loss > 0 for loss in losses)  # the accumulated batch's loss at θ


def test_trainer_bf16_matches_the_autocast_loop(tmp_path):
    trainer = train("sam", tmp_path, bf16=True)
    S.assert_same(trainer.model, reference("sam", trainer.seen, autocast=torch.bfloat16), rtol=1e-4, atol=1e-5)


def test_trainer_grad_scaler_path_matches_the_scaled_loop(tmp_path):
    """fp16's scaler path: on the CPU the Trainer's Accelerator makes no scaler, so the test gives it a real one."""
    trainer = train("amp", tmp_path, fp16=True, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    expected = reference("amp", trainer.seen, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    S.assert_same(trainer.model, expected, rtol=1e-5, atol=1e-6)
    assert trainer.accelerator.scaler.get_scale() == 2.0**10  # one update a step, none overflowed


def test_trainer_overflow_skips_the_step_and_the_schedule(tmp_path):
    """A loss of ~1e30 is finite, scaled by 2^40 it is not: the step is skipped (θ as it was), the scale halves."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    trainer = train("sam", tmp_path, fp16=True, max_steps=1, scaler=scaler, model=make_model(loss_factor=1e30))
    # θ restored, no base step (the clean pass's BN statistics count, so the parameters only)
    S.assert_same(list(trainer.model.parameters()), list(make_model(loss_factor=1e30).parameters()), rtol=0, atol=0)
    assert scaler.get_scale() == 2.0**39  # one update, which saw the overflow
    assert trainer.lr_scheduler.last_epoch == 0  # the Trainer skipped its scheduler step


def test_trainer_checkpoint_resumes_exactly(tmp_path):
    momentum = {"optim_args": "momentum=0.9"}  # so that the optimizer's state matters
    straight = train("amp", tmp_path / "a", **momentum)  # saves checkpoint-2 (weights, optimizer, schedule, RNG)
    resumed = train("amp", tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-2"), **momentum)
    assert resumed.perturbed.state  # the momentum buffers came back from the checkpoint
    S.assert_same(straight.model, resumed.model, rtol=0, atol=0)


def test_trainer_refuses_a_ready_made_optimizer(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="optimizers="):
        PerturbedTrainer(
            model=model,
            args=transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
            perturbation=advreg.SAM,
        )
