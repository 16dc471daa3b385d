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
- ``model=self``: the normalization layers' running statistics move as after the clean pass only;
- ``accumulate_grad_batches=k``: Δ from the gradient of the whole accumulated batch. The k batches are kept
  (``on_train_batch_start``), each pass of the step replays them (Lightning's own backward of the first k-1 is skipped,
  since the step discards it, and the running statistics that their forward moved are put back), so the step is
  ``step(closure)`` on the accumulated batch.

A subclass that overrides ``backward``, ``optimizer_step``, ``configure_gradient_clipping``, ``on_train_batch_start``
or the checkpoint hooks calls ``super()``. One optimizer per module.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

from advreg.integrations import clip_before_base_step
from advreg.perturb.engine import PerturbedOptimizer

SCALER_KEY = "advreg_grad_scaler"  # the grad scaler's state in a Lightning checkpoint


class PerturbedModule(pl.LightningModule):
    """A ``LightningModule`` whose optimizer may be an advreg optimizer built by ``perturbed_optimizer``.

    ``training_step`` runs once per pass (N+1 times a step for AMP with N inner steps, twice for SAM; times k under
    gradient accumulation): a value logged with ``self.log(..., on_step=True)`` is the last pass's, at θ+Δ, and the
    step's output loss is the last pass's too. ``on_before_optimizer_step`` runs after every pass.
    """

    _advreg_scaler: torch.amp.GradScaler | None = None
    _advreg_accumulate = False  # accumulate_grad_batches > 1 with an advreg optimizer: replay the kept batches
    _advreg_stepping = False  # inside optimizer_step: every backward counts

    def perturbed_optimizer(
        self, kind: type[PerturbedOptimizer], base_optimizer: type, params: Any = None, **kwargs: Any
    ) -> PerturbedOptimizer:
        """``kind(params, base_optimizer, **kwargs)`` wired to this trainer: ``model=self``, the DDP model's
        ``no_sync`` under ``strategy="ddp"``, the precision plugin's grad scaler under ``"16-mixed"``, and
        ``gradient_clip_val`` on the final gradient. Call it in ``configure_optimizers``; ``params`` defaults to
        ``self.parameters()``."""
        trainer = self.trainer
        self._advreg_accumulate, self._advreg_window = trainer.accumulate_grad_batches > 1, []
        optimizer = kind(
            self.parameters() if params is None else params,
            base_optimizer,
            model=self,
            grad_scaler=self._take_scaler(),
            no_sync=_no_sync(trainer.strategy.model),
            **kwargs,
        )
        clip_before_base_step(
            optimizer,
            lambda: self.clip_gradients(optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm),
        )
        return optimizer

    def _take_scaler(self) -> torch.amp.GradScaler | None:
        """The precision plugin's grad scaler, now driven by the optimizer (the plugin keeps autocast only)."""
        plugin = self.trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None:
            plugin.scaler = None  # Lightning's scaler path would call the closure once and step without it
            self._advreg_scaler = scaler
        return self._advreg_scaler

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Under gradient accumulation, keep the batch: each pass of the step replays the accumulated batches."""
        if self._advreg_accumulate:
            if not self._advreg_window:  # the statistics as the replay's clean pass must find them
                self._advreg_stats = [b.clone() for b in _norm_buffers(self)]
            self._advreg_window.append((batch, batch_idx))

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward, of the scaled loss when the optimizer drives a grad scaler; skipped for a batch that
        Lightning accumulates, whose gradient the step would discard (it replays the batch)."""
        if self._advreg_accumulate and not self._advreg_stepping:
            return
        if self._advreg_scaler is not None:
            loss = self._advreg_scaler.scale(loss)
        super().backward(loss, *args, **kwargs)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        """Lightning's step (``optimizer.step(closure)``, the closure replaying the accumulated batches first), then
        the grad scaler's ``update``."""
        if self._advreg_accumulate:  # the last kept batch is this one, which Lightning's closure runs
            window, self._advreg_window = self._advreg_window[:-1], []
            with torch.no_grad():  # undo what Lightning's forwards of the kept batches did to the statistics
                torch._foreach_copy_(_norm_buffers(self), self._advreg_stats)
            optimizer_closure = self._replaying(window, optimizer, optimizer_closure)
        self._advreg_stepping = True
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            self._advreg_stepping = False
        if self._advreg_scaler is not None:
            self._advreg_scaler.update()

    def _replaying(
        self, window: list[tuple[Any, int]], optimizer: Any, closure: Callable[[], Any]
    ) -> Callable[[], Any]:
        """A closure over the whole accumulated batch: clear the gradients, forward and backward each kept batch
        (its loss divided by k, as Lightning divides it; under DDP without the all-reduce), then Lightning's closure
        on the last batch (whose backward all-reduces the sum)."""
        strategy, k = self.trainer.strategy, self.trainer.accumulate_grad_batches
        no_sync = _no_sync(strategy.model) or nullcontext

        def replay() -> Any:
            optimizer.zero_grad()
            total = 0.0
            with no_sync():
                for batch, batch_idx in window:
                    output = strategy.training_step(batch, batch_idx)
                    loss = (output["loss"] if isinstance(output, Mapping) else output) / k
                    strategy.backward(loss, optimizer)
                    total = total + loss.detach()
            last = closure()
            return total + last if last is not None else last

        return replay

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: Any = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
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
                raise ValueError(
                    "this checkpoint holds a grad scaler's state (it was trained with "
                    "precision='16-mixed'): resume it with the same precision"
                )
            scaler.load_state_dict(checkpoint[SCALER_KEY])


def _norm_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """The running statistics of ``module``'s normalization layers (the buffers a forward in train mode moves)."""
    layers = [m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    return [b for m in layers for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


def _no_sync(model: torch.nn.Module | None) -> Callable[[], Any] | None:
    """The DDP model's ``no_sync`` (None when the strategy does not wrap the model in DDP)."""
    return model.no_sync if isinstance(model, DistributedDataParallel) else None
