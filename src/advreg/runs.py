"""The run folder: create it, lock it, check what it holds, write and read its files.

A run folder holds ``config.json`` (the settings and the code version), ``checkpoint.pt`` (after every epoch: the
training state and the history), ``history.csv`` (derived from the checkpoint), ``metrics.json`` (the final
weights' numbers, and those ``advreg evaluate`` adds) and, with ``robust.track``, ``best.pt``. Every file is
written atomically; a kill mid-write leaves a hidden temporary file (``.NAME.tmpPID``), which the next writer removes.

One process writes a folder at a time: :class:`RunFolder` holds an exclusive ``flock`` on its lock file, which the
kernel releases when the process ends, however it ends. Every file read is checked before it is used, so a corrupt
or foreign file ends in a :class:`RunFolderError` (a ValueError) that names it and says what to do.
"""

from __future__ import annotations

import csv
import fcntl
import math
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor, nn

from advreg.config import TrainConfig
from advreg.io import TEMP_NAME, load_checkpoint, read_json, save_checkpoint, write_csv, write_json

CHECKPOINT, CONFIG, HISTORY, METRICS = "checkpoint.pt", "config.json", "history.csv", "metrics.json"
BEST = "best.pt"  # with robust.track: the weights of the epoch with the lowest validation robust error
LOCK = ".lock"  # flock'ed by the one process that writes the folder; never removed (see RunFolder.lock)
FILES = (CONFIG, CHECKPOINT, HISTORY, METRICS, BEST)
CHECKPOINT_KEYS = ("epoch", "config", "model", "optimizer", "scheduler", "rng", "history")
HISTORY_KEYS = (
    "epoch",
    "lr",
    "train_loss",
    "train_error",
    "val_loss",
    "val_error",
    "test_loss",
    "test_error",
    "seconds",
)  # every row's; with robust.track also val_robust_error and test_robust_error


class RunFolderError(ValueError):
    """The ``out`` folder holds something other than this run, or a file of it is corrupt or in use."""


class RunFolder:
    """A run folder locked for writing: ``with RunFolder(path):`` or ``lock()`` ... ``release()``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handle = None

    def lock(self) -> None:
        """Take the folder's exclusive lock or raise RunFolderError naming it, then remove what killed writers left.
        The lock file stays: removing it would let a process that opened it just before lock an orphaned file
        beside a newer one."""
        handle = open(self.path / LOCK, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunFolderError(
                f"{self.path} is in use by another advreg process (train or evaluate); wait for "
                "it to finish, or choose another folder"
            ) from None
        self._handle = handle
        try:
            self._remove_stale()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the flock
            self._handle = None

    def __enter__(self) -> "RunFolder":
        self.lock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _remove_stale(self) -> None:
        """Delete the temporary files of writers that were killed (none is running: this process holds the lock)."""
        for path in self.path.iterdir():
            if path.name != LOCK and _is_advregs(path.name):
                path.unlink(missing_ok=True)

    def write_config(self, config: TrainConfig, code_version: dict[str, Any]) -> None:
        write_json(self.path / CONFIG, {**config.to_dict(), "code_version": code_version})

    def save_epoch(self, checkpoint: dict[str, Any], best: dict[str, Any] | None = None) -> None:
        """best.pt, checkpoint.pt, then history.csv: a kill in between redoes the epoch or rewrites the history."""
        if best is not None:
            save_checkpoint(self.path / BEST, best)
        save_checkpoint(self.path / CHECKPOINT, checkpoint)
        self.write_history(checkpoint["history"])

    def write_history(self, history: list[dict[str, float]]) -> None:
        write_csv(self.path / HISTORY, history)

    def write_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write ``metrics`` over metrics.json, keeping the keys only the file has (robust errors that ``advreg
        evaluate`` added); return what was written."""
        path = self.path / METRICS
        merged = {**(load_metrics(self.path) if path.exists() else {}), **metrics}
        write_json(path, merged)
        return merged


def open_run(out: str | Path, config: TrainConfig, resume: bool) -> tuple[RunFolder, dict[str, Any] | None]:
    """Create or check the run folder ``out`` for ``config`` and lock it; return it (locked: release it when
    done) and the checked checkpoint to resume from, or None to start from epoch 0."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} is a file, not a run folder; choose another --out")
    refuse_foreign(out)  # before this process creates anything in someone else's folder
    output_folder(out)
    folder = RunFolder(out)
    folder.lock()
    try:
        return folder, _checkpoint_to_resume(out, config, resume)
    except BaseException:
        folder.release()
        raise


def _checkpoint_to_resume(out: Path, config: TrainConfig, resume: bool) -> dict[str, Any] | None:
    if not (out / CONFIG).exists():
        refuse_foreign(out)  # another process may have filled it since the first look
        return None  # new, or only advreg's lock and temporary files: a fresh start
    check_same_run(out, config)
    if not resume:
        raise RunFolderError(f"{out} already holds this run; pass --resume to continue it, or choose another --out")
    return read_checkpoint(out / CHECKPOINT) if (out / CHECKPOINT).exists() else None


def refuse_foreign(out: Path, advice: str = "choose another --out") -> None:
    """Raise RunFolderError, naming the stray files and ending in ``advice``, if ``out`` holds files but no
    config.json (advreg's own lock and temporary files do not count: what a killed start leaves behind starts
    afresh)."""
    if not out.is_dir() or (out / CONFIG).exists():
        return
    stray = sorted(p.name for p in out.iterdir() if not _is_advregs(p.name))
    if stray:
        more = f" and {len(stray) - 3} more" if len(stray) > 3 else ""  # a mistyped --out may be a big folder
        raise RunFolderError(
            f"{out} is not empty and holds no advreg run (it holds {', '.join(stray[:3])}{more}); {advice}"
        )


def _is_advregs(name: str) -> bool:
    """The lock file, or a temporary file that a killed writer of a run folder's file left."""
    match = TEMP_NAME.match(name)
    return name == LOCK or (match is not None and match["name"] in FILES)


def check_output(out: str | Path) -> Path:
    """``out`` as a Path; a ValueError naming the file if a file stands where the folder ``out`` or a parent of it
    belongs (checked before a command's work, which would otherwise end in a traceback from mkdir)."""
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = "" if path == out else f", where the folder {out} would lie"
            raise ValueError(f"{path} is a file{where}; choose another --out")
    return out


def output_folder(out: str | Path) -> Path:
    """Create the folder ``out`` and its parents (:func:`check_output` first)."""
    out = check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# -- reading, each file checked against what the run folder's schema says it holds --------------------------------
def read_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, metrics.json)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise RunFolderError(
            f"{path} holds a JSON {type(value).__name__}, not an object; it is not advreg's: "
            "delete it (train --resume rewrites metrics.json) or choose another folder"
        )
    return value


def read_config(folder: str | Path) -> dict[str, Any]:
    """config.json's settings, without the code version."""
    saved = read_object(Path(folder) / CONFIG)
    saved.pop("code_version", None)
    return saved


def load_config(folder: str | Path) -> TrainConfig:
    """The run's TrainConfig, or RunFolderError if config.json is not one."""
    path = Path(folder) / CONFIG
    try:
        return TrainConfig.from_dict(read_config(folder))
    except RunFolderError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise RunFolderError(f"{path} is not an advreg config ({err}); restore it, or train the run again") from None


def check_same_run(out: str | Path, config: TrainConfig) -> None:
    """Raise RunFolderError unless the run folder ``out`` was made with ``config``."""
    saved = read_config(out)
    if _normalized(saved) != config.to_dict():
        raise RunFolderError(
            f"{out} holds a different run ({_difference(saved, config.to_dict())}); "
            "choose another --out, or pass the same settings to resume it"
        )


def same_config(saved: Any, config: TrainConfig) -> bool:
    return isinstance(saved, dict) and _normalized(saved) == config.to_dict()


def _normalized(saved: dict[str, Any]) -> dict[str, Any]:
    try:
        return TrainConfig.from_dict(saved).to_dict()  # JSON lists back to tuples
    except (TypeError, ValueError, KeyError, AttributeError):
        return saved


def _difference(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(saved) | set(wanted), key=str):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.append(_difference(a, b, f"{prefix}{key}."))
        elif a != b and not (isinstance(a, list) and tuple(a) == b):
            diffs.append(f"{prefix}{key}: {a!r} there, {b!r} here")
    return "; ".join(d for d in diffs if d)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """checkpoint.pt, checked to have the shape of advreg's (the state dicts themselves are checked as they load)."""
    state = load_checkpoint(path)
    problem = _checkpoint_problem(state)
    if problem:
        raise RunFolderError(
            f"{path} is not an advreg checkpoint ({problem}); delete the run folder to start over, "
            "or choose another --out"
        )
    return state


def _checkpoint_problem(state: Any) -> str:
    """What makes ``state`` no advreg checkpoint, or '' if nothing does."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        return f"it lacks {', '.join(missing)}"
    epoch, history = state["epoch"], state["history"]
    if not (
        isinstance(epoch, int)
        and epoch >= 0
        and isinstance(history, list)
        and len(history) == epoch
        and all(isinstance(row, dict) and row.get("epoch") == i + 1 for i, row in enumerate(history))
    ):
        return "its epoch and history disagree"
    if not all(isinstance(row.get(key), (int, float)) for row in history for key in HISTORY_KEYS):
        return f"a history row lacks a number for one of {', '.join(HISTORY_KEYS)}"
    if not all(isinstance(state[key], dict) for key in ("config", "model", "optimizer", "scheduler", "rng")):
        return "config, model, optimizer, scheduler and rng must be dicts"
    if not all(isinstance(v, Tensor) for v in state["model"].values()) or "torch" not in state["rng"]:
        return "its model holds non-tensors or its rng no torch state"
    return ""


def read_best(path: Path, epochs: int) -> dict[str, Any]:
    """best.pt: the epoch (1..epochs) and the weights chosen on validation."""
    state = load_checkpoint(path)
    if not (
        isinstance(state, dict)
        and isinstance(state.get("epoch"), int)
        and 1 <= state["epoch"] <= epochs
        and isinstance(state.get("model"), dict)
    ):
        raise RunFolderError(
            f"{path} is not advreg's best.pt (an epoch in 1..{epochs} and the weights); delete the "
            "run folder to start over"
        )
    return state


def load_weights(model: nn.Module, weights: dict[str, Any], path: Path) -> None:
    """``model.load_state_dict(weights)``; a missing key or a wrong shape is a RunFolderError naming ``path``."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, KeyError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise RunFolderError(
            f"the weights in {path} do not fit the model config.json describes ({reason}); "
            "restore the run's config.json, or delete the run folder to start over"
        ) from None


def load_metrics(folder: str | Path) -> dict[str, Any]:
    """metrics.json; a null, the strict JSON that :func:`advreg.io.write_json` writes for a NaN or infinity (a
    metric of an empty split), is read back as NaN. A file from before strict JSON, with NaN tokens, loads too."""
    metrics = read_object(Path(folder) / METRICS)
    return {key: math.nan if value is None else value for key, value in metrics.items()}


def read_metrics(folder: str | Path, keys: Sequence[str]) -> dict[str, Any]:
    """metrics.json (:func:`load_metrics`), with a number under each of ``keys``."""
    path = Path(folder) / METRICS
    metrics = load_metrics(folder)
    bad = [k for k in keys if not _is_number(metrics.get(k))]
    if bad:
        raise RunFolderError(
            f"{path} lacks a number for {', '.join(bad)}; resume the run with advreg train --resume to rewrite it"
        )
    return metrics


def read_history(folder: str | Path, column: str) -> list[float]:
    """One numeric column of history.csv, a value per epoch (:func:`read_history_table`)."""
    return read_history_table(folder, (column,))[column]


REWRITE_HISTORY = "resume the run with advreg train --resume to rewrite it from the checkpoint"


def read_history_table(folder: str | Path, columns: Sequence[str]) -> dict[str, list[float]]:
    """history.csv as column -> a number per epoch (an empty cell: NaN), every column the file has; a
    RunFolderError naming the file unless it is UTF-8 CSV with ``columns``, a number in every cell and an epoch."""
    path = Path(folder) / HISTORY
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = [(reader.line_num, row) for row in reader]  # the file's line: blank lines are skipped
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as err:
        raise RunFolderError(f"{path} is not UTF-8 CSV ({err}); {REWRITE_HISTORY}") from None
    missing = [c for c in columns if c not in header]
    if not header or missing:
        what = "is empty" if not header else f"has no column {', '.join(missing)}"
        raise RunFolderError(f"{path} {what}; {REWRITE_HISTORY}")
    if not rows:
        raise RunFolderError(f"{path} has no epoch yet; train the run for at least one epoch")
    numbers = [_history_row(row, header, path, line) for line, row in rows]
    return {column: [row[i] for row in numbers] for i, column in enumerate(header)}


def _history_row(row: dict[Any, Any], header: Sequence[str], path: Path, line: int) -> list[float]:
    """The numbers of one row of history.csv, in the header's order (an empty cell: NaN)."""
    if None in row or None in row.values():  # csv's marks of a row longer or shorter than the header
        raise RunFolderError(f"{path} line {line} does not have the header's {len(header)} cells; {REWRITE_HISTORY}")
    return [_history_number(row[column], path, line, column) for column in header]


def _history_number(text: str, path: Path, line: int, column: str) -> float:
    try:
        return float(text) if text.strip() else math.nan
    except ValueError:
        raise RunFolderError(
            f"{path} line {line}, column {column}: {text!r} is not a number; {REWRITE_HISTORY}"
        ) from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
