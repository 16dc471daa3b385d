"""The loss stage: the objective on a transformed batch.

A loss stage is called as ``stage(model, batch)`` on the transform's :class:`~advreg.batch.Batch` and returns
``(loss, logits)``, the logits being the model's outputs on ``batch.inputs`` (on ``batch.clean`` for a pair): most
objectives only need those logits (:class:`OnLogits`), TRADES and MART need the clean and the adversarial logits
(:class:`OnPair`), and AMM runs the model again (DeepFool) inside its regularizer.
"""

from __future__ import annotations

from advreg.losses.amm import AMMLoss
from advreg.losses.ce import cross_entropy
from advreg.losses.flooding import flood
from advreg.losses.mart import mart_loss
from advreg.losses.stage import LossFn, LossStage, OnLogits, OnPair, PairLossFn, make_loss
from advreg.losses.trades import trades_loss
from advreg.registry import Member, members, register

register(Member("loss", "ce", lambda c, ce, loss_config: OnLogits(ce)))  # loss.smoothing and loss.flooding
LOSSES = tuple(members("loss"))  # every declared loss's name

__all__ = [
    "AMMLoss",
    "LOSSES",
    "LossFn",
    "LossStage",
    "OnLogits",
    "OnPair",
    "PairLossFn",
    "cross_entropy",
    "flood",
    "make_loss",
    "mart_loss",
    "trades_loss",
]
