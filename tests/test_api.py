"""The top-level package: every optimizer of :mod:`advreg.perturb` is importable as ``advreg.<Name>``."""

import inspect

import advreg
from advreg import perturb


def test_every_perturbed_optimizer_is_exported_at_the_top_level():
    exported = {name: getattr(perturb, name) for name in perturb.__all__}
    optimizers = {
        name for name, obj in exported.items() if inspect.isclass(obj) and issubclass(obj, perturb.PerturbedOptimizer)
    }
    assert {"AMP", "AWP", "RMP", "RWP", "SAM"} <= optimizers
    for name in optimizers:
        assert getattr(advreg, name) is getattr(perturb, name) and name in advreg.__all__
