"""Weight-space perturbations: at which weights the gradient of a step is taken."""
from advreg.perturb.amp import AMP
from advreg.perturb.awp import AWP, RWP
from advreg.perturb.rmp import RMP
from advreg.perturb.engine import NonFiniteLossError, PerturbedOptimizer
from advreg.perturb.sam import SAM

__all__ = ["AMP", "AWP", "RMP", "RWP", "SAM", "NonFiniteLossError", "PerturbedOptimizer"]
