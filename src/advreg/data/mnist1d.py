"""MNIST-1D (Greydanus & Kobak, 2020): 10 classes of 40-point 1-D signals, 4000 train / 1000 test.

Generated offline by the ``mnist1d`` package with its standard arguments, cached as a ``.npz`` file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

NUM_CLASSES = 10
KEYS = ("x", "y", "x_test", "y_test")


def standard_args() -> dict:
    """The package's standard arguments (seed 42), less the download URL that we never use."""
    import mnist1d.data  # imported late: it pulls in matplotlib

    args = mnist1d.data.get_dataset_args(as_dict=True)
    args.pop("url", None)
    return args


def default_cache_dir() -> Path:
    """``$ADVREG_CACHE`` if set and non-empty, else ``~/.cache/advreg``."""
    return Path(os.environ.get("ADVREG_CACHE") or Path.home() / ".cache" / "advreg")


def cache_path(cache_dir: str | Path | None = None, args: dict | None = None) -> Path:
    """The cache file: named by a hash of the arguments and the package version, which fix the data."""
    args = standard_args() if args is None else args
    key = json.dumps({"args": args, "mnist1d": metadata.version("mnist1d")}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"mnist1d-{digest}.npz"


def load(cache_dir: str | Path | None = None) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((x, y), (x_test, y_test))``: x float32 ``(N, 40)``, y int64; from the cache, else generated."""
    args = standard_args()
    path = cache_path(cache_dir, args)
    arrays = _read_cache(path, args)
    if arrays is None:
        arrays = generate(args)
        _write_cache(path, arrays)
    x, y, x_test, y_test = (torch.from_numpy(arrays[k]) for k in KEYS)
    return (x, y), (x_test, y_test)


def generate(args: dict) -> dict[str, np.ndarray]:
    """Run ``mnist1d.data.make_dataset``; it reseeds numpy's and Python's global RNGs, so we restore them."""
    import mnist1d.data

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = mnist1d.data.make_dataset(mnist1d.data.ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.ascontiguousarray(data[k], dtype=np.float32 if k.startswith("x") else np.int64) for k in KEYS}


def _expected_shapes(args: dict) -> dict[str, tuple[int, ...]]:
    n_train = int(args["num_samples"] * args["train_split"])  # make_dataset's own split rule
    n_test, d = args["num_samples"] - n_train, args["final_seq_length"]
    return {"x": (n_train, d), "y": (n_train,), "x_test": (n_test, d), "y_test": (n_test,)}


def _read_cache(path: Path, args: dict) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if absent; a damaged file is reported and then regenerated."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        problem = _check(arrays, args)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        problem = f"it cannot be read ({type(err).__name__}: {err})"
    if problem is None:
        return arrays
    warnings.warn(f"ignoring the MNIST-1D cache {path}: {problem}; regenerating it", stacklevel=3)
    return None


def _check(arrays: dict[str, np.ndarray], args: dict) -> str | None:
    """What is wrong with cached arrays, or None if they are what ``generate`` makes."""
    if sorted(arrays) != sorted(KEYS):
        return f"it holds keys {sorted(arrays)}, not {sorted(KEYS)}"
    for key, shape in _expected_shapes(args).items():
        want = np.float32 if key.startswith("x") else np.int64
        if arrays[key].shape != shape or arrays[key].dtype != want:
            return f"{key} is {arrays[key].dtype} {arrays[key].shape}, not {np.dtype(want)} {shape}"
    labels = np.concatenate([arrays["y"], arrays["y_test"]])
    if labels.min() < 0 or labels.max() >= NUM_CLASSES or not np.isfinite(arrays["x"]).all():
        return "its labels or inputs are out of range"
    return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file in the same folder, then rename); an unwritable folder means no cache."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half of it
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
