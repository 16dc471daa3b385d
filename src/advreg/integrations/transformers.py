"""advreg's optimizers in the Hugging Face Transformers ``Trainer`` (``pip install "advreg[transformers]"``).

``PerturbedTrainer(model=..., args=..., train_dataset=..., perturbation=advreg.SAM, perturbation_kwargs={"rho": 0.05})``
trains with the optimizer the ``TrainingArguments`` choose (``optim``, ``learning_rate``, ``weight_decay`` and its
parameter groups) wrapped in the perturbation, and with the Trainer's own schedule, gradient accumulation,
``fp16``/``bf16`` flags, ``max_grad_norm`` and checkpoints. What each option means for the perturbation:

- gradient accumulation: Δ comes from the gradient of the whole accumulated batch (the k micro-batches the Trainer
  fetched for one update), and the gradient at θ+Δ is taken on all of them too. The micro-batches are kept until
  the last one, then each pass of the step runs over all k (forward and ``accelerator.backward``, the loss divided as
  the Trainer divides it); so the step is the optimizer's ``step(closure)`` on the accumulated batch.
- ``max_grad_norm``: clips the gradient at θ+Δ that the base step applies, never the gradients that build Δ.
- ``fp16``: the Trainer's grad scaler goes to the optimizer, which unscales each pass and skips an overflowed step
  (the Trainer then skips the scheduler's step too); ``bf16`` is autocast only.
- BatchNorm: ``model=`` is the Trainer's model, so running statistics move as after the clean pass only.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from advreg.integrations import clip_before_base_step, clip_grad_norm
from advreg.perturb.engine import PerturbedOptimizer


class PerturbedTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose optimizer is ``perturbation`` (advreg.AMP, advreg.SAM, advreg.AWP, ...) with
    ``perturbation_kwargs``, around the base optimizer that ``args`` select; all other arguments are the Trainer's.

    The logged training loss is the loss at θ, as without a perturbation. The logged ``grad_norm`` is the norm of the
    gradient at θ+Δ as the base step took it (clipped). Under ``fp16`` on a GPU, Accelerate's ``clip_grad_norm_``
    unscales that (already unscaled) gradient once more before measuring it, so the logged value reads too small by
    the scale (not tested: on the CPU Accelerate does not unscale). ``perturbed`` is the advreg optimizer.
    """

    def __init__(
        self,
        *args: Any,
        perturbation: type[PerturbedOptimizer],
        perturbation_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if not (isinstance(perturbation, type) and issubclass(perturbation, PerturbedOptimizer)):
            raise ValueError(f"perturbation must be an advreg optimizer class such as advreg.SAM, got {perturbation!r}")
        if kwargs.get("optimizers", (None, None))[0] is not None or kwargs.get("optimizer_cls_and_kwargs"):
            raise ValueError(
                "PerturbedTrainer builds its optimizer from the TrainingArguments (optim, learning_rate, "
                "weight_decay): leave out optimizers= and optimizer_cls_and_kwargs="
            )
        super().__init__(*args, **kwargs)
        self.perturbation, self.perturbation_kwargs = perturbation, dict(perturbation_kwargs or {})
        self.perturbed: PerturbedOptimizer | None = None
        self._window: list[tuple[dict[str, Any], Any]] = []  # the micro-batches of the update being accumulated

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (class, settings and parameter groups) wrapped in the perturbation."""
        if self.optimizer is None:
            base = super().create_optimizer(model)
            self.perturbed = self.perturbation(
                [dict(g) for g in base.param_groups],
                type(base),
                model=self.model,
                grad_scaler=self.accelerator.scaler,
                **self.perturbation_kwargs,
            )
            if self.args.max_grad_norm and self.args.max_grad_norm > 0:
                clip_before_base_step(self.perturbed, clip_grad_norm(self.perturbed, self.args.max_grad_norm))
            self.optimizer = _TakenStep(self.perturbed)
        return self.optimizer

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Keep the micro-batch; at the last one of an update, take the perturbed step on all of them. Returns the
        loss to log (0 for a kept micro-batch, the accumulated batch's loss at θ at the last)."""
        self._window.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        trainer_step = super().training_step

        def closure() -> torch.Tensor:
            self.perturbed.zero_grad()
            return sum(trainer_step(model, dict(batch), items) for batch, items in window)

        loss = self.perturbed.step(closure)
        return loss.detach()


class _TakenStep(torch.optim.Optimizer):
    """What the Trainer (and its scheduler, its accelerator) see as the optimizer: the perturbed optimizer's param
    groups and state, and a ``step`` that does nothing, since ``training_step`` took the step already."""

    def __init__(self, perturbed: PerturbedOptimizer):
        super().__init__([{"params": [p for g in perturbed.param_groups for p in g["params"]]}], {})
        self.perturbed = perturbed
        self._share()

    def _share(self) -> None:
        self.param_groups, self.state, self.defaults = (
            self.perturbed.param_groups,
            self.perturbed.state,
            self.perturbed.defaults,
        )

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Nothing: the perturbed step was taken at the update's last micro-batch."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.perturbed.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.perturbed.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.perturbed.load_state_dict(state_dict)
        self._share()  # loading replaced the base optimizer's containers
