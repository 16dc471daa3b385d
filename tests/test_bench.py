"""``advreg bench``: the plan, validation-only selection, resumption, and its files."""

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advreg import bench, cli
from advreg.config import TrainConfig


def _plan(methods, grid, seeds=1, settings=()):
    return bench.plan(TrainConfig(epochs=1), methods, seeds, list(settings), bench.parse_grid(grid), Path("/b"))


def test_grid_keys_tune_only_the_methods_that_own_them():
    specs = _plan(
        ["erm", "label_smoothing", "amp"],
        ["loss.smoothing=0.1,0.2", "amp.epsilon=0.1,0.5,1", "optim.lr=0.05,0.1"],
        seeds=2,
    )
    points = {(s.method, s.point) for s in specs}
    assert {p for m, p in points if m == "erm"} == {("optim.lr=0.05",), ("optim.lr=0.1",)}
    assert len({p for m, p in points if m == "label_smoothing"}) == 4
    assert len({p for m, p in points if m == "amp"}) == 6
    assert len(specs) == 2 * (2 + 4 + 6)
    amp = next(s for s in specs if s.method == "amp" and s.point[0] == "amp.epsilon=0.5")
    assert amp.config.amp.epsilon == 0.5 and amp.config.stages.perturbation == "amp"
    assert {s.folder.parent.name for s in specs if s.method == "amp"} >= {"amp__amp.epsilon=0.5__optim.lr=0.1"}


def _row(method, point, seed, val, test):
    return {
        "method": method,
        "point": point,
        "seed": seed,
        "folder": f"/b/{method}{point}/{seed}",
        "error": "",
        "test_error": test,
        "test_nll": test / 10,
        "test_ece": 1.0,
        "val_error": val,
        "val_nll": 0.5,
        "train_error": 0.0,
        "seconds_per_epoch": 1.0 if method == "erm" else 2.0,
    }


def test_selection_uses_validation_only_and_the_summary_reports_that_point():
    rows = [_row("amp", "amp.epsilon=0.1", s, val=20, test=10) for s in range(3)]  # best test, worse val
    rows += [_row("amp", "amp.epsilon=0.5", s, val=15, test=30) for s in range(3)]
    rows += [_row("erm", "", s, val=25, test=25 + s) for s in range(3)]
    chosen = bench.select(rows)
    assert chosen == {"amp": "amp.epsilon=0.5", "erm": ""}
    summary = bench.summarize(rows, chosen, "title")
    amp_line = next(line for line in summary.splitlines() if line.startswith("| amp"))
    assert "30.00 ± 0.00" in amp_line and "10.00" not in amp_line and "amp.epsilon=0.5" in amp_line
    assert "| 2.00 |" in amp_line  # time relative to ERM
    erm_line = next(line for line in summary.splitlines() if line.startswith("| erm"))
    assert "**26.00 ± 1.00**" in erm_line  # best mean test error in bold


def test_a_failed_run_never_wins_the_selection():
    rows = [_row("amp", "amp.epsilon=9", 0, val=1, test=1), _row("amp", "amp.epsilon=0.1", 0, val=30, test=30)]
    rows[0].update(error="diverged", val_error=None)
    assert bench.select(rows) == {"amp": "amp.epsilon=0.1"}


def test_bench_cli_writes_its_files_and_resumes_without_retraining(tmp_path, capsys):
    out = tmp_path / "b"
    argv = [
        "bench",
        "--dataset",
        "digits",
        "--methods",
        "erm,amp",
        "--seeds",
        "2",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--set",
        "model.hidden=16",
        "--grid",
        "amp.epsilon=0.05,0.5",
        "--jobs",
        "2",
        "--quiet",
    ]
    cli.main(argv)
    printed = capsys.readouterr().out
    assert "| erm |" in printed and "| amp |" in printed
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 + 2 * 2
    assert {r["selected"] for r in rows if r["method"] == "erm"} == {"True"}
    assert sum(r["selected"] == "True" for r in rows if r["method"] == "amp") == 2  # one point, both seeds
    assert (out / "summary.md").read_text() == printed
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json")}
    assert len(stamps) == 6
    cli.main(argv)  # everything is finished: read back, nothing retrained
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json")} == stamps
    assert capsys.readouterr().out == printed
    with pytest.raises(SystemExit) as exit_info:  # same folder, other settings: refused, not read back
        cli.main([*argv[: argv.index("--epochs") + 1], "3", *argv[argv.index("--epochs") + 2 :]])
    assert exit_info.value.code == 2 and "epochs: 2 there, 3 here" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "--methods", "erm,nope", "--out", "x"], "unknown method"),
        (["bench", "--methods", "erm", "--grid", "amp.epsilon", "--out", "x"], "--grid expects"),
        (["bench", "--methods", "erm", "--seeds", "0", "--out", "x"], "--seeds"),
        (["bench", "--methods", "amp", "--grid", "amp.epsilon=-1,0.1", "--out", "x"], "epsilon must be"),
    ],
)
def test_bench_bad_input_is_one_line(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("advreg: error:") and words in err and "\n" not in err
    assert not (tmp_path / "x").exists()


BAD_NUMBERS = [
    (["--set", f"{key}={text}"], f"{key} must be a finite number")
    for key in ("optim.lr", "optim.weight_decay", "optim.lr_decay", "amp.epsilon", "loss.flooding")
    for text in ("nan", "inf", "-inf", "1e400", "1e39")
]
BAD_NUMBERS += [
    (["--set", "optim.milestones=0.5,inf"], "optim.milestones must be a finite number"),
    (["--grid", "amp.epsilon=0.1,nan"], "amp.epsilon must be a finite number"),
    (["--variant", "big=amp:amp.inner_lr=1e400"], "amp.inner_lr must be a finite number"),
]


BAD_COMMANDS = [(command, *case) for command in ("train", "bench") for case in BAD_NUMBERS[:-2]]
BAD_COMMANDS += [("bench", *case) for case in BAD_NUMBERS[-2:]]
BAD_COMMANDS += [
    ("train", ["--seed", str(2**64)], "seed must be in [-2**63, 2**63 - 1]"),
    ("train", ["--seed", str(-(2**63) - 1)], "seed must be in"),
    ("bench", ["--jobs", "0"], "--jobs must be >= 1"),
    ("bench", ["--jobs", "-3"], "--jobs must be >= 1"),
    ("bench", ["--seeds", "0"], "--seeds must be >= 1"),
    ("bench", ["--seeds", str(2**63 + 1)], "at most 2**63"),
]


@pytest.mark.parametrize("command, extra, words", BAD_COMMANDS)
def test_bad_numbers_are_refused_up_front_in_one_line(capsys, tmp_path, monkeypatch, command, extra, words):
    monkeypatch.chdir(tmp_path)
    method = ["--method", "amp"] if command == "train" else ["--methods", "erm,amp"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, *method, "--out", "x", "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("advreg: error:") and "\n" not in err
    assert words in err and not (tmp_path / "x").exists()


def test_a_run_given_twice_is_planned_once():
    def runs(methods, grid, seeds=1):
        return [(s.method, s.point, s.seed) for s in _plan(methods, grid, seeds)]

    assert runs(["amp"], ["amp.epsilon=0.1,0.1"]) == [("amp", ("amp.epsilon=0.1",), 0)]
    assert runs(["amp"], ["amp.epsilon=0.1,0.10,1e-1"], seeds=2) == [
        ("amp", ("amp.epsilon=0.1",), 0),
        ("amp", ("amp.epsilon=0.1",), 1),
    ]
    assert runs(["amp"], ["amp.epsilon=0.1", "amp.epsilon=0.5,0.1"]) == [
        ("amp", ("amp.epsilon=0.1",), 0),
        ("amp", ("amp.epsilon=0.5",), 0),
    ]
    assert runs(["erm", "amp", "erm"], []) == [("erm", (), 0), ("amp", (), 0)]
    twice = [bench.parse_variant("a=amp:amp.epsilon=0.2"), bench.parse_variant("a=amp:amp.epsilon=0.20")]
    assert runs(twice, []) == [("a", (), 0)]
    assert runs([bench.parse_variant("m=amm:amm.lam=8|8.0|32")], []) == [
        ("m", ("amm.lam=8",), 0),
        ("m", ("amm.lam=32",), 0),
    ]
    assert runs(["amp", bench.Variant("amp", "amp", ("amp.epsilon=0.5",))], []) == [("amp", (), 0)]  # the default
    with pytest.raises(ValueError, match="share a name"):  # one label, two settings: which one is meant?
        _plan([bench.parse_variant("a=amp:amp.epsilon=0.2"), bench.parse_variant("a=amp:amp.epsilon=0.3")], [])


def test_bench_cli_trains_and_lists_a_repeated_run_once(tmp_path, capsys):
    out = tmp_path / "twice"
    cli.main(
        [
            "bench",
            "--dataset",
            "digits",
            "--methods",
            "amp,amp",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--set",
            "model.hidden=8",
            "--grid",
            "amp.epsilon=0.1,0.10,0.1",
            "--jobs",
            "2",
            "--quiet",
        ]
    )
    assert [r["point"] for r in csv.DictReader((out / "results.csv").open())] == ["amp.epsilon=0.1"]
    assert [p.name for p in (out / "runs").iterdir()] == ["amp__amp.epsilon=0.1"]
    assert capsys.readouterr().out.count("| amp |") == 1


def test_bench_attacks_adds_robust_columns_and_keeps_them_on_rerun(tmp_path, capsys):
    out = tmp_path / "robust"
    argv = [
        "bench",
        "--dataset",
        "digits",
        "--methods",
        "erm,amp",
        "--seeds",
        "1",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--set",
        "model.hidden=16",
        "--attacks",
        "fgsm,pgd",
        "--jobs",
        "2",
        "--quiet",
    ]
    cli.main(argv)
    printed = capsys.readouterr().out
    assert "FGSM white-box error (%)" in printed and "PGD white-box error (%)" in printed
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert all(float(r["test_error_pgd"]) >= float(r["test_error"]) for r in rows)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json")}
    cli.main(argv)  # finished and evaluated: nothing is redone, the robust errors stay
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json")} == stamps
    assert capsys.readouterr().out == printed


def test_bench_attack_source_adds_black_box_columns(tmp_path, capsys):
    source = tmp_path / "erm_source"
    cli.main(
        [
            "train",
            "--dataset",
            "digits",
            "--seed",
            "100",
            "--epochs",
            "2",
            "--out",
            str(source),
            "--quiet",
            "--set",
            "model.hidden=16",
        ]
    )
    out = tmp_path / "bb"
    cli.main(
        [
            "bench",
            "--dataset",
            "digits",
            "--methods",
            "mixup",
            "--seeds",
            "1",
            "--epochs",
            "2",
            "--out",
            str(out),
            "--set",
            "model.hidden=16",
            "--attacks",
            "pgd",
            "--attack-source",
            str(source),
            "--jobs",
            "1",
            "--quiet",
        ]
    )
    assert "PGD black-box error (%)" in capsys.readouterr().out
    row = next(csv.DictReader((out / "results.csv").open()))
    assert float(row["test_error_pgd_transfer"]) >= 0
    with pytest.raises(SystemExit):
        cli.main(["bench", "--methods", "erm", "--out", str(tmp_path / "x"), "--attack-source", str(source)])


def test_variants_are_rows_with_fixed_settings_tuned_by_their_method_grid():
    avg = bench.parse_variant("avg_lin=amm:amm.aggregation=avg;amm.shrinkage=lin;optim.milestones=0.5,0.8")
    assert avg == bench.Variant(
        "avg_lin", "amm", ("amm.aggregation=avg", "amm.shrinkage=lin", "optim.milestones=0.5,0.8")
    )
    specs = bench.plan(TrainConfig(epochs=1), ["erm", avg], 1, [], {"amm.lam": ["1", "4"]}, Path("/b"))
    assert [(s.method, s.point) for s in specs] == [
        ("erm", ()),
        ("avg_lin", ("amm.lam=1",)),
        ("avg_lin", ("amm.lam=4",)),
    ]
    config = specs[1].config
    assert config.method == "amm" and config.amm.aggregation == "avg" and config.amm.lam == 1
    assert config.optim.milestones == (0.5, 0.8)
    assert specs[1].folder == Path("/b/runs/avg_lin__amm.lam=1/seed0")
    with pytest.raises(ValueError, match="share a name"):
        bench.plan(TrainConfig(), ["erm", bench.Variant("erm", "amp")], 1, [], {}, Path("/b"))
    for bad in ("no_method", "x=nope", "a b=amm"):
        with pytest.raises(ValueError, match="--variant"):
            bench.parse_variant(bad)


def test_a_variant_grid_is_chosen_per_row_and_overrides_the_shared_grid_for_its_key():
    row = bench.parse_variant("min_exp=amm:amm.lam=8|32;amm.c=2")
    assert row == bench.Variant("min_exp", "amm", ("amm.c=2",), (("amm.lam", ("8", "32")),))
    specs = bench.plan(
        TrainConfig(epochs=1), ["erm", row, bench.Variant("plain", "amm")], 2, [], {"amm.lam": ["1"]}, Path("/b")
    )
    points = {(s.method, s.point) for s in specs}
    assert points == {("erm", ()), ("min_exp", ("amm.lam=8",)), ("min_exp", ("amm.lam=32",)), ("plain", ("amm.lam=1",))}
    assert len(specs) == 2 * len(points)
    lam32 = next(s for s in specs if s.point == ("amm.lam=32",))
    assert lam32.config.amm.lam == 32 and lam32.config.amm.c == 2
    assert lam32.folder.parent.name == "min_exp__amm.lam=32"
    rows = [
        {"method": s.method, "point": " ".join(s.point), "val_error": 10.0 if "=32" in " ".join(s.point) else 20.0}
        for s in specs
    ]
    assert bench.select(rows)["min_exp"] == "amm.lam=32"
    for bad in ("x=amm:amm.lam=8|", "x=amm:=1|2"):
        with pytest.raises(ValueError, match="V1\\|V2"):
            bench.parse_variant(bad)


def test_adversarial_training_rows_are_chosen_by_the_best_checkpoints_validation_robust_error():
    rows = [
        {"method": "at_awp", "point": p, "val_error": clean, "best_val_robust_error": robust}
        for p, clean, robust in (("awp.gamma=0.01", 10.0, 50.0), ("awp.gamma=0.005", 20.0, 40.0))
    ]
    rows.append({"method": "erm", "point": "", "val_error": 5.0, "best_val_robust_error": None})
    assert bench.select(rows) == {"at_awp": "awp.gamma=0.005", "erm": ""}
    at = [
        {
            **_row("at", "", s, val=30, test=30),
            "best_test_error": 31.0,
            "best_test_robust_error": 50.0 + s,
            "last_test_robust_error": 60.0,
            "robust_gap": 12.0,
            "best_val_robust_error": 49.0,
        }
        for s in range(2)
    ]
    summary = bench.summarize(at, {"at": ""}, "title")
    header, _, line = summary.splitlines()[2:5]
    assert "Best: PGD error (%)" in header and "Last: PGD error (%)" in header and "robust gap" in header
    assert "50.50 ± 0.71" in line and "60.00 ± 0.00" in line and "12.00 ± 0.00" in line


def _bench_command(out, epochs, jobs):
    return [
        sys.executable,
        "-m",
        "advreg.cli",
        "bench",
        "--dataset",
        "digits",
        "--methods",
        "erm",
        "--seeds",
        "2",
        "--epochs",
        str(epochs),
        "--set",
        "model.hidden=16",
        "--jobs",
        str(jobs),
        "--quiet",
        "--out",
        str(out),
    ]


def _children(pid):
    """The processes whose parent is ``pid``, read from /proc: the workers, and multiprocessing's resource tracker."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _alive(pid):
    """Running (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _wait_until(condition, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _results(out):
    """results.csv without what differs between two benches of the same runs: folders and timings."""
    return [
        {k: v for k, v in row.items() if k not in ("folder", "seconds_per_epoch")}
        for row in csv.DictReader((out / "results.csv").open())
    ]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_a_bench_killed_by_sigkill_takes_its_workers_with_it_and_a_rerun_finishes_it_identically(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    parent = subprocess.Popen(_bench_command(killed, 25, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_until(lambda: (killed / "runs/erm/seed0/history.csv").exists())  # a worker is training
    workers = _children(parent.pid)
    parent.kill()
    parent.wait()
    assert len(workers) >= 2 and not (killed / "runs/erm/seed0/metrics.json").exists()  # killed mid-run
    _wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=5.0)
    rerun = subprocess.run(_bench_command(killed, 25, 2), capture_output=True, text=True, check=False)
    assert rerun.returncode == 0 and rerun.stderr == ""
    subprocess.run(_bench_command(whole, 25, 2), check=True, capture_output=True)
    assert _results(killed) == _results(whole) and all(row["error"] == "" for row in _results(whole))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_a_worker_killed_mid_run_fails_that_run_only_and_a_rerun_resumes_it(tmp_path):
    out = tmp_path / "b"
    parent = subprocess.Popen(_bench_command(out, 25, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until(lambda: (out / "runs/erm/seed0/history.csv").exists())  # one worker: the first run, seed 0
    [worker] = [pid for pid in _children(parent.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(worker, signal.SIGKILL)
    printed, err = parent.communicate(timeout=300)
    assert parent.returncode == 1 and "| erm |" in printed and "| 1/2 |" in printed
    assert err.startswith("advreg: error: 1 of 2 runs failed") and err.count("\n") == 1
    assert f"{out / 'runs/erm/seed0'}: its worker process was killed by SIGKILL" in err and "a rerun resumes it" in err
    rows = {r["seed"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert "SIGKILL" in rows["0"]["error"] and rows["0"]["test_error"] == ""
    assert rows["1"]["error"] == "" and float(rows["1"]["test_error"]) >= 0  # the bench went on
    rerun = subprocess.run(_bench_command(out, 25, 1), capture_output=True, text=True, check=False)
    assert rerun.returncode == 0 and rerun.stderr == ""
    assert all(r["error"] == "" for r in csv.DictReader((out / "results.csv").open()))


def test_without_the_parent_death_signal_a_worker_watches_its_parent():
    code = "import os, sys; from advreg.bench import watch_parent; watch_parent(int(sys.argv[1]), every=0.01)"
    orphaned = subprocess.run([sys.executable, "-c", code, "1"], timeout=60, check=False)  # 1 is not its parent
    assert orphaned.returncode == 1
    with pytest.raises(subprocess.TimeoutExpired):  # its parent lives: it watches on
        subprocess.run([sys.executable, "-c", code, str(os.getpid())], timeout=3, check=False)


def test_a_run_that_raises_fails_alone_and_the_bench_goes_on(tmp_path, capsys):
    out = tmp_path / "b"
    (out / "runs/erm/seed0").mkdir(parents=True)
    (out / "runs/erm/seed0/notes.txt").write_text("not a run")  # train refuses a folder that holds something else
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "bench",
                "--dataset",
                "digits",
                "--methods",
                "erm",
                "--seeds",
                "2",
                "--epochs",
                "1",
                "--out",
                str(out),
                "--set",
                "model.hidden=8",
                "--jobs",
                "1",
                "--quiet",
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert err.startswith(f"advreg: error: 1 of 2 runs failed ({out / 'runs/erm/seed0'}: RunFolderError: ")
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert "RunFolderError" in rows[0]["error"] and rows[1]["error"] == "" and float(rows[1]["test_error"]) >= 0
    # the advice of a bench, which has no --out per run: the run's folder, the stray file, and what to do
    assert (
        f"{out / 'runs/erm/seed0'} is not empty and holds no advreg run (it holds notes.txt); remove the stray "
        "files from it, or rerun the bench with another --out"
    ) in rows[0]["error"]
    assert "choose another --out" not in err
