"""advreg: regularize neural networks by adversarial perturbation.

Weight space: :class:`AMP` (adversarial model perturbation) with its random baseline :class:`RMP`, :class:`SAM`
and :class:`AWP` (adversarial weight perturbation) with its random baseline :class:`RWP`, drop-in ``torch.optim``
optimizers built on one engine (:mod:`advreg.perturb`).
"""
from advreg.perturb import AMP, AWP, RMP, RWP, SAM, PerturbedOptimizer
from advreg.transforms.alps import alps_label

__version__ = "0.1.0"
__all__ = ["AMP", "AWP", "RMP", "RWP", "SAM", "PerturbedOptimizer", "__version__", "alps_label"]
