"""``advreg bench --launcher slurm`` against a real one-node Slurm (tests/slurm_cluster.py): the same numbers as
``--launcher local``, a cancelled job resubmitted by a rerun, a preempted (SIGUSR2) and a requeued job that
resume from their checkpoints, a failing run reported with its log and not requeued.

All in this one module, on one cluster, and on one xdist worker (the xdist_group mark, pytest's ``--dist
loadgroup`` in pyproject.toml).
"""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advreg import cli, launchers

submitit = pytest.importorskip("submitit", reason="the slurm extra is not installed (pip install -e '.[slurm]')")
import slurm_cluster  # noqa: E402 (tests/ is on sys.path, as for ddp_worker.py)

pytestmark = pytest.mark.xdist_group("slurm")  # with --dist loadgroup (pyproject.toml): one worker, one cluster
QUICK = ["--dataset", "digits", "--set", "model.hidden=16", "--quiet"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        running = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.Unavailable as why:
        pytest.skip(f"no one-node Slurm here: {why}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(running.conf))
        yield running
    running.stop()


def _results(out):
    return [
        {k: v for k, v in row.items() if k not in ("folder", "seconds_per_epoch")}
        for row in csv.DictReader((out / "results.csv").open())
    ]


def _bench(out, *extra):
    return [sys.executable, "-m", "advreg.cli", "bench", *QUICK, "--out", str(out), *extra]


def _job(out, run, field="id"):
    """The run's job id, or its ``log`` (the job's stderr; its stdout has submitit's log lines)."""
    return json.loads((out / "slurm" / launchers.JOBS).read_text())[str(out / "runs" / run)][field]


def _queued(job_id):
    shown = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, check=True)
    return dict(line.split("|") for line in shown.stdout.split()).get(job_id)


def _start_now(job_id):
    """Start a pending job now: one submitted with a later --begin, or a requeued one (Slurm sets its BeginTime
    two minutes ahead, the lifetime of a job credential)."""
    _wait_until(lambda: _queued(job_id) == "PENDING")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, capture_output=True)


def _stop_mid_run(job_id, folder, *command, after=0):
    """Once the job's run has more than ``after`` epochs, suspend the job and ``command JOB_ID`` (scancel, scontrol
    requeue): its run stops there, seconds from its end however slowly this machine runs. Slurm kills a suspended
    job at once; a running one gets SIGTERM, which submitit ignores, and SIGKILL only 5 s later (slurmd waits
    KillWait, at least 5 s): time for this run to go on to its end."""
    _wait_until(lambda: _epochs(folder) > after)
    subprocess.run(["scontrol", "suspend", job_id], check=True, capture_output=True)
    subprocess.run([*command, job_id], check=True)


def _wait_until(condition, timeout=300.0):  # generous: CI shares 2 cores with the other test worker
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s")
        time.sleep(0.2)


def test_a_bench_on_slurm_has_the_numbers_of_the_local_bench_and_a_rerun_submits_nothing(cluster, tmp_path, capsys):
    grid = ["--methods", "erm,amp", "--seeds", "2", "--epochs", "3"]
    on_slurm = [
        *grid,
        *QUICK[:-1],
        "--out",
        str(tmp_path / "slurm"),
        "--launcher",
        "slurm",
        "--poll",
        "0.5",
        "--slurm",
        "time=10",
    ]  # not --quiet: the counts while it waits
    cli.main(["bench", *on_slurm])
    printed, err = capsys.readouterr()
    assert "running, 0 done, 0 failed\n" in err and err.endswith("slurm: 0 pending, 0 running, 4 done, 0 failed\n")
    assert "slurm: 4 Slurm job(s) × 1 CPU(s) × at most 10 min = at most 0.7 CPU-hours" in err
    ids = {_job(tmp_path / "slurm", f"{m}/seed{s}") for m in ("erm", "amp") for s in (0, 1)}
    assert len(ids) == 4 and len({i.split("_")[0] for i in ids}) == 1  # one job array
    assert json.loads((tmp_path / "slurm/slurm/settings.json").read_text()) == {"timeout_min": 10}
    cli.main(["bench", *grid, *QUICK, "--out", str(tmp_path / "local"), "--jobs", "2"])
    assert _results(tmp_path / "slurm") == _results(tmp_path / "local") and len(_results(tmp_path / "local")) == 4
    assert "| erm |" in printed and "| amp |" in printed and (tmp_path / "slurm/summary.md").read_text() == printed
    cli.main(["bench", *on_slurm])  # all finished: nothing submitted, the same tables
    assert "submitted 0 of 4 runs" in capsys.readouterr().err


def test_cancelled_preempted_and_requeued_jobs_finish_with_the_numbers_of_an_uninterrupted_bench(
    cluster, tmp_path, capsys
):
    out, grid = tmp_path / "b", ["--methods", "erm", "--seeds", "2", "--epochs", "150"]
    slurm = ["--launcher", "slurm", "--slurm", "time=20"]  # over 10 min: submitit reads SIGUSR2 as a preemption
    held = ["--slurm", "slurm_additional_parameters.begin=now+3600"]  # each job pending until _start_now
    whole = subprocess.Popen(
        _bench(tmp_path / "whole", *grid, "--jobs", "2"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )  # meanwhile, the uninterrupted bench
    cli.main(["bench", *grid, *QUICK, "--out", str(out), *slurm, *held, "--no-wait"])
    assert "submitted 2 of 2 runs" in capsys.readouterr().err
    cli.main(["bench", *grid, *QUICK, "--out", str(out), *slurm, "--no-wait"])
    assert "submitted 0 of 2 runs" in capsys.readouterr().err  # pending: never submitted twice
    first, second = _job(out, "erm/seed0"), _job(out, "erm/seed1")
    _start_now(second)
    _wait_until(lambda: _epochs(out / "runs/erm/seed1") > 0)
    subprocess.run(["scancel", "--signal=USR2", second], check=True)  # what Slurm sends before preempting
    _start_now(first)
    _stop_mid_run(first, out / "runs/erm/seed0", "scancel")
    _start_now(second)  # requeued by submitit on USR2
    _wait_until(lambda: _queued(first) is None)
    cli.main(["bench", "--collect", str(out)])
    assert "runs are not finished yet" in capsys.readouterr().err
    cancelled_at = _epochs(out / "runs/erm/seed0")
    rerun = subprocess.Popen(
        _bench(out, *grid, *slurm, "--poll", "0.5"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_until(lambda: _job(out, "erm/seed0") != first)
    resubmitted = _job(out, "erm/seed0")
    _stop_mid_run(resubmitted, out / "runs/erm/seed0", "scontrol", "requeue", after=cancelled_at)
    _wait_until(lambda: _queued(resubmitted) == "PENDING")
    subprocess.run(["scontrol", "release", resubmitted], check=True)  # Slurm holds a job requeued while suspended
    _start_now(resubmitted)
    printed, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "submitted 1 of 2 runs" in err and 0 < cancelled_at < 150, err
    log = Path(_job(out, "erm/seed1", "log")).read_text()
    assert "Caught signal SIGUSR2 on" in log and "this job is preempted" in log
    requeued = Path(_job(out, "erm/seed0", "log")).with_suffix(".out").read_text()  # the resubmitted job's
    assert requeued.count("Starting with JobEnvironment") == 2, requeued  # requeued before its run finished
    assert requeued.count("Job completed successfully") == 1, requeued
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    assert _results(out) == _results(tmp_path / "whole") and all(r["error"] == "" for r in _results(out))


def _epochs(folder):
    """Epochs in the run's history so far."""
    history = folder / "history.csv"
    return max(0, len(history.read_text().splitlines()) - 1) if history.exists() else 0


def test_a_failing_run_is_reported_with_its_log_and_not_requeued(cluster, tmp_path, capsys):
    out = tmp_path / "b"
    argv = [
        "bench",
        "--methods",
        "erm",
        "--seeds",
        "1",
        "--epochs",
        "2",
        *QUICK,
        "--out",
        str(out),
        "--launcher",
        "slurm",
        "--poll",
        "0.5",
        "--set",
        "optim.lr=1e30",
        "--set",
        "optim.momentum=0",
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    log = out / "slurm/logs" / f"{_job(out, 'erm/seed0')}_0_log.err"
    assert exit_info.value.code == 1 and "1 of 1 runs failed" in err and f"(log: {log})" in err
    assert "lower optim.lr (now 1e+30)" in err and _queued(_job(out, "erm/seed0")) is None


def test_a_run_with_two_replicas_trains_under_torchrun_in_its_job_as_advreg_train_under_torchrun(cluster, tmp_path):
    """What ``gpus_per_node=2`` does on a GPU node, on this CPU node: two gloo replicas of one run in one job."""
    run = ["--epochs", "3", "--set", "model.hidden=16", "--dataset", "digits", "--quiet"]
    subprocess.run(
        _bench(
            tmp_path / "b",
            "--methods",
            "erm",
            "--seeds",
            "1",
            "--epochs",
            "3",
            "--launcher",
            "slurm",
            "--poll",
            "0.5",
            "--slurm",
            "replicas_per_node=2",
            "--slurm",
            f"cpus_per_task={os.cpu_count()}",
        ),
        check=True,
        capture_output=True,
    )
    port = slurm_cluster._free_port()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc-per-node=2",
            f"--master-port={port}",
            "-m",
            "advreg.cli",
            "train",
            *run,
            "--out",
            str(tmp_path / "direct"),
        ],
        check=True,
        capture_output=True,
    )
    on_slurm, direct = (
        json.loads((f / "metrics.json").read_text()) for f in (tmp_path / "b/runs/erm/seed0", tmp_path / "direct")
    )
    assert on_slurm["world_size"] == 2
    assert {k: v for k, v in on_slurm.items() if "seconds" not in k} == {
        k: v for k, v in direct.items() if "seconds" not in k
    }


def test_collect_writes_the_tables_from_the_finished_runs_and_says_how_many_are_missing(tmp_path, capsys):
    out = tmp_path / "b"
    cli.main(["bench", "--methods", "erm", "--seeds", "2", "--epochs", "2", *QUICK, "--out", str(out), "--jobs", "1"])
    whole = capsys.readouterr().out
    (out / "runs/erm/seed1/metrics.json").unlink()
    cli.main(["bench", "--collect", str(out)])
    printed, err = capsys.readouterr()
    assert err == "advreg: 1 of 2 runs are not finished yet; collect again when they are\n"
    assert [r["error"] for r in _results(out)] == ["", "not finished yet"] and "| 1/2 |" in printed
    assert printed.splitlines()[0] == whole.splitlines()[0]  # the bench's own title, from bench.json


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "--collect", "."], "has no bench.json, so it is not a bench folder"),
        (["bench", "--methods", "erm", "--out", "x", "--slurm", "time=5"], "--slurm and --no-wait go with --launcher"),
        (["bench", "--methods", "erm"], "advreg bench needs --out"),
    ],
)
def test_bench_launcher_bad_input_is_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and words in err and err.count("\n") == 1


def test_without_slurm_commands_the_slurm_launcher_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ValueError, match=r"commands on PATH \(missing: sbatch, squeue, scontrol\)"):
        launchers.check_available()


@pytest.mark.parametrize(
    "items, words",
    [
        (["gpu=1"], "--slurm expects KEY=VALUE with KEY one of partition"),
        (["time=soon"], "--slurm time takes a int"),
        (["gpus_per_node=0"], "--slurm gpus_per_node must be positive"),
    ],
)
def test_bad_slurm_settings_are_one_line(items, words):
    with pytest.raises(ValueError, match=words):
        launchers.parse_slurm(items)


def test_slurm_settings_map_to_submitit_and_a_run_with_several_gpus_runs_under_torchrun():
    parameters = launchers.parse_slurm(
        [
            "partition=gpu",
            "time=90",
            "nodes=2",
            "gpus_per_node=4",
            "mem_gb=32",
            "slurm_additional_parameters.reservation=r1",
        ]
    )
    assert parameters == {
        "slurm_partition": "gpu",
        "timeout_min": 90,
        "nodes": 2,
        "gpus_per_node": 4,
        "mem_gb": 32.0,
        "slurm_additional_parameters": {"reservation": "r1"},
    }
    assert launchers.cost(10, parameters) == "10 Slurm job(s) × 8 GPU(s) × at most 90 min = at most 120.0 GPU-hours"
    job = launchers.RunJob(None, "/b/runs/erm/seed0", nodes=2, per_node=4)
    command = launchers.torchrun_command(job, "node7", "4242_3", "/b/runs/erm/.seed0.config.json")
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=4",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node7:22423",
        "--rdzv-id=4242_3",
        "-m",
        "advreg.launchers",
        "/b/runs/erm/seed0",
        "/b/runs/erm/.seed0.config.json",
    ]
