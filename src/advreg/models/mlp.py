"""A multilayer perceptron: the network of the MNIST-1D and digits experiments.

Flatten, then Linear-ReLU(-Dropout) blocks and a linear classifier; dropout after each ReLU as in the AMP paper (Sec.
5.1),
or on the penultimate layer only (``dropout_layers="last"``) as in the ALPS paper (Sec. 5.1).
"""

from __future__ import annotations

import math

from torch import Tensor, nn


class MLP(nn.Module):
    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: tuple[int, ...] = (100, 100),
        dropout: float = 0.0,
        dropout_layers: str = "all",
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for i, size in enumerate(hidden):
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0 and (dropout_layers == "all" or i == len(hidden) - 1):
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, K) logits


def build_mlp(
    num_classes: int,
    input_shape: tuple[int, ...],
    hidden: tuple[int, ...] = (100, 100),
    dropout: float = 0.0,
    dropout_layers: str = "all",
) -> MLP:
    return MLP(math.prod(input_shape), num_classes, tuple(hidden), dropout, dropout_layers)
