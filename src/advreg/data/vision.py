"""Readers for the published file formats of the papers' vision datasets, from files the user already has.

Nothing is ever downloaded (DESIGN §4): every reader takes the data folder (``--data-dir`` or ``$ADVREG_DATA``,
see :func:`data_root`) and reads the dataset's official archive as extracted there::

    <root>/cifar-10-batches-bin/data_batch_{1..5}.bin, test_batch.bin    (preferred over the python version)
    <root>/cifar-10-batches-py/data_batch_{1..5}, test_batch             (pickles: restricted unpickler)
    <root>/cifar-100-binary/train.bin, test.bin                          (preferred over the python version)
    <root>/cifar-100-python/train, test                                  (pickles: restricted unpickler)
    <root>/svhn/{train,test}_32x32.mat  or  <root>/{train,test}_32x32.mat (MATLAB level 5, read by hand)
    <root>/GTSRB/Final_Training/Images/<class:05d>/GT-<class:05d>.csv + *.ppm
    <root>/GTSRB/Final_Test/Images/*.ppm + GT-final_test.csv (in GTSRB/ or in GTSRB/Final_Test/Images/)
    <root>/tiny-imagenet-200/wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt

Every reader returns a :class:`VisionData`: images uint8 ``(N, C, H, W)`` (kept as bytes: CIFAR-10 as float32
would take 600 MB; batches are converted to float later) and labels int64 ``(N,)``, as torch tensors.
Every missing or corrupt file raises a one-line ``ValueError`` naming the file, the expected format and where
the official archive goes.

Choices:

- CIFAR-100 uses the fine labels (100 classes). The binary version is read when its folder exists.
- SVHN: the label 10 (digit 0) becomes 0, so label == digit. Only the "cropped digits" format 2 files.
- GTSRB: every image is resized to 32×32 with ``F.interpolate(mode="bilinear", antialias=True,
  align_corners=False)`` on float32 pixels, then rounded (half to even) to uint8. By default the image is NOT
  cropped to its ROI (the official images keep a border of about 10% around the sign); ``crop_roi=True`` crops
  to ``Roi.X1..Roi.X2`` × ``Roi.Y1..Roi.Y2`` first, both corners inclusive, 0-based. Training images are in
  class-folder order then CSV order; test images in the order of ``GT-final_test.csv``. Labels are the CSV's
  ``ClassId`` (43 classes); only the class folders present are read.
- Tiny-ImageNet: the val set is the test set; class ``i`` is the ``i``-th wnid of ``wnids.txt`` in sorted
  (lexicographic) order, the same order as a folder listing of ``train/`` (torchvision's ImageFolder).
  Training images in class order then file name order; test images in ``val_annotations.txt`` order.

scipy and torchvision are not used: the MAT-file, PPM and pickle readers here are written for exactly these files.
"""

from __future__ import annotations

import codecs
import csv
import importlib
import io
import math
import os
import pickle
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Pair = tuple[Tensor, Tensor]

ENV_VAR = "ADVREG_DATA"
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "gtsrb": 43, "tinyimagenet": 200}

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
_GTSRB_URL = "https://benchmark.ini.rub.de/gtsrb_dataset.html"
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


@dataclass(frozen=True, eq=False)
class VisionData:
    """One dataset's fixed train and test sets: images uint8 ``(N, C, H, W)``, labels int64 ``(N,)``.

    ``eq=False``: tensors have no single truth value for ``==``, so records compare by identity.
    """

    train: Pair
    test: Pair
    num_classes: int
    name: str


def data_root(explicit: str | Path | None = None) -> Path:
    """The data folder: ``explicit`` (``--data-dir``) if given, else ``$ADVREG_DATA``; it must be a directory."""
    if explicit is not None and str(explicit) != "":
        path, origin = Path(explicit), "--data-dir"
    elif os.environ.get(ENV_VAR):
        path, origin = Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    else:
        raise ValueError(
            f"no data folder given: pass --data-dir DIR or set ${ENV_VAR} to the folder that holds the "
            f"extracted dataset archives (e.g. cifar-10-batches-bin/, GTSRB/, tiny-imagenet-200/); "
            f"nothing is ever downloaded"
        )
    path = path.expanduser()
    if not path.is_dir():
        raise ValueError(
            f"data folder {path} (from {origin}) is not a directory; create it and extract the "
            f"dataset archives into it, or point {origin} at the folder that holds them"
        )
    return path


# ----------------------------------------------------------------------------------------------- errors


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _bad(path: Path, expected: str, got: object, fix: str) -> ValueError:
    return ValueError(_one_line(f"cannot read {path}: expected {expected}, got {got}; {fix}"))


def _cifar_fix(root: Path, tag: str) -> str:
    return (
        f"download {tag}-binary.tar.gz (or {tag}-python.tar.gz) from {_CIFAR_URL} and extract it into {root} "
        f"(the --data-dir / ${ENV_VAR} folder)"
    )


def _svhn_fix(root: Path) -> str:
    return (
        f"download train_32x32.mat and test_32x32.mat (format 2, cropped digits) from {_SVHN_URL} into "
        f"{root / 'svhn'} (or {root})"
    )


def _gtsrb_fix(root: Path) -> str:
    return (
        f"download GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip "
        f"from {_GTSRB_URL}, extract the first two into {root} and put GT-final_test.csv from the third into "
        f"{root / 'GTSRB'}"
    )


def _tiny_fix(root: Path) -> str:
    return f"download {_TINY_URL} and extract it into {root} (the --data-dir / ${ENV_VAR} folder)"


def _read_bytes(path: Path, expected: str, fix: str) -> bytes:
    if not path.is_file():
        raise _bad(path, expected, "no such file" if not path.exists() else "something that is not a file", fix)
    try:
        return path.read_bytes()
    except OSError as err:
        raise _bad(path, expected, f"an unreadable file ({err.strerror or err})", fix) from None


def _as_data(images: np.ndarray, labels: np.ndarray) -> Pair:
    return (
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
    )


# ------------------------------------------------------------------------------------------------ CIFAR


def read_cifar10(root: str | Path) -> VisionData:
    """CIFAR-10 (50000 train / 10000 test, 3×32×32, 10 classes), binary version if present, else python version."""
    return _read_cifar(
        Path(root),
        "cifar10",
        "cifar-10",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        label_key="labels",
        label_bytes=1,
    )


def read_cifar100(root: str | Path) -> VisionData:
    """CIFAR-100 with its fine labels (50000 train / 10000 test, 3×32×32, 100 classes), binary version first."""
    return _read_cifar(
        Path(root), "cifar100", "cifar-100", train=["train"], test=["test"], label_key="fine_labels", label_bytes=2
    )


def _read_cifar(
    root: Path, name: str, tag: str, *, train: list[str], test: list[str], label_key: str, label_bytes: int
) -> VisionData:
    classes, fix = NUM_CLASSES[name], _cifar_fix(root, tag)
    binary = root / (f"{tag}-batches-bin" if name == "cifar10" else f"{tag}-binary")
    python = root / (f"{tag}-batches-py" if name == "cifar10" else f"{tag}-python")
    if binary.is_dir():

        def load(stem: str) -> tuple[np.ndarray, np.ndarray]:
            return _read_cifar_binary(binary / f"{stem}.bin", tag.upper(), label_bytes, classes, fix)
    elif python.is_dir():

        def load(stem: str) -> tuple[np.ndarray, np.ndarray]:
            return _read_cifar_pickle(python / stem, tag.upper(), label_key, classes, fix)
    else:
        raise _bad(
            binary,
            f"the folder of the {tag.upper()} binary version (or {python.name}/ of the python version)",
            "neither folder",
            fix,
        )
    splits = []
    for stems in (train, test):
        parts = [load(stem) for stem in stems]
        splits.append(_as_data(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    return VisionData(train=splits[0], test=splits[1], num_classes=classes, name=name)


def _read_cifar_binary(
    path: Path, title: str, label_bytes: int, classes: int, fix: str
) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` label bytes (the last is the one used: CIFAR-100's fine label) + 3072 pixels."""
    record = label_bytes + 3 * 32 * 32
    expected = f"{title} binary records of {record} bytes ({label_bytes} label byte(s) + 3072 pixel bytes)"
    raw = np.frombuffer(_read_bytes(path, expected, fix), dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise _bad(path, expected, f"{raw.size} bytes, not a positive multiple of {record}", fix)
    rows = raw.reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)
    if labels.max() >= classes:
        raise _bad(path, expected + f" with labels below {classes}", f"label {labels.max()}", fix)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), labels  # R plane, G plane, B plane, each row-major


def _numpy_global(*candidates: str) -> object | None:
    """The first of ``module:name`` that this numpy has (numpy 2 moved numpy.core to numpy._core)."""
    for spec in candidates:
        module, name = spec.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3's protocol-2 pickles use it for bytes, limited to latin-1 text."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}, {errors!r})")
    return text.encode("latin-1")


def _safe_globals() -> dict[tuple[str, str], object]:
    reconstruct = _numpy_global("numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:_reconstruct")
    frombuffer = _numpy_global("numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer")
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core", "numpy._core"):  # files name either, whichever numpy wrote them
        if reconstruct is not None:
            allowed[(f"{module}.multiarray", "_reconstruct")] = reconstruct
        if frombuffer is not None:  # protocol 5 pickles of arrays
            allowed[(f"{module}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only; any other global is refused before it is looked up."""

    def __init__(self, file: io.BufferedIOBase, path: Path, fix: str) -> None:
        super().__init__(file, encoding="bytes")  # the official files are Python 2 pickles with str (= bytes) keys
        self._path, self._fix, self._allowed = path, fix, _safe_globals()

    def find_class(self, module: str, name: str) -> object:
        found = self._allowed.get((module, name))
        if found is None:
            raise ValueError(
                _one_line(
                    f"cannot read {self._path}: refusing to unpickle {module}.{name}, which a CIFAR python batch of "
                    f"numpy arrays never holds, so this file is not an official one; do not load it, {self._fix}"
                )
            )
        return found

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are not part of a CIFAR batch")


def _plain(value: object, depth: int = 0) -> bool:
    """Whether ``value`` is plain data: numbers, strings, containers of them, non-object numpy arrays."""
    if depth > 4:
        return False
    if value is None or isinstance(value, (bool, int, float, bytes, str)):
        return True
    if type(value) is np.ndarray:
        return not value.dtype.hasobject
    if type(value) in (list, tuple):
        return all(_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _read_cifar_pickle(path: Path, title: str, label_key: str, classes: int, fix: str) -> tuple[np.ndarray, np.ndarray]:
    expected = f"a {title} python batch (a pickled dict with b'data' uint8 (N, 3072) and b'{label_key}')"
    raw = _read_bytes(path, expected, fix)
    try:
        batch = _RestrictedUnpickler(io.BytesIO(raw), path, fix).load()
    except Exception as err:  # a damaged stream raises many types; only allow-listed globals can have run
        if isinstance(err, ValueError) and str(err).startswith(f"cannot read {path}: refusing"):
            raise
        raise _bad(path, expected, f"an unreadable pickle ({type(err).__name__}: {err})", fix) from None
    if type(batch) is not dict or not _plain(batch):
        raise _bad(path, expected, f"a {type(batch).__name__} that is not a dict of plain data", fix)
    keys = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = keys.get("data"), keys.get(label_key)
    if type(data) is not np.ndarray or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = (
            f"data of dtype {data.dtype} and shape {data.shape}"
            if isinstance(data, np.ndarray)
            else f"keys {sorted(keys)}"
        )
        raise _bad(path, expected, got, fix)
    if type(labels) is np.ndarray and labels.dtype.kind in "iu" and labels.ndim == 1:
        labels = labels.astype(np.int64)
    elif type(labels) is list and all(type(v) is int for v in labels):
        labels = np.array(labels, dtype=np.int64)
    else:
        raise _bad(path, expected, f"{label_key!r} of type {type(labels).__name__}, not a list of integers", fix)
    if len(labels) != len(data) or len(data) == 0:
        raise _bad(path, expected, f"{len(data)} images and {len(labels)} labels", fix)
    if labels.min() < 0 or labels.max() >= classes:
        raise _bad(path, expected + f" with labels in 0..{classes - 1}", f"labels {labels.min()}..{labels.max()}", fix)
    return data.reshape(-1, 3, 32, 32), labels


# ------------------------------------------------------------------------------------------------- SVHN

_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15
_MI_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MX_CLASSES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_MAT_EXPECTED = "a MATLAB level-5 (v5/v6/v7, not v7.3) MAT-file with X uint8 (32, 32, 3, N) and y (N, 1)"


class _MatError(Exception):
    """A defect in a MAT-file, turned into the one-line ValueError by the caller."""


def read_svhn(root: str | Path) -> VisionData:
    """SVHN cropped digits (73257 train / 26032 test, 3×32×32, 10 classes; label == digit, the file's 10 → 0).

    The ``extra_32x32.mat`` set is not read. Files are looked up in ``<root>/svhn/`` first, then in ``<root>``.
    """
    root = Path(root)
    splits = [_read_svhn_file(_svhn_path(root, f"{split}_32x32.mat"), _svhn_fix(root)) for split in ("train", "test")]
    return VisionData(train=splits[0], test=splits[1], num_classes=NUM_CLASSES["svhn"], name="svhn")


def _svhn_path(root: Path, filename: str) -> Path:
    inside = root / "svhn" / filename
    return inside if inside.exists() or not (root / filename).exists() else root / filename


def _read_svhn_file(path: Path, fix: str) -> Pair:
    try:
        arrays = _read_mat(_read_bytes(path, _MAT_EXPECTED, fix), wanted=("X", "y"))
    except _MatError as err:
        raise _bad(path, _MAT_EXPECTED, err, fix) from None
    missing = [k for k in ("X", "y") if k not in arrays]
    if missing:
        raise _bad(path, _MAT_EXPECTED, f"no numeric variable {' or '.join(missing)}", fix)
    x, y = arrays["X"], arrays["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise _bad(path, _MAT_EXPECTED, f"X of class {x.dtype} and size {x.shape}", fix)
    y = y.reshape(-1) if y.ndim == 1 or (y.ndim == 2 and 1 in y.shape) else y
    if y.ndim != 1 or len(y) != x.shape[3]:
        raise _bad(path, _MAT_EXPECTED, f"y of size {arrays['y'].shape} for {x.shape[3]} images", fix)
    if not np.all((y >= 0) & (y <= 10) & (y == np.floor(y))):
        raise _bad(path, _MAT_EXPECTED + " with labels 1..10", "other label values", fix)
    labels = y.astype(np.int64) % 10  # SVHN's label 10 is the digit 0
    return _as_data(x.transpose(3, 2, 0, 1), labels)  # MATLAB X(row, col, channel, n) -> (n, channel, row, col)


def _read_mat(data: bytes, wanted: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The numeric, real variables named in ``wanted`` of a little-endian MATLAB level-5 MAT-file."""
    if data[:10] == b"MATLAB 7.3" or data[512:520] == b"\x89HDF\r\n\x1a\n":
        raise _MatError(
            "a MATLAB v7.3 (HDF5) file, which this reader does not handle; re-save it in MATLAB with "
            "save(..., '-v7') or use the official SVHN files, which are v5"
        )
    if len(data) < 128 or not data.startswith(b"MATLAB 5.0 MAT-file"):
        raise _MatError("no 'MATLAB 5.0 MAT-file' header (a MATLAB v4 file or not a MAT-file)")
    if data[126:128] != b"IM":
        raise _MatError(
            "a big-endian MAT-file, which this reader does not handle"
            if data[126:128] == b"MI"
            else f"endian indicator {data[126:128]!r}"
        )
    found: dict[str, np.ndarray] = {}
    view = memoryview(data)
    for mtype, body in _mat_elements(view, 128):
        if mtype == _MI_COMPRESSED:
            try:
                inner = zlib.decompress(body)
            except zlib.error as err:
                raise _MatError(f"a damaged compressed element ({err})") from None
            elements = list(_mat_elements(memoryview(inner), 0))
        else:
            elements = [(mtype, body)]
        for inner_type, inner_body in elements:
            if inner_type == _MI_MATRIX:
                name, array = _mat_matrix(inner_body, wanted)
                if array is not None and name not in found:
                    found[name] = array
    return found


def _mat_elements(view: memoryview, pos: int) -> Iterator[tuple[int, memoryview]]:
    """The data elements ``(type, body)`` from ``pos`` to the end of ``view``."""
    end = len(view)
    while end - pos >= 8:
        mtype, nbytes = struct.unpack_from("<II", view, pos)
        if mtype >> 16:  # small data element: 2-byte size, 2-byte type, up to 4 bytes of data in the tag
            mtype, nbytes = mtype & 0xFFFF, mtype >> 16
            if nbytes > 4:
                raise _MatError(f"a small data element of {nbytes} bytes at offset {pos}")
            yield mtype, view[pos + 4 : pos + 4 + nbytes]
            pos += 8
            continue
        start = pos + 8
        if start + nbytes > end:
            raise _MatError(
                f"a data element of {nbytes} bytes at offset {pos} that runs past the end "
                f"({end} bytes): a truncated file"
            )
        yield mtype, view[start : start + nbytes]
        pos = start + nbytes + (0 if mtype == _MI_COMPRESSED else -nbytes % 8)  # elements pad to 8 bytes
    if pos < end and any(view[pos:end]):
        raise _MatError(f"{end - pos} stray bytes at offset {pos}")


def _mat_matrix(body: memoryview, wanted: tuple[str, ...]) -> tuple[str, np.ndarray | None]:
    """``(name, array)`` of an miMATRIX element; ``array`` is None unless it is a wanted real numeric array."""
    parts = _mat_elements(body, 0)
    try:
        (flags_type, flags), (dims_type, dims), (name_type, name_bytes) = next(parts), next(parts), next(parts)
    except StopIteration:
        raise _MatError("an miMATRIX element without flags, dimensions and name") from None
    if flags_type != _MI_UINT32 or len(flags) != 8 or dims_type != _MI_INT32 or name_type != _MI_INT8:
        raise _MatError(f"an miMATRIX element with subelements of types {flags_type}, {dims_type}, {name_type}")
    name = bytes(name_bytes).decode("ascii", "replace")
    word = struct.unpack_from("<I", flags)[0]
    mx_class, is_complex = word & 0xFF, bool(word & 0x0800)
    if name not in wanted or mx_class not in _MX_CLASSES:
        return name, None  # cells, structs, chars, sparse and unwanted variables are skipped
    if is_complex:
        raise _MatError(f"a complex variable {name}")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype="<i4"))
    try:
        real_type, real = next(parts)
    except StopIteration:
        raise _MatError(f"variable {name} without its data") from None
    if real_type not in _MI_TYPES:
        raise _MatError(f"variable {name} stored as data type {real_type}")
    count = math.prod(shape)
    stored = np.dtype("<" + _MI_TYPES[real_type])
    if len(real) != count * stored.itemsize:
        raise _MatError(f"variable {name} of size {shape} with {len(real)} bytes of {stored}")
    values = np.frombuffer(real, dtype=stored, count=count)  # MATLAB may store values in a smaller type
    return name, values.astype(_MX_CLASSES[mx_class], copy=False).reshape(shape, order="F")


# ------------------------------------------------------------------------------------------------ GTSRB

_GTSRB_COLUMNS = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
_GTSRB_CSV = "a GTSRB annotation CSV (';'-separated columns " + ";".join(_GTSRB_COLUMNS) + ")"


def read_gtsrb(root: str | Path, *, crop_roi: bool = False, size: int = 32) -> VisionData:
    """GTSRB (39209 train / 12630 test, 43 classes), each image resized to ``size``×``size`` (see module doc).

    ``crop_roi=False`` (default) keeps the whole image, border included; ``True`` crops to the CSV's ROI first.
    """
    root = Path(root)
    fix = _gtsrb_fix(root)
    train_dir = root / "GTSRB" / "Final_Training" / "Images"
    if not train_dir.is_dir():
        raise _bad(
            train_dir, "the GTSRB training folder with one folder per class (00000, 00001, ...)", "no such folder", fix
        )
    class_dirs = sorted(d for d in train_dir.iterdir() if d.is_dir() and len(d.name) == 5 and d.name.isdigit())
    if not class_dirs:
        raise _bad(train_dir, "one folder per class (00000 ... 00042)", "none", fix)
    rows = [row for d in class_dirs for row in _gtsrb_rows(d / f"GT-{d.name}.csv", d, fix)]
    test_dir = root / "GTSRB" / "Final_Test" / "Images"
    places = [root / "GTSRB" / "GT-final_test.csv", test_dir / "GT-final_test.csv"]
    test_csv = next((p for p in places if p.is_file()), None)
    if test_csv is None:
        raise _bad(
            places[0],
            _GTSRB_CSV + " with the test labels, here or in " + str(test_dir),
            "no such file (GT-final_test.test.csv, shipped with the test images, has no ClassId)",
            fix,
        )
    test_rows = _gtsrb_rows(test_csv, test_dir, fix)
    splits = [_gtsrb_images(r, crop_roi, size, fix) for r in (rows, test_rows)]
    return VisionData(train=splits[0], test=splits[1], num_classes=NUM_CLASSES["gtsrb"], name="gtsrb")


def _gtsrb_rows(path: Path, image_dir: Path, fix: str) -> list[tuple[Path, tuple[int, ...]]]:
    """``(image path, (width, height, x1, y1, x2, y2, class))`` for each line of a GTSRB CSV."""
    text = _read_bytes(path, _GTSRB_CSV, fix).decode("utf-8-sig", "replace")
    reader = csv.DictReader(io.StringIO(text), delimiter=";")
    missing = [c for c in _GTSRB_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise _bad(path, _GTSRB_CSV, f"a header without {', '.join(missing)}", fix)
    rows = []
    for line, row in enumerate(reader, start=2):
        try:
            values = tuple(int(row[c]) for c in _GTSRB_COLUMNS[1:])
        except (TypeError, ValueError):
            raise _bad(
                path, _GTSRB_CSV + " with integer fields", f"line {line}: {';'.join(map(str, row.values()))}", fix
            ) from None
        if not 0 <= values[-1] < NUM_CLASSES["gtsrb"]:
            raise _bad(path, _GTSRB_CSV + " with ClassId in 0..42", f"ClassId {values[-1]} on line {line}", fix)
        rows.append((image_dir / row["Filename"], values))
    if not rows:
        raise _bad(path, _GTSRB_CSV, "no rows", fix)
    return rows


def _read_ppm(path: Path, fix: str) -> np.ndarray:
    """A binary PPM (P6, maxval 255) as uint8 ``(3, H, W)``."""
    expected = "a binary PPM image (P6, maxval 255)"
    data = _read_bytes(path, expected, fix)
    fields, pos = [], 0
    while len(fields) < 4:
        while pos < len(data) and (data[pos] in b" \t\r\n\v\f" or data[pos] == ord("#")):
            if data[pos] == ord("#"):
                while pos < len(data) and data[pos] not in b"\r\n":
                    pos += 1
            else:
                pos += 1
        start = pos
        while pos < len(data) and data[pos] not in b" \t\r\n\v\f#":
            pos += 1
        if start == pos:
            raise _bad(path, expected, "a truncated header", fix)
        fields.append(data[start:pos])
    if (
        fields[0] != b"P6"
        or not all(f.isdigit() for f in fields[1:])
        or data[pos : pos + 1] not in (b" ", b"\t", b"\r", b"\n")
    ):
        raise _bad(path, expected, f"header {b' '.join(fields)[:40]!r}", fix)
    width, height, maxval = (int(f) for f in fields[1:])
    if maxval != 255 or width == 0 or height == 0:
        raise _bad(path, expected, f"a {width}×{height} image with maxval {maxval}", fix)
    pixels = data[pos + 1 :]
    if len(pixels) != width * height * 3:
        raise _bad(
            path, expected, f"{len(pixels)} pixel bytes for a {width}×{height} image (needs {width * height * 3})", fix
        )
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 3).transpose(2, 0, 1)


def _gtsrb_images(rows: list[tuple[Path, tuple[int, ...]]], crop_roi: bool, size: int, fix: str) -> Pair:
    images, labels = [], np.empty(len(rows), dtype=np.int64)
    for i, (path, (width, height, x1, y1, x2, y2, label)) in enumerate(rows):
        image = _read_ppm(path, fix)
        if image.shape[1:] != (height, width):
            raise _bad(path, f"a {width}×{height} image as its CSV says", f"{image.shape[2]}×{image.shape[1]}", fix)
        if crop_roi:
            if not (0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height):
                raise _bad(path, "an ROI inside the image", f"Roi ({x1}, {y1})-({x2}, {y2}) in {width}×{height}", fix)
            image = image[:, y1 : y2 + 1, x1 : x2 + 1]  # the ROI's corners are both inclusive
        images.append(image)
        labels[i] = label
    return _resize_uint8(images, size), torch.from_numpy(labels)


def _resize_uint8(images: list[np.ndarray], size: int) -> Tensor:
    """Each uint8 ``(3, h, w)`` to ``(3, size, size)``: bilinear, antialiased, rounded half to even."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for chunk in (idx[s : s + 1024] for idx in by_shape.values() for s in range(0, len(idx), 1024)):
        batch = torch.from_numpy(np.stack([images[i] for i in chunk])).float()
        resized = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[torch.tensor(chunk)] = resized.round().clamp(0, 255).to(torch.uint8)
    return out


# ---------------------------------------------------------------------------------------- Tiny-ImageNet


def read_tinyimagenet(root: str | Path) -> VisionData:
    """Tiny-ImageNet-200 (100000 train / 10000 val used as test, 3×64×64, 200 classes in sorted wnid order)."""
    root = Path(root)
    base, fix = root / "tiny-imagenet-200", _tiny_fix(root)
    wnids_path = base / "wnids.txt"
    expected = "the Tiny-ImageNet class list (one WordNet id per line)"
    wnids = sorted(
        line.strip()
        for line in _read_bytes(wnids_path, expected, fix).decode("ascii", "replace").splitlines()
        if line.strip()
    )
    if not wnids or len(set(wnids)) != len(wnids):
        raise _bad(wnids_path, expected + ", each once", f"{len(wnids)} lines, {len(set(wnids))} distinct", fix)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train: list[tuple[Path, int]] = []
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        files = sorted(folder.glob("*.JPEG")) if folder.is_dir() else []
        if not files:
            raise _bad(folder, "the training images <wnid>_<i>.JPEG of class " + wnid, "no such images", fix)
        train += [(f, index[wnid]) for f in files]
    notes = base / "val" / "val_annotations.txt"
    note_format = "tab-separated val annotations (filename, wnid, x0, y0, x1, y1)"
    test: list[tuple[Path, int]] = []
    for line_no, line in enumerate(_read_bytes(notes, note_format, fix).decode("ascii", "replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise _bad(notes, note_format + " with wnids from wnids.txt", f"line {line_no}: {line[:80]!r}", fix)
        test.append((base / "val" / "images" / fields[0], index[fields[1]]))
    if not test:
        raise _bad(notes, note_format, "no lines", fix)
    return VisionData(
        train=_read_jpegs(train, fix), test=_read_jpegs(test, fix), num_classes=len(wnids), name="tinyimagenet"
    )


def _read_jpegs(items: list[tuple[Path, int]], fix: str, size: int = 64) -> Pair:
    from PIL import Image, UnidentifiedImageError  # Pillow comes with matplotlib

    expected = f"a {size}×{size} JPEG image"
    images = np.empty((len(items), 3, size, size), dtype=np.uint8)
    for i, (path, _) in enumerate(items):
        if not path.is_file():
            raise _bad(path, expected, "no such file", fix)
        try:
            with Image.open(path) as opened:
                rgb = np.asarray(opened.convert("RGB"))  # some Tiny-ImageNet images are grayscale
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise _bad(path, expected, f"an unreadable image ({err})", fix) from None
        if rgb.shape != (size, size, 3):
            raise _bad(path, expected, f"a {rgb.shape[1]}×{rgb.shape[0]} image", fix)
        images[i] = rgb.transpose(2, 0, 1)
    return torch.from_numpy(images), torch.tensor([label for _, label in items], dtype=torch.int64)


# ------------------------------------------------------------------------------------------------ lookup

READERS: dict[str, Callable[..., VisionData]] = {
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "svhn": read_svhn,
    "gtsrb": read_gtsrb,
    "tinyimagenet": read_tinyimagenet,
}


def read(name: str, root: str | Path | None = None, **options: object) -> VisionData:
    """Read dataset ``name`` from ``root`` (resolved by :func:`data_root`); ``options`` go to its reader."""
    if name not in READERS:
        raise ValueError(f"unknown vision dataset {name!r}; choose one of: {', '.join(READERS)}")
    return READERS[name](data_root(root), **options)
