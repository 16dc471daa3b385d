"""Every network of the papers, by name: ``advreg.models.build("mlp", 10, input_shape=(40,))``."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from advreg.models.mlp import MLP, build_mlp

_BUILDERS: dict[str, Callable[..., nn.Module]] = {"mlp": build_mlp}
MODELS = tuple(_BUILDERS)


def build(name: str, num_classes: int, *, input_shape: tuple[int, ...], hidden: tuple[int, ...] = (100, 100),
          dropout: float = 0.0, dropout_layers: str = "all", **options: Any) -> nn.Module:
    """Build network ``name`` for ``num_classes`` classes and samples of shape ``input_shape``."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r} (the AMP paper uses 0.1)")
    if dropout_layers not in ("all", "last"):
        raise ValueError(f"dropout_layers must be 'all' (after each ReLU, AMP paper) or 'last' (the penultimate "
                         f"layer, ALPS paper), got {dropout_layers!r}")
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden layer widths must be >= 1, got {tuple(hidden)}")
    return _BUILDERS[name](num_classes, tuple(input_shape), hidden=tuple(hidden), dropout=dropout,
                           dropout_layers=dropout_layers, **options)


__all__ = ["MLP", "MODELS", "build"]
