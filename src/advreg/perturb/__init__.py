"""Weight-space perturbations: at which weights the gradient of a step is taken."""

import torch

from advreg.perturb.amp import AMP
from advreg.perturb.awp import AWP, RWP
from advreg.perturb.engine import NonFiniteLossError, PerturbedOptimizer, StepPlan
from advreg.perturb.rmp import RMP
from advreg.perturb.sam import SAM
from advreg.registry import Member, register

register(
    Member("perturbation", "none", lambda c, params, steps_per_epoch, sgd, engine: torch.optim.SGD(params, **sgd))
)  # plain SGD: no engine

__all__ = ["AMP", "AWP", "RMP", "RWP", "SAM", "NonFiniteLossError", "PerturbedOptimizer", "StepPlan"]
