"""The named methods of the papers as presets of the three stages of a step (DESIGN §1).

batch transform → loss → weight perturbation; a preset names one member of each, plus model options.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from advreg.config import TrainConfig
from advreg.perturb import AMP, SAM


@dataclass(frozen=True)
class Method:
    name: str
    perturbation: str  # "none" | "amp" | "sam"
    passes: str  # forward/backward passes per step, in words
    paper: str
    transform: str = "identity"
    loss: str = "cross_entropy"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("erm", "none", "1", "empirical risk minimization (AMP paper, Sec. 5)"),
    Method("amp", "amp", "N+1", "Zheng et al., CVPR 2021, Algorithm 1"),
    Method("sam", "sam", "2", "Foret et al., ICLR 2021"),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def build_optimizer(config: TrainConfig, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer of ``config.method``: SGD, or SGD wrapped by the method's weight perturbation."""
    o = config.optim
    sgd = dict(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
    perturbation = get_method(config.method).perturbation
    if perturbation == "amp":
        a = config.amp
        return AMP(params, torch.optim.SGD, epsilon=a.epsilon, inner_lr=a.inner_lr, inner_steps=a.inner_steps,
                   norm=a.norm, **sgd)
    if perturbation == "sam":
        return SAM(params, torch.optim.SGD, rho=config.sam.rho, adaptive=config.sam.adaptive, **sgd)
    return torch.optim.SGD(params, **sgd)
