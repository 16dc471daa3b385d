"""advreg's optimizers in PyTorch Lightning's automatic optimization (``pip install "advreg[lightning]"``).

Subclass ``PerturbedModule`` instead of ``lightning.LightningModule`` and build the optimizer in
``configure_optimizers`` with ``self.perturbed_optimizer(advreg.SAM, torch.optim.SGD, rho=0.05, lr=0.1)``. Lightning
then calls ``optimizer.step(closure)`` with its own closure (``training_step``, ``zero_grad``, ``backward``), which
the optimizer runs once per pass. The glue that this needs:

- ``precision="16-mixed"``: Lightning's scaler path runs the closure once and steps without it, so the optimizer takes
  over the precision plugin's ``GradScaler`` (``backward`` scales each pass, the optimizer unscales each pass and skips
  the step on an overflow, ``optimizer_step`` calls ``update``; its state is saved in the checkpoint);
- ``strategy="ddp"``: the optimizer gets the DDP model's ``no_sync``, so the passes that build Δ are not all-reduced;
- ``gradient_clip_val``: applied once a step, to the gradient at θ+Δ that the base step takes (never to the ascent
  gradients), after the unscale;
- ``model=self``: the normalization layers' running statistics move as after the clean pass only.
"""
from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel

from advreg.integrations import clip_before_base_step
from advreg.perturb.engine import PerturbedOptimizer

SCALER_KEY = "advreg_grad_scaler"  # the grad scaler's state in a Lightning checkpoint


class PerturbedModule(pl.LightningModule):
    """A ``LightningModule`` whose optimizer may be an advreg optimizer built by ``perturbed_optimizer``.

    ``training_step`` runs once per pass (N+1 times a step for AMP with N inner steps, twice for SAM): a value logged
    with ``self.log(..., on_step=True)`` is the last pass's, at θ+Δ, and the step's output loss is the last pass's
    too. ``on_before_optimizer_step`` runs after every pass. Gradient accumulation is refused (``ValueError``):
    Lightning's accumulated gradient would add each pass's gradient to the earlier micro-batches'.
    """

    _advreg_scaler: torch.amp.GradScaler | None = None

    def perturbed_optimizer(self, kind: type[PerturbedOptimizer], base_optimizer: type, params: Any = None,
                            **kwargs: Any) -> PerturbedOptimizer:
        """``kind(params, base_optimizer, **kwargs)`` wired to this trainer: ``model=self``, the DDP model's
        ``no_sync`` under ``strategy="ddp"``, the precision plugin's grad scaler under ``"16-mixed"``, and
        ``gradient_clip_val`` on the final gradient. Call it in ``configure_optimizers``; ``params`` defaults to
        ``self.parameters()``."""
        trainer = self.trainer
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("accumulate_grad_batches > 1 cannot be combined with an advreg optimizer in Lightning: "
                             "use a larger batch size (Δ is then taken on the whole batch)")
        optimizer = kind(self.parameters() if params is None else params, base_optimizer, model=self,
                         grad_scaler=self._take_scaler(), no_sync=_no_sync(trainer.strategy.model), **kwargs)
        clip_before_base_step(optimizer, lambda: self.clip_gradients(
            optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm))
        return optimizer

    def _take_scaler(self) -> torch.amp.GradScaler | None:
        """The precision plugin's grad scaler, now driven by the optimizer (the plugin keeps autocast only)."""
        plugin = self.trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None:
            plugin.scaler = None  # Lightning's scaler path would call the closure once and step without it
            self._advreg_scaler = scaler
        return self._advreg_scaler

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward, of the scaled loss when the optimizer drives a grad scaler."""
        if self._advreg_scaler is not None:
            loss = self._advreg_scaler.scale(loss)
        super().backward(loss, *args, **kwargs)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Callable[[], Any] | None = None) -> None:
        """Lightning's step (``optimizer.step(closure)``), then the grad scaler's ``update``."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._advreg_scaler is not None:
            self._advreg_scaler.update()

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning clips after every pass; an advreg optimizer's gradient is clipped once, before its base step."""
        if not isinstance(optimizer, PerturbedOptimizer):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the grad scaler's state, which the precision plugin no longer holds."""
        if self._advreg_scaler is not None:
            checkpoint[SCALER_KEY] = self._advreg_scaler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the grad scaler's state (it runs before ``configure_optimizers``, while the plugin holds it)."""
        if SCALER_KEY in checkpoint:
            scaler = self._advreg_scaler or getattr(self.trainer.precision_plugin, "scaler", None)
            if scaler is None:
                raise ValueError("this checkpoint holds a grad scaler's state (it was trained with "
                                 "precision='16-mixed'): resume it with the same precision")
            scaler.load_state_dict(checkpoint[SCALER_KEY])


def _no_sync(model: torch.nn.Module | None) -> Callable[[], Any] | None:
    """The DDP model's ``no_sync`` (None when the strategy does not wrap the model in DDP)."""
    return model.no_sync if isinstance(model, DistributedDataParallel) else None
