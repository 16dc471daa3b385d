"""scikit-learn's digits (UCI optical recognition of handwritten digits): 1797 8×8 images, 10 classes.

Bundled with scikit-learn (offline). Pixels /16 into [0, 1], flattened to 64 features. The train/test split
is FIXED, independent of the run seed: stratified 80/20 drawn with ``torch.Generator().manual_seed(0)``
(1438 train / 359 test); the run seed only picks the validation rows out of the 1438.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from advreg.data.splits import stratified_split, take

NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # part of the dataset's definition: changing it changes every reported test number


def load(cache_dir: object = None) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((x, y), (x_test, y_test))``: x float32 ``(N, 64)`` in [0, 1], y int64. ``cache_dir`` is unused."""
    train, test = _fixed_split()
    return tuple(t.clone() for t in train), tuple(t.clone() for t in test)  # callers may write to theirs


@lru_cache(maxsize=1)  # a seed sweep reloads the same 1797 images: parse the bundled CSV once
def _fixed_split() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    from sklearn.datasets import load_digits  # imported late: sklearn is slow to import

    bunch = load_digits()
    x = torch.from_numpy(bunch.data).float() / 16.0  # 4-bit counts 0..16
    y = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = stratified_split(y, TEST_FRACTION, torch.Generator().manual_seed(SPLIT_SEED))
    return take((x, y), train_idx), take((x, y), test_idx)
