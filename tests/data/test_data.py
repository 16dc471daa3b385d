"""Tests of advreg.data: dataset sizes and dtypes, the validation carve, the MNIST-1D cache, TensorLoader."""

from __future__ import annotations

import random
import warnings
from collections import Counter

import mnist1d.data as mnist1d_pkg
import numpy as np
import pytest
import torch

from advreg.data import DATASETS, DataSplits, TensorLoader, digits, load_dataset, mnist1d, spiral
from advreg.data.splits import carve_counts

SIZES = {
    "mnist1d": (4000, 1000, (40,)),
    "digits": (1438, 359, (64,)),  # n_train (with val), n_test, shape
    "spiral": (300, 300, (2,)),
}
CLASSES = {"mnist1d": 10, "digits": 10, "spiral": 3}
OFFLINE = tuple(SIZES)  # the sets made without files; the image readers are in test_vision_readers.py
assert set(OFFLINE) < set(DATASETS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder holding MNIST-1D, generated once for the module (about 1.5 s)."""
    path = tmp_path_factory.mktemp("advreg-cache")
    mnist1d.load(path)
    return path


@pytest.fixture(scope="module")
def raw(cache):
    return {"mnist1d": mnist1d.load(cache), "digits": digits.load(), "spiral": spiral.load()}


def rows(x, y):
    """The rows of (x, y) as a multiset, to compare splits without caring about order."""
    return Counter(zip(map(bytes, x.numpy()), y.tolist()))


def fake_make_dataset(data, calls):
    def make(args):
        calls.append(args)
        return {
            "x": data[0][0].double().numpy(),
            "y": data[0][1].numpy(),
            "x_test": data[1][0].double().numpy(),
            "y_test": data[1][1].numpy(),
        }

    return make


# --- load_dataset: sizes, dtypes, the carve --------------------------------------------------------


@pytest.mark.parametrize("name", OFFLINE)
def test_shapes_dtypes_sizes(name, cache):
    n_train, n_test, shape = SIZES[name]
    d = load_dataset(name, seed=0, val_fraction=0.1, cache_dir=cache)
    k = CLASSES[name]
    assert isinstance(d, DataSplits) and d.name == name and d.num_classes == k and d.input_shape == shape
    n_val = round(0.1 * n_train)
    for (x, y), n in ((d.train, n_train - n_val), (d.val, n_val), (d.test, n_test)):
        assert x.shape == (n, *shape) and y.shape == (n,)
        assert x.dtype == torch.float32 and y.dtype == torch.long
        assert set(y.tolist()) == set(range(k))
        assert torch.isfinite(x).all()


def test_sizes_mnist1d_exact(cache):
    d = load_dataset("mnist1d", seed=3, cache_dir=cache)
    assert (len(d.train[1]), len(d.val[1]), len(d.test[1])) == (3600, 400, 1000)


def test_digits_scaled_to_unit_interval(cache):
    x = torch.cat([load_dataset("digits", seed=0, cache_dir=cache).train[0]])
    assert x.min() == 0 and x.max() == 1


@pytest.mark.parametrize("name", OFFLINE)
def test_val_is_carved_from_train(name, cache, raw):
    d = load_dataset(name, seed=1, cache_dir=cache)
    original = rows(*raw[name][0])
    assert sum(original.values()) == len(original)  # no duplicate rows, so overlap is meaningful
    assert not rows(*d.train).keys() & rows(*d.val).keys()
    assert rows(*d.train) + rows(*d.val) == original
    assert rows(*d.test) == rows(*raw[name][1])


@pytest.mark.parametrize("name", OFFLINE)
def test_test_set_is_the_same_for_every_seed(name, cache):
    a, b = (load_dataset(name, seed=s, cache_dir=cache) for s in (0, 1))
    assert torch.equal(a.test[0], b.test[0]) and torch.equal(a.test[1], b.test[1])


@pytest.mark.parametrize("name", OFFLINE)
def test_split_is_deterministic_per_seed(name, cache):
    a, b, c = (load_dataset(name, seed=s, cache_dir=cache) for s in (7, 7, 8))
    for part in ("train", "val"):
        assert torch.equal(getattr(a, part)[0], getattr(b, part)[0])
        assert torch.equal(getattr(a, part)[1], getattr(b, part)[1])
    assert not torch.equal(a.val[0], c.val[0])


@pytest.mark.parametrize("name", OFFLINE)
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_val_is_stratified(name, fraction, cache, raw):
    d = load_dataset(name, seed=0, val_fraction=fraction, cache_dir=cache)
    counts = torch.bincount(raw[name][0][1], minlength=10)
    val_counts = torch.bincount(d.val[1], minlength=10)
    assert (val_counts - fraction * counts).abs().max() <= 1
    assert int(val_counts.sum()) == round(fraction * int(counts.sum()))


def test_carve_counts_sum_and_bounds():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        counts = torch.randint(1, 30, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)
        fraction = float(torch.rand(1, generator=gen))
        take = carve_counts(counts, fraction)
        assert int(take.sum()) == int(np.floor(fraction * int(counts.sum()) + 0.5))
        assert ((take - fraction * counts).abs() <= 1).all() and (take <= counts).all() and (take >= 0).all()


@pytest.mark.parametrize("name", OFFLINE)
def test_zero_val_fraction_gives_empty_val(name, cache):
    n_train, _, shape = SIZES[name]
    d = load_dataset(name, seed=0, val_fraction=0, cache_dir=cache)
    assert d.val[0].shape == (0, *shape) and d.val[1].shape == (0,) and d.val[1].dtype == torch.long
    assert len(d.train[1]) == n_train


def test_digits_test_split_is_fixed_stratified():
    (_, y), (_, y_test) = digits.load()
    counts = torch.bincount(torch.cat([y, y_test]), minlength=10)
    assert (torch.bincount(y_test, minlength=10) - 0.2 * counts).abs().max() <= 1


def test_bad_arguments_raise(cache):
    with pytest.raises(ValueError, match="unknown dataset 'x'; choose one of: mnist1d, digits"):
        load_dataset("x", seed=0, cache_dir=cache)
    for bad in (1.0, -0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"val_fraction must be .* \[0, 1\)"):
            load_dataset("digits", seed=0, val_fraction=bad, cache_dir=cache)
    with pytest.raises(ValueError, match="seed"):
        load_dataset("digits", seed=1.5, cache_dir=cache)
    with pytest.raises(ValueError, match="no training rows"):
        load_dataset("digits", seed=0, val_fraction=0.9999, cache_dir=cache)


# --- MNIST-1D generation and cache ----------------------------------------------------------------


def test_cache_is_written_and_reused(cache, raw, monkeypatch):
    path = mnist1d.cache_path(cache)
    assert path.is_file() and path.suffix == ".npz" and path.name.startswith("mnist1d-")
    assert not list(cache.glob("*.tmp"))  # the atomic write left nothing behind

    def boom(args):
        raise AssertionError("make_dataset called although the cache is valid")

    monkeypatch.setattr(mnist1d_pkg, "make_dataset", boom)
    (x, y), (x_test, y_test) = mnist1d.load(cache)
    assert torch.equal(x, raw["mnist1d"][0][0]) and torch.equal(y_test, raw["mnist1d"][1][1])


def test_corrupt_cache_warns_and_regenerates_leaving_global_rngs_alone(tmp_path, raw):
    path = mnist1d.cache_path(tmp_path)
    path.write_bytes(b"\x00garbage, not a zip file" * 10)
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    with pytest.warns(UserWarning, match="regenerating"):
        d = load_dataset("mnist1d", seed=0, val_fraction=0, cache_dir=tmp_path)  # make_dataset runs
    # make_dataset reseeds numpy and random globally; load_dataset must put them back
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    (x, y), (x_test, y_test) = d.train, d.test  # val_fraction=0: train in its original order
    (x0, y0), (xt0, yt0) = raw["mnist1d"]
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(x_test, xt0) and torch.equal(y_test, yt0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mnist1d.load(tmp_path)  # the rewritten file is good


@pytest.mark.parametrize(
    "bad",
    [
        {"x": np.zeros((3, 40), np.float32)},  # keys missing
        {
            "x": np.zeros((4000, 39), np.float32),
            "y": np.zeros(4000, np.int64),
            "x_test": np.zeros((1000, 40), np.float32),
            "y_test": np.zeros(1000, np.int64),
        },  # shape
        {
            "x": np.zeros((4000, 40), np.float64),
            "y": np.zeros(4000, np.int64),
            "x_test": np.zeros((1000, 40), np.float32),
            "y_test": np.zeros(1000, np.int64),
        },  # dtype
        {
            "x": np.zeros((4000, 40), np.float32),
            "y": np.full(4000, 10, np.int64),
            "x_test": np.zeros((1000, 40), np.float32),
            "y_test": np.zeros(1000, np.int64),
        },  # labels
    ],
)
def test_wrong_cache_contents_warn_and_regenerate(bad, tmp_path, raw, monkeypatch):
    np.savez(mnist1d.cache_path(tmp_path), **bad)
    calls = []
    monkeypatch.setattr(mnist1d_pkg, "make_dataset", fake_make_dataset(raw["mnist1d"], calls))
    with pytest.warns(UserWarning, match="MNIST-1D cache"):
        (x, _), _ = mnist1d.load(tmp_path)
    assert len(calls) == 1 and torch.equal(x, raw["mnist1d"][0][0])
    mnist1d.load(tmp_path)
    assert len(calls) == 1  # regenerated file was written and is reused


def test_unwritable_cache_dir_still_loads(tmp_path, raw, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # mkdir under a file fails even for root, unlike chmod
    calls = []
    monkeypatch.setattr(mnist1d_pkg, "make_dataset", fake_make_dataset(raw["mnist1d"], calls))
    d = load_dataset("mnist1d", seed=0, cache_dir=blocker / "cache")
    assert len(d.test[1]) == 1000 and len(calls) == 1


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ADVREG_CACHE", str(tmp_path))
    assert mnist1d.default_cache_dir() == tmp_path
    assert mnist1d.cache_path().parent == tmp_path
    monkeypatch.delenv("ADVREG_CACHE")
    assert mnist1d.default_cache_dir() == mnist1d.Path.home() / ".cache" / "advreg"


def test_cache_name_depends_on_args():
    args = mnist1d.standard_args()
    assert mnist1d.cache_path("c", args) == mnist1d.cache_path("c")
    assert mnist1d.cache_path("c", {**args, "seed": 0}) != mnist1d.cache_path("c")


# --- TensorLoader -----------------------------------------------------------------------------------


def data(n=10):
    return torch.arange(n * 2, dtype=torch.float32).reshape(n, 2), torch.arange(n)


@pytest.mark.parametrize(
    "n,batch,drop_last,sizes",
    [
        (10, 3, False, [3, 3, 3, 1]),
        (10, 3, True, [3, 3, 3]),
        (9, 3, False, [3, 3, 3]),
        (2, 5, False, [2]),
        (2, 5, True, []),
        (0, 4, False, []),
    ],
)
def test_loader_batches(n, batch, drop_last, sizes):
    for shuffle in (False, True):
        loader = TensorLoader(
            *data(n), batch, shuffle=shuffle, drop_last=drop_last, generator=torch.Generator().manual_seed(0)
        )
        batches = list(loader)
        assert len(loader) == len(sizes) and [len(b[1]) for b in batches] == sizes
        assert all(torch.equal(xb[:, 0], 2 * yb.float()) for xb, yb in batches)  # x and y stay paired


def test_loader_in_order_without_shuffle():
    x, y = data()
    assert torch.equal(torch.cat([yb for _, yb in TensorLoader(x, y, 4)]), y)


def test_loader_every_sample_once_per_epoch():
    loader = TensorLoader(*data(23), 5, shuffle=True, generator=torch.Generator().manual_seed(1))
    epochs = [torch.cat([yb for _, yb in loader]) for _ in range(3)]
    assert all(sorted(e.tolist()) == list(range(23)) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])  # a new order each epoch
    assert not torch.equal(epochs[0], torch.arange(23))


def test_loader_shuffle_reproducible_and_resumable():
    def order(loader):
        return torch.cat([yb for _, yb in loader])

    a = TensorLoader(*data(50), 8, shuffle=True, generator=torch.Generator().manual_seed(5))
    b = TensorLoader(*data(50), 8, shuffle=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(order(a), order(b))
    state = a.generator.get_state()  # saved between epochs, as in a checkpoint
    second = order(a)
    resumed = TensorLoader(*data(50), 8, shuffle=True, generator=torch.Generator())
    resumed.generator.set_state(state)
    assert torch.equal(order(resumed), second)


def test_loader_draws_permutation_at_iter():
    gen = torch.Generator().manual_seed(0)
    loader = TensorLoader(*data(), 3, shuffle=True, generator=gen)
    before = gen.get_state()
    it = iter(loader)
    assert not torch.equal(gen.get_state(), before)  # state after iter() is what a checkpoint must save
    next(it)


def test_loader_rejects_bad_arguments():
    x, y = data()
    with pytest.raises(ValueError, match="same number of rows"):
        TensorLoader(x, y[:-1], 2)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            TensorLoader(x, y, bad)


# --- fewer samples and noisy labels (AMM paper, Sec. 4.3.2-4.3.3) ----------------------------------


def test_train_fraction_keeps_a_seeded_share_of_the_training_rows(cache):
    full = load_dataset("mnist1d", seed=2, cache_dir=cache)
    part, again = (load_dataset("mnist1d", seed=2, train_fraction=0.25, cache_dir=cache) for _ in range(2))
    assert len(part.train[1]) == round(0.25 * len(full.train[1]))
    assert rows(*part.train).keys() <= rows(*full.train).keys()  # a subset of the same carve
    assert torch.equal(part.val[0], full.val[0]) and torch.equal(part.test[0], full.test[0])
    assert torch.equal(part.train[0], again.train[0])


def test_label_noise_replaces_that_share_of_training_labels_only(cache):
    clean = load_dataset("mnist1d", seed=4, cache_dir=cache)
    noisy = load_dataset("mnist1d", seed=4, label_noise=0.5, cache_dir=cache)
    assert torch.equal(noisy.train[0], clean.train[0]) and torch.equal(noisy.val[1], clean.val[1])
    changed = (noisy.train[1] != clean.train[1]).double().mean().item()
    assert abs(changed - 0.5 * 0.9) < 0.04  # a random class keeps the label 1 time in 10
    assert noisy.train[1].min() >= 0 and noisy.train[1].max() < noisy.num_classes


@pytest.mark.parametrize("kwargs", [{"train_fraction": 0}, {"train_fraction": 1.5}, {"label_noise": -0.1}])
def test_bad_train_fraction_or_noise_is_refused(kwargs, cache):
    with pytest.raises(ValueError, match="train_fraction must be in"):
        load_dataset("mnist1d", seed=0, cache_dir=cache, **kwargs)
