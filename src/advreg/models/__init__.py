"""Every network of the papers, by name: ``advreg.models.build("mlp", 10, input_shape=(40,))``."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from advreg.models.mlp import MLP, build_mlp
from advreg.models.vision import VISION_MODELS, build_vision, normalized

MODELS = ("mlp", *VISION_MODELS)
NORMS = ("batch", "group")


def build(name: str, num_classes: int, *, input_shape: tuple[int, ...], hidden: tuple[int, ...] = (100, 100),
          dropout: float = 0.0, dropout_layers: str = "all", norm: str = "batch",
          mean: Sequence[float] | float | None = None, std: Sequence[float] | float | None = None,
          **options: Any) -> nn.Module:
    """Build network ``name`` for ``num_classes`` classes and samples of shape ``input_shape``.

    The MLP uses ``hidden`` and ``dropout_layers`` and ignores ``norm``; the image networks ignore those two,
    take ``dropout`` as their dropout rate and ``norm`` ("batch" or "group") as their normalization layer.
    ``mean``/``std`` (per channel, or one value) put a fixed ``(x - mean) / std`` before the network.
    """
    if name not in MODELS:
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
    if norm not in NORMS:
        raise ValueError(f"norm must be 'batch' (BatchNorm) or 'group' (GroupNorm, 32 channels per group, "
                         f"AMM paper), got {norm!r}")
    if name == "mlp":
        model = build_mlp(num_classes, tuple(input_shape), hidden=tuple(hidden), dropout=dropout,
                          dropout_layers=dropout_layers, **options)
    else:
        model = build_vision(name, num_classes, tuple(input_shape), dropout=dropout, norm=norm, **options)
    return normalized(model, mean, std, tuple(input_shape))


__all__ = ["MLP", "MODELS", "NORMS", "build"]
