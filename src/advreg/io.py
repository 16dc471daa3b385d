"""Files of a run folder, written atomically: a reader sees the old file or the new one, never half of one.

Checkpoints are read with ``torch.load(weights_only=True)``: never unpickle arbitrary objects.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp\d+$")  # what atomic_write_bytes leaves if killed mid-write


def temp_path(path: Path) -> Path:
    """The file ``atomic_write_bytes`` fills before renaming it to ``path``: hidden, named by its process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; an OSError (full disk, read-only folder) names ``path``, not the
    temporary file, and leaves the old ``path`` as it was."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None  # the errno picks the subclass
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as strict JSON (RFC 8259, which jq, JavaScript and every JSON reader accept): a non-finite float
    (the metric of an empty split) is written as null, which :func:`advreg.runs.load_metrics` reads back as NaN."""
    text = json.dumps(_finite_or_null(obj), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def _finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN or infinity, in nested dicts, lists and tuples too, replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(value) for value in obj]
    return obj


def read_json(path: Path) -> Any:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder where a JSON file belongs; remove it or choose another folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid UTF-8 JSON ({err}); delete it or choose another folder") from None


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> Any:
    """What ``path`` holds, unpickled with ``weights_only=True`` (tensors and containers only); the caller checks
    that it is what it should be. torch's warnings about a foreign file's format are silenced: the error says it."""
    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder where a checkpoint belongs; remove it or choose another --out")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # unreadable (permissions, I/O): the command line names the file and the cause
    except Exception as err:  # torch raises several types for truncated or foreign files
        reason = " ".join(str(err).split())  # on one line, in full: a refused pickle keeps torch's security advice
        raise ValueError(
            f"cannot read checkpoint {path} ({type(err).__name__}: {reason}); it is corrupt or "
            "not an advreg checkpoint: delete it to start over, or choose another --out"
        ) from None
