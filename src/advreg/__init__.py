"""advreg: regularize neural networks by adversarial perturbation.

Weight space: :class:`AMP` (adversarial model perturbation) with its random baseline :class:`RMP`, :class:`SAM`
and :class:`AWP` (adversarial weight perturbation) with its random baseline :class:`RWP`, drop-in ``torch.optim``
optimizers built on one engine (:mod:`advreg.perturb`); :class:`Step`, one training step of the three stages, and
:class:`Batch`, what the batch transform hands the loss.

The names below load on first use, so that ``import advreg.cli`` can install its Ctrl-C handler before torch loads.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what static readers (type checkers, the API docs) see; at run time, __getattr__ below
    from advreg.batch import Batch
    from advreg.perturb import AMP, AWP, RMP, RWP, SAM, PerturbedOptimizer
    from advreg.step import Step, StepOutput
    from advreg.transforms.alps import alps_label

__version__ = "0.1.0"
__all__ = [
    "AMP",
    "AWP",
    "Batch",
    "RMP",
    "RWP",
    "SAM",
    "PerturbedOptimizer",
    "Step",
    "StepOutput",
    "__version__",
    "alps_label",
]
_HOMES = {
    **{name: "advreg.perturb" for name in ("AMP", "AWP", "RMP", "RWP", "SAM", "PerturbedOptimizer")},
    "Batch": "advreg.batch",
    "Step": "advreg.step",
    "StepOutput": "advreg.step",
    "alps_label": "advreg.transforms.alps",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    try:  # advreg.perturb and the other subpackages, as they were once ``import advreg`` had loaded them
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":  # the submodule exists and lacks a dependency: say that
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
