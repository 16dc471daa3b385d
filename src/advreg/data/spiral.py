"""Spiral arms in the plane (the AMP paper's Fig. 6, its reference [41]): K arms of N points, the classic CS231n
generator. Arm k: radius r = linspace(0, 1, N), angle t = linspace(4k, 4(k+1), N) + noise·randn(N),
x = r·(sin t, cos t).

The data set is FIXED, independent of the run seed, like digits: the training points are drawn with seed
``TRAIN_SEED`` and the test points, from the same generator, with seed ``TEST_SEED``; the run seed only picks
the validation rows. ``load`` follows the protocol of ``advreg.data`` sources, so it can be registered there.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import Tensor

from advreg.data.splits import DataSplits, stratified_split, take

NUM_CLASSES = 3
N_PER_CLASS = 100
NOISE = 0.2
TRAIN_SEED, TEST_SEED = 0, 1  # part of the dataset's definition: changing them changes every reported number


def make_spiral(
    n_per_class: int = N_PER_CLASS, classes: int = NUM_CLASSES, noise: float = NOISE, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(x, y)``: x float32 ``(classes·n_per_class, 2)`` in the unit disc, y int64, arm by arm in class order."""
    _check(n_per_class, classes, noise, seed)
    rng = np.random.default_rng(seed)
    r = np.linspace(0.0, 1.0, n_per_class)  # (N,)
    arms = [
        np.linspace(4.0 * k, 4.0 * (k + 1), n_per_class) + noise * rng.standard_normal(n_per_class)
        for k in range(classes)
    ]
    x = np.concatenate([np.stack([r * np.sin(t), r * np.cos(t)], axis=1) for t in arms])  # (K·N, 2)
    y = np.repeat(np.arange(classes), n_per_class)
    return torch.from_numpy(x).float(), torch.from_numpy(y).long()


def _check(n_per_class: int, classes: int, noise: float, seed: int) -> None:
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (n_per_class, classes, seed)):
        raise ValueError(
            f"n_per_class, classes and seed must be integers, got {n_per_class!r}, {classes!r}, "
            f"{seed!r}; pass e.g. make_spiral(100, 3, 0.2, seed=0)"
        )
    if n_per_class < 1 or classes < 2 or not noise >= 0:
        raise ValueError(
            f"need n_per_class >= 1, classes >= 2 and noise >= 0, got {n_per_class}, {classes} and {noise!r}"
        )


def load(
    cache_dir: object = None, n_per_class: int = N_PER_CLASS, classes: int = NUM_CLASSES, noise: float = NOISE
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((x, y), (x_test, y_test))``, drawn with ``TRAIN_SEED`` and ``TEST_SEED``. ``cache_dir`` is unused."""
    return (make_spiral(n_per_class, classes, noise, TRAIN_SEED), make_spiral(n_per_class, classes, noise, TEST_SEED))


def load_spiral(
    seed: int,
    val_fraction: float = 0.1,
    n_per_class: int = N_PER_CLASS,
    classes: int = NUM_CLASSES,
    noise: float = NOISE,
) -> DataSplits:
    """The spiral's splits; ``seed`` picks the class-stratified validation rows (a private generator, as
    ``advreg.data.load_dataset`` does), the training and test points are fixed."""
    if not (isinstance(val_fraction, numbers.Real) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}; pass e.g. 0.1")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}; pass e.g. seed=0")
    train, test = load(None, n_per_class, classes, noise)
    keep, carved = stratified_split(train[1], val_fraction, torch.Generator().manual_seed(int(seed)))
    return DataSplits(
        name="spiral",
        train=take(train, keep),
        val=take(train, carved),
        test=test,
        num_classes=classes,
        input_shape=(2,),
    )
