"""Where ``advreg bench`` trains its runs: ``local`` (a process pool on this machine, :func:`advreg.bench.execute`)
or ``slurm``: every unfinished run folder one Slurm job, submitted through submitit (the ``slurm`` extra) as one
job array.

The bench folder stays the truth. ``slurm/jobs.json`` there names each run's job and its logs; a rerun asks
``squeue`` (no accounting database needed) and resubmits only the runs whose job is neither pending nor running
and whose folder is not finished. A job that Slurm preempts or that reaches its time limit is requeued by
submitit's checkpointing protocol and resumes from its run folder's last checkpoint (``train(resume=True)``); a
job that raises (a bad setting, a diverged run) ends there and is reported with its log.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advreg.config import TrainConfig
from advreg.io import atomic_write_bytes, read_json
from advreg.runs import load_metrics

REPLICAS = "replicas_per_node"  # ours, not submitit's: torchrun's processes per node (default: gpus_per_node)
# --slurm KEY → submitit's AutoExecutor parameter (and the kind of its value)
SLURM_KEYS: dict[str, tuple[str, type]] = {
    "partition": ("slurm_partition", str),
    "time": ("timeout_min", int),
    "nodes": ("nodes", int),
    "gpus_per_node": ("gpus_per_node", int),
    "cpus_per_task": ("cpus_per_task", int),
    "mem_gb": ("mem_gb", float),
    "account": ("slurm_account", str),
    "qos": ("slurm_qos", str),
    "constraint": ("slurm_constraint", str),
    "replicas_per_node": (REPLICAS, int),
}
EXTRA = "slurm_additional_parameters."  # --slurm slurm_additional_parameters.reservation=r1 → sbatch --reservation=r1
DEFAULT_MINUTES = 5  # submitit's default time limit
PENDING_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
LOG_NOISE = ("srun:", "slurmstepd", "submitit ")  # a job log's lines around the exception that ended it
JOBS, SETTINGS = "jobs.json", "settings.json"  # under the bench folder's slurm/


def parse_slurm(items: list[str]) -> dict[str, Any]:
    """``["partition=gpu", "time=120", "slurm_additional_parameters.reservation=r1"]`` → submitit's parameters."""
    parameters: dict[str, Any] = {}
    for item in items:
        key, sep, value = (s.strip() for s in item.partition("="))
        if key.startswith(EXTRA) and sep and value and key != EXTRA:
            parameters.setdefault("slurm_additional_parameters", {})[key[len(EXTRA) :]] = value
            continue
        if not sep or key not in SLURM_KEYS or not value:
            raise ValueError(
                f"--slurm expects KEY=VALUE with KEY one of {', '.join(SLURM_KEYS)} or {EXTRA}NAME, "
                f"got {item!r} (example: --slurm partition=gpu --slurm time=120)"
            )
        name, kind = SLURM_KEYS[key]
        try:
            parameters[name] = kind(value)
        except ValueError:
            raise ValueError(f"--slurm {key} takes a {kind.__name__}, got {value!r}") from None
        if kind is not str and parameters[name] <= 0:
            raise ValueError(f"--slurm {key} must be positive, got {value!r}")
    return parameters


def replicas(parameters: dict[str, Any]) -> tuple[int, int]:
    """(nodes, processes per node) of each run: one torchrun replica per GPU (or as asked), on every node."""
    return parameters.get("nodes", 1), parameters.get(REPLICAS, parameters.get("gpus_per_node", 1))


def cost(runs: int, parameters: dict[str, Any]) -> str:
    """The grid's price before it is submitted: the GPU (or CPU) hours that the time limits allow at most."""
    nodes = parameters.get("nodes", 1)
    minutes = parameters.get("timeout_min", DEFAULT_MINUTES)
    unit, per_run = (
        ("GPU", nodes * parameters["gpus_per_node"])
        if parameters.get("gpus_per_node")
        else ("CPU", nodes * parameters.get("cpus_per_task", 1))
    )
    return (
        f"{runs} Slurm job(s) × {per_run} {unit}(s) × at most {minutes} min = at most "
        f"{runs * per_run * minutes / 60:.1f} {unit}-hours"
    )


@dataclass(frozen=True)
class RunJob:
    """What a Slurm job runs: train one run folder (resuming it) and add its robust errors. submitit's
    checkpointing protocol (``checkpoint``) resubmits the same call on preemption or time limit: the run
    folder holds the progress, so nothing else needs saving."""

    config: TrainConfig
    folder: str
    attacks: tuple[str, ...] = ()
    source: str | None = None
    nodes: int = 1
    per_node: int = 1

    def __call__(self) -> None:
        if self.nodes * self.per_node > 1:
            return self._torchrun()
        from advreg.bench import train_one

        _, error = train_one(self.config, self.folder, self.attacks, self.source)
        if error:  # a diverged run: the job fails, with the reason as its log's last line, and is not requeued
            raise RuntimeError(error)

    def checkpoint(self) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)

    def _torchrun(self) -> None:
        """``advreg train`` under torchrun, ``per_node`` replicas on each node, meeting at the first node."""
        import submitit

        environment = submitit.JobEnvironment()
        config = Path(self.folder).parent / f".{Path(self.folder).name}.config.json"
        # node 0 writes it before its torchrun joins the rendezvous, so before any replica starts to read it
        if environment.global_rank == 0:  # beside the run folder, which the replicas make
            config.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(config, json.dumps(self.config.to_dict()).encode())
        subprocess.run(torchrun_command(self, environment.hostnames[0], environment.job_id, str(config)), check=True)
        if environment.global_rank == 0:
            from advreg.bench import train_one  # the robust errors, on one process

            train_one(self.config, self.folder, self.attacks, self.source)


def torchrun_command(job: RunJob, master: str, job_id: str, config: str) -> list[str]:
    """One node's ``torchrun``: c10d rendezvous at ``master`` on a port chosen from the job id."""
    port = 20000 + int("".join(c for c in job_id if c.isdigit()) or 0) % 20000
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={job.nodes}",
        f"--nproc-per-node={job.per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={master}:{port}",
        f"--rdzv-id={job_id}",
        "-m",
        "advreg.launchers",
        job.folder,
        config,
    ]


class Slurm:
    """The bench folder's Slurm jobs: submit, ask their state, report their logs."""

    def __init__(self, out: Path, parameters: dict[str, Any]):
        self.root, self.parameters = out / "slurm", parameters
        saved = self.root / JOBS
        self.jobs: dict[str, dict[str, str]] = read_json(saved) if saved.exists() else {}

    def states(self) -> dict[str, str]:
        """Every job of this user that Slurm still holds, pending or running: job id → state."""
        shown = subprocess.run(
            ["squeue", "-h", "-r", "--me", "-o", "%i|%T"], capture_output=True, text=True, check=False
        )
        if shown.returncode != 0:
            raise OSError(f"squeue failed ({shown.stderr.strip()}); check that Slurm answers (sinfo)")
        return dict(line.split("|", 1) for line in shown.stdout.split())

    def status(self, folder: Path, done: bool, states: dict[str, str]) -> str:
        """done, pending, running, failed (its job ended, the run unfinished) or todo (never submitted)."""
        if done:
            return "done"
        job = self.jobs.get(str(folder))
        state = states.get(job["id"], "") if job else ""
        return (
            "pending"
            if state in PENDING_STATES
            else "running"
            if state in RUNNING_STATES
            else "failed"
            if job
            else "todo"
        )

    def submit(self, jobs: list[RunJob]) -> None:
        """One job array (the runs share their resources); the ids saved before anything else can go wrong."""
        import submitit

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / SETTINGS, json.dumps(self.parameters, indent=2).encode())
        executor = submitit.AutoExecutor(folder=self.root / "logs", cluster="slurm")
        executor.update_parameters(
            name="advreg-bench",
            tasks_per_node=1,  # each task: a torchrun, or one process
            **{k: v for k, v in self.parameters.items() if k != REPLICAS},
        )
        with executor.batch():
            submitted = [executor.submit(job) for job in jobs]
        for job, handle in zip(jobs, submitted):
            self.jobs[job.folder] = {"id": handle.job_id, "log": str(handle.paths.stderr)}
        atomic_write_bytes(self.root / JOBS, json.dumps(self.jobs, indent=2).encode())

    def failure(self, folder: Path) -> str:
        """Why a run's job ended unfinished: its log's last line, and where the log is."""
        job = self.jobs[str(folder)]
        log = Path(job["log"])
        text = log.read_text(errors="replace") if log.exists() else ""
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith(LOG_NOISE)]
        last = f": {lines[-1].strip()}" if lines else ""
        return f"its Slurm job {job['id']} ended without finishing it{last} (log: {log}); a rerun resubmits it"


def run_slurm(
    specs: list[Any],
    out: Path,
    parameters: dict[str, Any],
    attacks: tuple[str, ...] = (),
    source: str | None = None,
    wait_for: bool = True,
    every: float = 10.0,
    quiet: bool = False,
) -> list[dict[str, Any]] | None:
    """Submit every run that is neither finished nor pending or running, print the cost first; then (unless
    ``wait_for`` is false: None) wait and return one row per run, ``failed`` with its log where its job ended
    unfinished."""
    from advreg import bench

    check_available()
    bench.check_folders(specs)
    slurm = Slurm(out, parameters)
    states = slurm.states()
    todo = [
        s
        for s in specs
        if slurm.status(s.folder, bench.complete(s.folder, attacks, source), states) in ("todo", "failed")
    ]
    nodes, per_node = replicas(parameters)
    if todo:
        print(f"slurm: {cost(len(todo), parameters)}", file=sys.stderr, flush=True)
        slurm.submit([RunJob(s.config, str(s.folder), attacks, source, nodes, per_node) for s in todo])
    print(
        f"slurm: submitted {len(todo)} of {len(specs)} runs (job ids and logs in {slurm.root / JOBS})",
        file=sys.stderr,
        flush=True,
    )
    if not wait_for:
        return None
    status = wait(slurm, [s.folder for s in specs], lambda f: bench.complete(f, attacks, source), every, quiet)
    return [
        bench.run_row(s, load_metrics(s.folder))
        if status[str(s.folder)] == "done"
        else {**bench.run_row(s, None, slurm.failure(s.folder)), "failed": True}
        for s in specs
    ]


def check_available() -> None:
    """ValueError, saying what to install, unless submitit and Slurm's commands are here."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ValueError('--launcher slurm needs submitit: pip install "advreg[slurm]"') from None
    missing = [c for c in ("sbatch", "squeue", "scontrol") if shutil.which(c) is None]
    if missing:
        raise ValueError(
            f"--launcher slurm needs Slurm's commands on PATH (missing: {', '.join(missing)}); run "
            "the bench on the cluster's login node, or use --launcher local"
        )


def wait(slurm: Slurm, folders: list[Path], done, every: float = 5.0, quiet: bool = False) -> dict[str, str]:
    """Poll until no run's job is pending or running; print the counts whenever they change."""
    last = ""
    while True:
        states = slurm.states()
        status = {str(f): slurm.status(f, done(f), states) for f in folders}
        line = counts(status)
        if line != last and not quiet:
            print(f"slurm: {line}", file=sys.stderr, flush=True)
            last = line
        if not any(s in ("pending", "running") for s in status.values()):
            return status
        time.sleep(every)


def counts(status: dict[str, str]) -> str:
    return ", ".join(f"{sum(s == k for s in status.values())} {k}" for k in ("pending", "running", "done", "failed"))


def main(argv: list[str]) -> None:
    """A torchrun replica of :meth:`RunJob._torchrun`: ``python -m advreg.launchers FOLDER CONFIG_JSON``."""
    from advreg.train import train

    folder, config = argv
    train(TrainConfig.from_dict(read_json(Path(config))), folder, resume=True, progress=False)


if __name__ == "__main__":
    main(sys.argv[1:])
