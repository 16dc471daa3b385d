"""AMM, adversarial margin maximization (Yan, Guo & Zhang; Deep Defense, NeurIPS 2018): CE + λ·L_DD.

L_DD (Eq. 6) = (1/n)·[Σ_{k∈T} R(-c‖Δx_k‖) + Σ_{k∈F} R(d‖Δx_k‖)], with Δx_k the DeepFool perturbation of sample k
(at most u = 6 steps), T the correctly classified samples of the batch and F the others, whose DeepFool goes toward
their label (Sec. 3.1.2). Δx is differentiated through ∇f (high-order gradients, the default: the exact derivative,
x + r is not detached inside ∇f as in the authors' code) or with ∇f held constant (the ablation of Sec. 4.3.1).
DeepFool here is the paper's, unclipped (no input box). A correct sample considers the ``candidates`` classes with
the largest logits at x (0: all K; the authors' ``df_num_label`` is 10), a misclassified one its current prediction
and its label: two copies.

- Aggregation (Sec. 3.3.1): AVG keeps every sample; MIN keeps a correct sample only if its norm is the smallest
  among the correct samples of its class in the batch and among the batch's 20% smallest, and, by the same rule
  mirrored, a misclassified sample only if its norm is the largest of its class and among the 20% largest (the
  authors' code). MIN recomputes DeepFool with a graph for the kept samples only, so memory grows with them.
- Shrinkage (Sec. 3.3.2): LIN R(t) = t, EXP R(t) = exp(t), INV R(t) = 1/(1-t). For EXP and INV a misclassified
  sample's norm is truncated at the threshold where λ·R(d‖Δx‖) reaches ``clip_value`` (INV then keeps t < 1), and
  a correct sample's term is capped there too (the authors use 50).
- As in the authors' code, samples whose DeepFool did not reach its goal in u steps are left out (their norm is no
  margin), and the sum is divided by the batch size.
- Inside the regularizer the model runs in eval mode (BatchNorm on its running statistics) with each dropout mask
  frozen to the one of the cross-entropy pass, so one sample's margin never depends on the others'.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from advreg.attacks import deepfool_with_source, sample_norms
from advreg.batch import Batch
from advreg.registry import Member, register

AGGREGATIONS = ("avg", "min")
SHRINKAGES = ("lin", "exp", "inv")


def shrink(t: Tensor, kind: str) -> Tensor:
    """The shrinkage R: LIN t, EXP exp(t), INV 1/(1 - t) (defined for t < 1)."""
    if kind == "lin":
        return t
    if kind == "exp":
        return t.exp()
    if kind == "inv":
        return 1.0 / (1.0 - t)
    raise ValueError(f"unknown shrinkage {kind!r}; choose one of: {', '.join(SHRINKAGES)}")


def truncation(lam: float, d: float, kind: str, clip_value: float) -> float:
    """The norm τ at which a misclassified sample's term λ·R(d·τ) reaches ``clip_value`` (inf for LIN)."""
    if kind == "lin":
        return math.inf
    if kind == "exp":
        return math.log(clip_value / lam) / d
    return (1.0 - lam / clip_value) / d  # INV: d·τ < 1


def margin_terms(
    norms: Tensor, correct: Tensor, lam: float, c: float, d: float, kind: str, clip_value: float
) -> Tensor:
    """Per-sample λ·R(-c‖Δx‖) (correct) or λ·R(d·min(‖Δx‖, τ)) (misclassified), as in Eq. 6."""
    tau = truncation(lam, d, kind, clip_value)
    wrong = norms.clamp(max=tau) if math.isfinite(tau) else norms
    terms = lam * torch.where(correct, shrink(-c * norms, kind), shrink(d * wrong, kind))
    return terms.clamp(max=clip_value) if kind != "lin" else terms


def select_min(
    norms: Tensor, labels: Tensor, correct: Tensor, usable: Tensor, batch_size: int, fraction: float = 0.2
) -> Tensor:
    """MIN aggregation (Sec. 3.3.1): which samples the regularizer keeps, a boolean mask (B,).

    A usable correct sample is kept iff (a) its norm is the smallest among the usable correct samples of its
    label and (b) it is among the ⌊fraction·batch_size⌋ (at least 1) smallest norms of the usable correct
    samples. Misclassified samples mirror it with largest. Ties go to the earlier sample.
    """
    top = max(1, int(fraction * batch_size))
    keep = torch.zeros_like(usable)
    for group, sign in ((correct & usable, 1.0), (~correct & usable, -1.0)):
        index = group.nonzero().squeeze(1)
        if index.numel() == 0:
            continue
        key = sign * norms[index]  # smaller key = closer to the aim of the group's selection
        order = torch.sort(key, stable=True).indices
        in_top = torch.zeros(len(index), dtype=torch.bool, device=norms.device)
        in_top[order[:top]] = True
        group_labels = labels[index]
        for label in group_labels.unique():
            members = (group_labels == label).nonzero().squeeze(1)
            best = members[torch.argmin(key[members])]  # argmin returns the first of equal values
            keep[index[best]] = bool(in_top[best])
    return keep


class FrozenDropout:
    """Within the context, each ``nn.Dropout`` draws its mask on the first forward (one per sample) and every
    later forward reuses it: for the batch, for a chosen subset of its samples (:meth:`select`), and for any rows
    of it, copies in any order (:meth:`forward`, as DeepFool's copies need). An input whose rows it cannot tell
    is an error. Only plain ``nn.Dropout`` (not in-place) is supported."""

    def __init__(self, model: nn.Module):
        self.dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        other = sorted({type(m).__name__ for m in self.dropouts if type(m) is not nn.Dropout or m.inplace})
        if other:
            raise ValueError(
                f"the AMM regularizer freezes nn.Dropout masks; the model has {', '.join(other)} "
                "(use nn.Dropout(p), not in-place)"
            )
        self.masks: dict[nn.Module, Tensor | None] = {}
        self.rows: Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> "FrozenDropout":
        self._handles = [m.register_forward_hook(self._hook) for m in self.dropouts]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def select(self, rows: Tensor | None) -> None:
        """Later forwards hold the samples ``rows`` of the first one (None: all of them)."""
        self.rows = rows

    def forward(self, model: nn.Module, inputs: Tensor, rows: Tensor) -> Tensor:
        """``model(inputs)`` where input row i holds sample ``rows[i]`` of the first forward, and its masks."""
        previous, self.rows = self.rows, rows
        try:
            return model(inputs)
        finally:
            self.rows = previous

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = args[0]
        if module not in self.masks:  # the first pass draws the masks
            if not module.training or module.p == 0:
                self.masks[module] = None
                return output
            p = module.p
            mask = torch.zeros_like(x) if p == 1 else torch.empty_like(x).bernoulli_(1 - p) / (1 - p)
            self.masks[module] = mask
            return x * mask
        mask = self.masks[module]
        if mask is None:
            return x
        if self.rows is not None:
            mask = mask[self.rows]
        if x.shape != mask.shape:
            raise RuntimeError(
                f"a frozen dropout mask of shape {tuple(mask.shape)} cannot serve an input of "
                f"shape {tuple(x.shape)}; pass the rows it holds through FrozenDropout.forward"
            )
        return x * mask


class AMMLoss:
    """The AMM loss stage: ``criterion(f(x), y) + λ·L_DD`` (Eq. 7 without the weight decay, which SGD applies).

    Called as ``loss_stage(model, batch)`` (:class:`~advreg.batch.Batch`, hard labels); returns the loss and the
    logits of the cross-entropy pass.
    Defaults are the paper's MIN+EXP setting (Appendix Table 1: λ = 32, c = 2, d = 1; u = 6).
    """

    def __init__(
        self,
        criterion: Any,
        lam: float = 32.0,
        c: float = 2.0,
        d: float = 1.0,
        aggregation: str = "min",
        shrinkage: str = "exp",
        steps: int = 6,
        overshoot: float = 0.02,
        high_order: bool = True,
        top_fraction: float = 0.2,
        clip_value: float = 50.0,
        candidates: int = 0,
    ):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose one of: {', '.join(AGGREGATIONS)}")
        if shrinkage not in SHRINKAGES:
            raise ValueError(f"unknown shrinkage {shrinkage!r}; choose one of: {', '.join(SHRINKAGES)}")
        if not (lam >= 0 and c > 0 and d > 0):
            raise ValueError(
                f"lam must be >= 0 and c, d > 0, got lam={lam!r}, c={c!r}, d={d!r} (the paper's MIN+EXP uses 32, 2, 1)"
            )
        if not (isinstance(steps, int) and steps >= 1) or overshoot < 0:
            raise ValueError(
                f"steps must be an integer >= 1 and overshoot >= 0, got {steps!r}, "
                f"{overshoot!r} (the paper uses u = 6 and 0.02)"
            )
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction!r} (the paper uses 0.2)")
        if not (isinstance(candidates, int) and (candidates == 0 or candidates >= 2)):
            raise ValueError(
                f"candidates must be 0 (all classes) or an integer >= 2, got {candidates!r} (the "
                "authors' code uses the top 10 classes at x)"
            )
        if shrinkage != "lin" and not clip_value > lam:
            raise ValueError(
                f"clip_value must exceed lam for {shrinkage.upper()} (it caps λ·R), got "
                f"clip_value={clip_value!r}, lam={lam!r}"
            )
        self.criterion = criterion
        self.lam, self.c, self.d = lam, c, d
        self.aggregation, self.shrinkage = aggregation, shrinkage
        self.steps, self.overshoot, self.high_order = steps, overshoot, high_order
        self.top_fraction, self.clip_value, self.candidates = top_fraction, clip_value, candidates

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        inputs, labels = batch.inputs, batch.target
        if labels.dim() != 1:
            raise ValueError(
                "the AMM loss needs hard labels (B,); a transform that makes soft targets (mixup, "
                "alps) cannot go with it"
            )
        with FrozenDropout(model) as frozen:
            logits = model(inputs)
            loss = self.criterion(logits, labels)
            if self.lam > 0:
                loss = loss + self.regularizer(model, inputs, labels, frozen)
        return loss, logits

    def regularizer(self, model: nn.Module, x: Tensor, labels: Tensor, frozen: FrozenDropout | None = None) -> Tensor:
        """λ·L_DD of the batch (Eq. 6), differentiable in the model's parameters."""
        frozen = frozen or FrozenDropout(model)
        rows = None
        if self.aggregation == "min":  # a graph-free pass picks the samples, the graph is built for those only
            r, success, source = self._deepfool(model, x, labels, frozen, None, create_graph=False)
            keep = select_min(sample_norms(r), labels, source == labels, success, len(x), self.top_fraction)
            rows = keep.nonzero().squeeze(1)
            if rows.numel() == 0:
                return x.new_zeros(())
        x_sub, y_sub = (x, labels) if rows is None else (x[rows], labels[rows])
        r, success, source = self._deepfool(model, x_sub, y_sub, frozen, rows, create_graph=True)
        kept = success.nonzero().squeeze(1)
        terms = margin_terms(
            sample_norms(r[kept]), (source == y_sub)[kept], self.lam, self.c, self.d, self.shrinkage, self.clip_value
        )
        return terms.sum() / len(x)

    def _deepfool(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        frozen: FrozenDropout,
        rows: Tensor | None,
        create_graph: bool,
    ) -> tuple[Tensor, ...]:
        """Unclipped DeepFool (the paper's Δx, no input box) of ``x``, the batch's ``rows`` (None: all of it)."""

        def forward(inputs: Tensor, sub: Tensor) -> Tensor:  # sub indexes x; the masks are the batch's
            return frozen.forward(model, inputs, sub if rows is None else rows[sub])

        return deepfool_with_source(
            model,
            x,
            self.steps,
            self.overshoot,
            create_graph=create_graph,
            labels=labels,
            high_order=self.high_order,
            candidates=self.candidates or None,
            forward=forward,
        )


@dataclass(frozen=True)
class AMMConfig:
    """AMM's margin term (Yan et al.); the defaults are the paper's MIN+EXP (Appendix Table 1), u = 6 (Sec. 4.2)."""

    lam: float = 32.0  # λ, the weight of L_DD
    c: float = 2.0  # scale of correctly classified samples' norms
    d: float = 1.0  # scale of misclassified samples' norms
    aggregation: str = "min"  # avg | min
    shrinkage: str = "exp"  # lin | exp | inv
    steps: int = 6  # u, DeepFool's maximal iterations
    overshoot: float = 0.02
    high_order: bool = True  # differentiate through ∇f; false is the ablation of Sec. 4.3.1
    top_fraction: float = 0.2  # MIN's second condition: among the batch's 20% smallest norms
    clip_value: float = 50.0  # cap of each sample's λ·R term, the truncation of EXP and INV (authors' code)
    candidates: int = 0  # DeepFool's classes: the top ones at x (the authors' code: 10); 0 is all K


register(
    Member(
        "loss",
        "amm",
        lambda c, ce, loss_config: AMMLoss(ce, **dataclasses.asdict(c)),  # the section's keys
        AMMConfig,
    )
)  # are AMMLoss's
