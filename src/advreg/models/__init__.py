"""Every network of the papers, by name: ``advreg.models.build("mlp", 10, input_shape=(40,))``,
``advreg.models.build("preact_resnet18", 10)`` (image networks default to 32x32 RGB)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from advreg.models.mlp import MLP, build_mlp
from advreg.models.vision import VISION_MODELS, build_vision, normalized

MODELS = ("mlp", *VISION_MODELS)
NORMS = ("batch", "group")
IMAGE_SHAPE = (3, 32, 32)  # the image networks' input when none is given: CIFAR's 32x32 RGB


def build(
    name: str,
    num_classes: int,
    *,
    input_shape: tuple[int, ...] | None = None,
    hidden: tuple[int, ...] = (100, 100),
    dropout: float = 0.0,
    dropout_layers: str = "all",
    norm: str = "batch",
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    **options: Any,
) -> nn.Module:
    """Build network ``name`` for ``num_classes`` classes and samples of shape ``input_shape``.

    ``input_shape`` is (C, H, W) for the image networks, (3, 32, 32) if None; the MLP needs its feature shape.

    The MLP uses ``hidden`` and ``dropout_layers`` and ignores ``norm``; the image networks ignore those two,
    take ``dropout`` as their dropout rate and ``norm`` ("batch" or "group") as their normalization layer.
    ``mean``/``std`` (per channel, or one value) put a fixed ``(x - mean) / std`` before the network.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    check_options(hidden, dropout, dropout_layers, norm)
    input_shape = _input_shape(name, input_shape)
    if name == "mlp":
        model = build_mlp(
            num_classes, input_shape, hidden=tuple(hidden), dropout=dropout, dropout_layers=dropout_layers, **options
        )
    else:
        model = build_vision(name, num_classes, input_shape, dropout=dropout, norm=norm, **options)
    return normalized(model, mean, std, input_shape)


def check_options(
    hidden: Sequence[int] = (100, 100), dropout: float = 0.0, dropout_layers: str = "all", norm: str = "batch"
) -> None:
    """Raise ValueError on an option that no network can be built with (what :func:`build` checks first)."""
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r} (the AMP paper uses 0.1)")
    if dropout_layers not in ("all", "last"):
        raise ValueError(
            f"dropout_layers must be 'all' (after each ReLU, AMP paper) or 'last' (the penultimate "
            f"layer, ALPS paper), got {dropout_layers!r}"
        )
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden layer widths must be >= 1, got {tuple(hidden)}")
    if norm not in NORMS:
        raise ValueError(
            f"norm must be 'batch' (BatchNorm) or 'group' (GroupNorm, 32 channels per group, AMM paper), got {norm!r}"
        )


def _input_shape(name: str, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(input_shape)
    if name == "mlp":
        raise ValueError(
            "model 'mlp' takes flat feature vectors of no default size: pass input_shape, "
            "e.g. input_shape=(40,) for MNIST-1D"
        )
    return IMAGE_SHAPE


__all__ = ["IMAGE_SHAPE", "MLP", "MODELS", "NORMS", "build", "check_options"]
