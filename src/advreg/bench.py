"""``advreg bench``: train methods × grid points × seeds as separate run folders, select on validation, summarize.

Each run is an ordinary run folder, so an interrupted bench resumes and skips finished runs. A grid point
is chosen per method by mean validation error over the seeds; the test figures of that point alone are
reported. Nothing is ever selected on the test set.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import io
import itertools
import json
import math
import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from advreg.config import SEED_RANGE, TrainConfig
from advreg.io import atomic_write_bytes, read_json
from advreg.methods import METHODS, resolve
from advreg.recipes import with_recipe
from advreg.registry import in_use, owner_of
from advreg.runs import CONFIG, check_same_run, load_metrics, refuse_foreign
from advreg.runs import METRICS as METRICS_FILE

METRICS = (
    "test_error",
    "test_nll",
    "test_ece",
    "test_margin",
    "val_error",
    "val_nll",
    "train_error",
    "seconds_per_epoch",
    "test_error_fgsm",
    "test_error_pgd",
    "test_error_fgsm_transfer",
    "test_error_pgd_transfer",
    "best_test_error",
    "best_test_robust_error",
    "last_test_robust_error",
    "robust_gap",
    "best_robust_gap",
    "best_val_robust_error",
    "best_epoch",
)
PLAN = "bench.json"  # the planned runs, in the bench folder
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
# with robust tracking (adversarial training) the columns of the AWP paper's tables: best and last checkpoints
ROBUST_COLUMNS = (
    ("best_test_error", "Best: clean error (%)", 2),
    ("best_test_robust_error", "Best: PGD error (%)", 2),
    ("last_test_robust_error", "Last: PGD error (%)", 2),
    ("robust_gap", "Last: robust gap (%)", 2),
)


@dataclass(frozen=True)
class Variant:
    """A row of the table: a method's preset with fixed settings on top (``avg_lin=amm:amm.aggregation=avg``),
    and settings of its own to choose on validation (``amm.lam=8|32``, kept in ``grid``)."""

    name: str
    method: str
    settings: tuple[str, ...] = ()
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()


def parse_variant(text: str) -> Variant:
    """``LABEL=METHOD[:KEY=VALUE[;KEY=V1|V2...]]`` → :class:`Variant`; ``V1|V2`` is the row's own grid."""
    label, sep, rest = text.partition("=")
    method, _, settings = rest.partition(":")
    label, method = label.strip(), method.strip()
    if not sep or not label or not method or any(c in label for c in "/\\ "):
        raise ValueError(
            f"--variant expects LABEL=METHOD[:KEY=VALUE;...], got {text!r} (example: --variant "
            "'amm_avg_lin=amm:amm.aggregation=avg;amm.shrinkage=lin')"
        )
    if method not in METHODS:
        raise ValueError(f"--variant {label}: unknown method {method!r}; choose from: {', '.join(METHODS)}")
    fixed, grid = [], []
    for item in filter(None, (s.strip() for s in settings.split(";"))):
        key, _, value = item.partition("=")
        options = tuple(v.strip() for v in value.split("|"))
        if "|" in value and (not key.strip() or not all(options)):
            raise ValueError(f"--variant {label}: {item!r} should be KEY=V1|V2|... (example: amm.lam=8|32)")
        if "|" in value:
            grid.append((key.strip(), options))
        else:
            fixed.append(item)
    return Variant(label, method, tuple(fixed), tuple(grid))


@dataclass(frozen=True)
class RunSpec:
    method: str  # the row's label: the method's name, or a variant's
    point: tuple[str, ...]  # the grid assignments key=value of this run
    seed: int
    folder: Path
    config: TrainConfig


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["amp.epsilon=0.1,0.5"]`` → ``{"amp.epsilon": ["0.1", "0.5"]}``; a key given twice gets both lists."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not options:
            raise ValueError(f"--grid expects key=v1,v2,..., got {item!r} (example: --grid amp.epsilon=0.1,0.5)")
        grid.setdefault(key.strip(), []).extend(options)
    return grid


def plan(
    base: TrainConfig,
    methods: list[str | Variant],
    seeds: int,
    settings: list[str],
    grid: dict[str, list[str]],
    out: Path,
    recipe: str | None = None,
) -> list[RunSpec]:
    """Every (method or variant, grid point, seed) run; a grid key of a stage a method does not use skips it.
    A variant's own grid (``amm.lam=8|32``) applies to that row, over the shared ``grid`` for the same key.
    A ``recipe`` (advreg.recipes) goes under every run's settings. A row or a point given twice (``erm,erm``,
    ``amp.epsilon=0.1,0.10``) is planned once."""
    if not 1 <= seeds <= SEED_RANGE[1] + 1:
        raise ValueError(f"--seeds must be >= 1 and at most 2**63 (seeds 0..N-1 are torch seeds), got {seeds}")
    planned: dict[str, list[RunSpec]] = {}
    for row in (m if isinstance(m, Variant) else Variant(m, m) for m in methods):
        specs = _row_specs(base, row, seeds, [*settings, *row.settings], grid, out, recipe)
        if row.name in planned and [s.config for s in planned[row.name]] != [s.config for s in specs]:
            raise ValueError(
                f"two rows share a name ({row.name!r}) but not their settings; give each variant its own label"
            )
        planned.setdefault(row.name, specs)
    return [spec for specs in planned.values() for spec in specs]


def _row_specs(
    base: TrainConfig,
    row: Variant,
    seeds: int,
    fixed: list[str],
    grid: dict[str, list[str]],
    out: Path,
    recipe: str | None,
) -> list[RunSpec]:
    """A row's runs, grid points × seeds; a point whose runs are an earlier point's (0.1 and 0.10) is left out."""
    row_grid = {k: v for k, v in grid.items() if _applies(base, row.method, fixed, k)} | dict(row.grid)
    specs: list[RunSpec] = []
    seen: set[TrainConfig] = set()
    for values in itertools.product(*row_grid.values()):
        point = tuple(f"{k}={v}" for k, v in zip(row_grid, values))
        configs = [with_recipe(_with(base, row.method, seed), recipe, [*fixed, *point]) for seed in range(seeds)]
        if configs[0] in seen:
            continue
        seen.add(configs[0])
        folder = out / "runs" / (row.name + "".join(f"__{p}" for p in point))
        specs += [RunSpec(row.name, point, seed, folder / f"seed{seed}", c) for seed, c in enumerate(configs)]
    return specs


def _with(base: TrainConfig, method: str, seed: int) -> TrainConfig:
    return dataclasses.replace(base, method=method, seed=seed)


def _applies(base: TrainConfig, method: str, settings: list[str], key: str) -> bool:
    """A key of a stage member (amp.*) or of a preset (loss.smoothing) tunes only the methods that use it."""
    if owner_of(key.split(".")[0]) is not None:
        return in_use(resolve(_with(base, method, 0), settings).stages, key)
    owners = [m for m in METHODS.values() if any(s.split("=")[0] == key for s in m.settings)]
    return not owners or any(m.name == method for m in owners)


def execute(
    specs: list[RunSpec], jobs: int, progress: bool = True, attacks: tuple[str, ...] = (), source: str | None = None
) -> list[dict[str, Any]]:
    """Run (or read back) every spec, ``jobs`` processes at a time, then its ``attacks`` (white box, and
    transferred from the run folder ``source`` if given); one row per run, ``failed`` where its worker died or
    raised (the other runs go on; a rerun resumes it)."""
    check_folders(specs)
    todo = [s for s in specs if not complete(s.folder, attacks, source)]
    rows = [run_row(s, load_metrics(s.folder)) for s in specs if s not in todo]
    bar = tqdm(total=len(specs), initial=len(rows), unit="run", desc="bench", disable=not progress)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    with contextlib.closing(_run_all(todo, max(1, jobs), threads, (attacks, source))) as results:
        for spec, (metrics, error, failed) in results:  # closing: the workers stop even if this loop raises
            rows.append({**run_row(spec, metrics, error), "failed": failed})
            bar.update()
    bar.close()
    order = {s.folder: i for i, s in enumerate(specs)}
    return sorted(rows, key=lambda r: order[Path(r["folder"])])


def save_plan(out: Path, specs: list[RunSpec], title: str) -> None:
    """``bench.json``: every planned run and the table's title, so that ``--collect OUT`` needs nothing else."""
    runs = [
        {
            "method": s.method,
            "point": list(s.point),
            "seed": s.seed,
            "folder": str(s.folder.relative_to(out)),
            "config": s.config.to_dict(),
        }
        for s in specs
    ]
    atomic_write_bytes(out / PLAN, json.dumps({"title": title, "runs": runs}, indent=1).encode())


def load_plan(out: Path) -> tuple[list[RunSpec], str]:
    """The runs and title that :func:`save_plan` wrote in the bench folder ``out``."""
    if not (out / PLAN).is_file():
        raise ValueError(
            f"{out} has no {PLAN}, so it is not a bench folder (or one from an older advreg); "
            "run the bench command again to write it"
        )
    saved = read_json(out / PLAN)
    specs = [
        RunSpec(r["method"], tuple(r["point"]), r["seed"], out / r["folder"], TrainConfig.from_dict(r["config"]))
        for r in saved["runs"]
    ]
    return specs, saved["title"]


def collect(specs: list[RunSpec]) -> list[dict[str, Any]]:
    """One row per planned run from whatever has finished; an unfinished run's row says so."""
    return [
        run_row(s, load_metrics(s.folder))
        if complete(s.folder, ())
        else {**run_row(s, None, "not finished yet"), "failed": True}
        for s in specs
    ]


def check_folders(specs: list[RunSpec]) -> None:
    """Refuse a run folder from another bench: it would be read back as if it were this one."""
    for spec in specs:
        if (spec.folder / CONFIG).exists():
            check_same_run(spec.folder, spec.config)


Reply = tuple[dict[str, Any] | None, str, bool]  # a worker's answer: metrics, error, failed


def _run_all(todo: list[RunSpec], jobs: int, threads: int, options: tuple[Any, ...]) -> Iterator[tuple[RunSpec, Reply]]:
    """Train ``todo`` on up to ``jobs`` worker processes, yielding each run's reply as it ends. A worker that
    dies (SIGKILL, the OOM killer) fails its own run only; a fresh worker takes the next one."""
    context = multiprocessing.get_context("spawn")  # a clean interpreter per worker: no forked torch state
    pending, idle, busy = list(reversed(todo)), [], {}
    try:
        while pending or busy:
            while pending and len(busy) < jobs:
                worker = idle.pop() if idle else _Worker(context, threads)
                worker.give(pending.pop(), options)
                busy[worker.conn] = busy[worker.process.sentinel] = worker
            for worker in {busy[ready] for ready in wait(list(busy))}:
                del busy[worker.conn], busy[worker.process.sentinel]
                spec, reply = worker.take()
                if worker.process.is_alive():  # a raised error leaves it serving; a dead one is replaced
                    idle.append(worker)
                yield spec, reply
    finally:  # done, or interrupted: no worker outlives the bench
        for worker in {*idle, *busy.values()}:
            worker.stop()


class _Worker:
    """A spawned process that trains the runs sent through its pipe, one at a time, and ends with the bench:
    idle, its pipe closes; mid-run, the parent-death signal (:func:`_end_with`)."""

    def __init__(self, context: Any, threads: int):
        self.conn, child = context.Pipe()
        # not a daemon: its training may start processes of its own (torch.compile's)
        self.process = context.Process(target=_serve, args=(child, threads, os.getpid()))
        self.process.start()
        child.close()  # the worker holds the only other end: its death reads as the end of the pipe here
        self.spec: RunSpec | None = None

    def give(self, spec: RunSpec, options: tuple[Any, ...]) -> None:
        self.spec = spec
        self.conn.send((spec.config, str(spec.folder), *options))

    def take(self) -> tuple[RunSpec, Reply]:
        """The run's reply, or a failure that says how the worker died."""
        spec, self.spec = self.spec, None
        try:
            return spec, self.conn.recv()
        except (EOFError, OSError):
            self.conn.close()
            self.process.join()
            return spec, (None, _death(self.process.exitcode), True)

    def stop(self) -> None:
        self.conn.close()  # an idle worker reads the end of its pipe and exits
        if self.spec is not None:  # mid-run (the bench was interrupted): its last finished epoch is checkpointed
            self.process.terminate()
        self.process.join()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        oom = ", as the out-of-memory killer does" if -exitcode == signal.SIGKILL else ""
        return f"its worker process was killed by {name}{oom}; a rerun resumes it"
    return f"its worker process exited with status {exitcode}; a rerun resumes it"


def _serve(conn: Connection, threads: int, parent: int) -> None:
    """Worker: train each run received until the bench closes the pipe; reply (metrics, error, failed)."""
    _end_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the bench decides
    tqdm.set_lock(threading.RLock())  # not tqdm's default, a semaphore that a killed worker leaks (a warning at exit)
    import torch

    torch.set_num_threads(threads)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        try:
            reply: Reply = (*train_one(*task), False)
        except Exception as err:  # noqa: BLE001 - any failure is reported in the run's row; the bench goes on
            reply = (None, f"{type(err).__name__}: {err}", True)
        conn.send(reply)


def _end_with(parent: int) -> None:
    """End this worker when the bench process ``parent`` dies, SIGKILL included; else it would train on and
    then wait for ever. Linux: the kernel's parent-death signal; elsewhere a thread that watches the parent."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        threading.Thread(target=watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)


def watch_parent(parent: int, every: float = 0.2) -> None:
    """End this process once ``parent`` is gone (where no parent-death signal exists): poll its id every ``every`` s."""
    while os.getppid() == parent:  # an orphan is adopted by another process
        time.sleep(every)
    os._exit(1)


def complete(folder: Path, attacks: tuple[str, ...], source: str | None = None) -> bool:
    if not (folder / METRICS_FILE).exists():
        return False
    metrics = load_metrics(folder)
    done = all(f"test_error_{a}" in metrics for a in attacks)
    return done and (
        source is None
        or (metrics.get("attack_source") == source and all(f"test_error_{a}_transfer" in metrics for a in attacks))
    )


def train_one(
    config: TrainConfig, folder: str, attacks: tuple[str, ...], source: str | None = None
) -> tuple[dict[str, Any] | None, str]:
    """Train one run folder unless finished, then add the missing robust errors; (metrics, error).

    A diverged run is a result, not a crash. A finished run is not retrained: that would rewrite its
    metrics.json without the robust errors already added to it.
    """
    from advreg.robustness import evaluate_run
    from advreg.train import TrainingDiverged, train

    try:
        if not (Path(folder) / METRICS_FILE).exists():
            refuse_foreign(Path(folder), "remove the stray files from it, or rerun the bench with another --out")
            train(config, folder, resume=True, progress=False)
        if not complete(Path(folder), attacks, source):
            evaluate_run(folder, list(attacks), source=source)
        return load_metrics(folder), ""
    except TrainingDiverged as err:
        return None, str(err)


def run_row(spec: RunSpec, metrics: dict[str, Any] | None, error: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {
        "method": spec.method,
        "point": " ".join(spec.point),
        "seed": spec.seed,
        "folder": str(spec.folder),
        "error": error,
    }
    metrics = metrics or {}
    seconds = metrics.get("train_seconds")
    metrics = {**metrics, "seconds_per_epoch": seconds / spec.config.epochs if seconds is not None else None}
    row.update({k: metrics.get(k) for k in METRICS})
    return row


def select(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per method, the grid point with the lowest mean validation error over its seeds (failed runs: +inf); the
    validation robust error of the best checkpoint for runs that track it (adversarial training)."""
    chosen: dict[str, str] = {}
    for method, method_rows in _group(rows, "method").items():
        key = (
            "best_val_robust_error"
            if any(r.get("best_val_robust_error") is not None for r in method_rows)
            else "val_error"
        )
        scores = {
            point: statistics.mean(_finite(r[key]) for r in point_rows)
            for point, point_rows in _group(method_rows, "point").items()
        }
        chosen[method] = min(scores, key=scores.__getitem__)  # first point wins a tie
    return chosen


def summarize(rows: list[dict[str, Any]], chosen: dict[str, str], title: str) -> str:
    """The paper's Table 1 layout: mean ± std of test error, NLL and ECE per method; best in bold."""
    stats = {m: _stats([r for r in rows if r["method"] == m and r["point"] == p]) for m, p in chosen.items()}
    columns = [("test_error", "Test error (%)", 2), ("test_nll", "Test NLL", 3), ("test_ece", "Test ECE (%)", 2)]
    columns += [
        (f"test_error_{a}{box}", f"{a.upper()} {name} error (%)", 2)
        for box, name in (("", "white-box"), ("_transfer", "black-box"))
        for a in ("fgsm", "pgd")
        if any(r.get(f"test_error_{a}{box}") is not None for r in rows)
    ]
    if any(r.get("test_margin") is not None for r in rows):
        columns.append(("test_margin", "Test margin (L2)", 3))
    columns += [c for c in ROBUST_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    best = {
        key: (max if key == "test_margin" else min)((s[key][0] for s in stats.values() if s[key]), default=None)
        for key, _, _ in columns
    }
    erm = stats.get("erm", {}).get("seconds_per_epoch")
    lines = [
        title,
        "",
        "| method | " + " | ".join(t for _, t, _ in columns) + " | time × ERM | runs | setting |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for method, s in stats.items():
        cells = [_cell(s[key], digits, s[key] is not None and s[key][0] == best[key]) for key, _, digits in columns]
        time = s["seconds_per_epoch"]
        ratio = f"{time[0] / erm[0]:.2f}" if time and erm else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {ratio} | {s['runs']} | {chosen[method] or '-'} |")
    lines += [
        "",
        "time × ERM: mean seconds per epoch relative to ERM's in this bench; with --jobs > 1 the runs "
        "share the machine, so it is rough (benchmarks/step_cost.py measures the cost per step cleanly).",
    ]
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[dict[str, Any]], chosen: dict[str, str]) -> None:
    buffer = io.StringIO()
    fields = ["method", "point", "seed", "selected", *METRICS, "error", "folder"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "selected": chosen.get(row["method"]) == row["point"]})
    atomic_write_bytes(out / "results.csv", buffer.getvalue().encode())


def _stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": f"{sum(not r['error'] for r in rows)}/{len(rows)}"}
    for key in METRICS:
        values = [r[key] for r in rows if r.get(key) is not None and not r["error"]]
        out[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
    return out


def _cell(value: tuple[float, float] | None, digits: int, bold: bool) -> str:
    if value is None:
        return "-"
    text = f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"
    return f"**{text}**" if bold else text


def _group(rows: list[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.inf
