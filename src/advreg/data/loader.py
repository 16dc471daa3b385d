"""TensorLoader: mini-batches over in-memory tensors, a light stand-in for torch's DataLoader.

Shuffles with ``torch.randperm`` on a caller's generator, so a saved generator state resumes the epoch order.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


class TensorLoader:
    """Iterable of ``(x, y)`` batches of ``batch_size`` rows; one pass over it is one epoch.

    With ``shuffle=True`` each ``iter()`` draws a fresh permutation from ``generator`` (a CPU
    ``torch.Generator``; the global RNG if None), so saving ``generator.get_state()`` between epochs and
    restoring it on resume gives the same order. Without shuffling the batches are views (no copy).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}; pass e.g. 128")
        if len(x) != len(y):
            raise ValueError(
                f"x and y must have the same number of rows, got {len(x)} and {len(y)}; "
                "pass inputs and labels of the same samples"
            )
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.generator, self.drop_last = shuffle, generator, drop_last

    def __len__(self) -> int:
        n, b = len(self.x), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # the permutation is drawn here, not at the first next(): the generator state after iter() is final
        order = torch.randperm(len(self.x), generator=self.generator) if self.shuffle else None
        return self._batches(order)

    def _batches(self, order: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            if order is None:
                yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
            else:
                idx = order[start : start + self.batch_size].to(self.x.device)
                yield self.x[idx], self.y[idx.to(self.y.device)]
