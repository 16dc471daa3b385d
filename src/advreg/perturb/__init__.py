"""Weight-space perturbations: at which weights the gradient of a step is taken."""
from advreg.perturb.amp import AMP
from advreg.perturb.rmp import RMP
from advreg.perturb.engine import NonFiniteLossError, PerturbedOptimizer
from advreg.perturb.sam import SAM

__all__ = ["AMP", "RMP", "SAM", "NonFiniteLossError", "PerturbedOptimizer"]
