"""The run folder (advreg.runs): a kill or Ctrl-C at each moment of a run loses nothing and resumes bit for bit, one
process writes a folder at a time, and a corrupt or foreign file is one line ``advreg: error:``, never a traceback."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from advreg import cli
from advreg.runs import LOCK, RunFolder

ARGS = [
    "train",
    "--method",
    "amp",
    "--epochs",
    "3",
    "--quiet",
    "--set",
    "model.hidden=32",
    "--set",
    "optim.batch_size=100",
    "--set",
    "data.train_fraction=0.25",
    "--set",
    "robust.margin_samples=50",
]  # 9 steps an epoch
EPOCHS = 3
TRACKED = [*ARGS, "--set", "robust.track=true", "--set", "robust.steps=2"]  # best.pt after an epoch that improves

# A child `advreg train` whose atomic writer, at the COUNT-th write of file NAME, does ACTION: "mid" (half the
# temporary file written, then SIGKILL), "kill" (the file written, then SIGKILL), "interrupt" (written, then
# SIGINT: Ctrl-C) or "pause" (written, then it touches PAUSED and sleeps, holding the folder's lock).
CHILD = r"""
import os, signal, sys, time
from pathlib import Path
import advreg.io as io

name, action, count, paused, *argv = sys.argv[1:]
real, seen = io.atomic_write_bytes, [0]

def hooked(path, data):
    path = Path(path)
    seen[0] += path.name == name
    if path.name != name or seen[0] != int(count):
        return real(path, data)
    if action == "mid":
        io.temp_path(path).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
    if action == "pause":
        Path(paused).touch()
        time.sleep(120)
    os.kill(os.getpid(), signal.SIGINT if action == "interrupt" else signal.SIGKILL)

io.atomic_write_bytes = hooked
from advreg import cli
cli.main(argv)
"""

# Ctrl-C just as torch begins to load, while `python -m advreg.cli` starts.
STARTUP = r"""
import os, runpy, signal, sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
sys.argv = ["advreg", *sys.argv[1:]]
runpy.run_module("advreg.cli", run_name="__main__", alter_sys=True)
"""


pytestmark = pytest.mark.usefixtures("data_cache")  # conftest.py: one cache for the module


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run that every interrupted one must match."""
    out = tmp_path_factory.mktemp("whole") / "run"
    cli.main([*ARGS, "--out", str(out)])
    return out


def python(*args, timeout=300):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture(scope="module")
def whole_tracked(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole_tracked") / "run"
    cli.main([*TRACKED, "--out", str(out)])
    return out


def child(out, name, action, count, paused="", args=ARGS):
    return [sys.executable, "-c", CHILD, name, action, str(count), str(paused), *args, "--out", str(out)]


def outcome(folder):
    """Metrics and history without the timing, and the final weights."""
    metrics = {k: v for k, v in json.loads((folder / "metrics.json").read_text()).items() if "seconds" not in k}
    history = [row.rsplit(",", 1)[0] for row in (folder / "history.csv").read_text().splitlines()]  # seconds: last
    weights = torch.load(folder / "checkpoint.pt", weights_only=True)["model"]
    return metrics, history, weights


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_run(folder, whole):
    (metrics, history, weights), (metrics0, history0, weights0) = outcome(folder), outcome(whole)
    assert metrics == metrics0 and history == history0 and len(history) == EPOCHS + 1
    assert same_weights(weights, weights0)
    config, config0 = (json.loads((f / "config.json").read_text()) for f in (folder, whole))
    assert config == config0


def one_error_line(stderr, *words):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advreg: error:") and "Traceback" not in stderr, stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "name, action, count, left",
    [
        ("config.json", "mid", 1, 0),  # only .config.json.tmpPID (and the lock) left: a fresh start
        ("checkpoint.pt", "mid", 2, 1),  # epoch 2's checkpoint half written: the resume redoes epoch 2
        ("checkpoint.pt", "kill", 2, 2),  # right after a checkpoint, before its history row
        ("checkpoint.pt", "kill", EPOCHS, EPOCHS),  # after the last checkpoint: no epoch left, history one row short
        ("history.csv", "mid", EPOCHS, EPOCHS),
        ("metrics.json", "mid", 1, EPOCHS),  # every epoch done, metrics.json half written
    ],
)
def test_a_kill_at_each_moment_resumes_to_the_uninterrupted_run(tmp_path, whole, name, action, count, left):
    out = tmp_path / "run"
    killed = subprocess.run(child(out, name, action, count), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] if (out / "checkpoint.pt").exists() else 0
    assert saved == left and not (out / "metrics.json").exists()
    if action == "mid":
        assert [p.name for p in out.iterdir() if p.name.startswith(f".{name}.tmp")]  # the kill left it
    cli.main([*ARGS, "--out", str(out), "--resume"])
    assert_same_run(out, whole)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [LOCK]  # stale temp files removed


@pytest.mark.parametrize("action", ["mid", "kill"])
def test_a_kill_as_best_pt_is_written_resumes_to_the_uninterrupted_run(tmp_path, whole_tracked, action):
    out = tmp_path / "run"  # epoch 1 always writes best.pt; the kill comes before epoch 1's checkpoint
    assert subprocess.run(child(out, "best.pt", action, 1, args=TRACKED), timeout=300).returncode == -signal.SIGKILL
    assert not (out / "checkpoint.pt").exists()
    cli.main([*TRACKED, "--out", str(out), "--resume"])
    assert_same_run(out, whole_tracked)
    best, best0 = (torch.load(f / "best.pt", weights_only=True) for f in (out, whole_tracked))
    assert best["epoch"] == best0["epoch"] and same_weights(best["model"], best0["model"])
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == best0["epoch"]


def test_a_killed_first_write_also_starts_afresh_without_resume(tmp_path, whole):
    out = tmp_path / "run"
    assert subprocess.run(child(out, "config.json", "mid", 1), timeout=300).returncode == -signal.SIGKILL
    cli.main([*ARGS, "--out", str(out)])
    assert_same_run(out, whole)


def test_ctrl_c_after_an_epoch_is_one_line_and_130_and_resumes(tmp_path, whole):
    out = tmp_path / "run"
    stopped = subprocess.run(child(out, "checkpoint.pt", "interrupt", 1), capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 130
    one_error_line(stopped.stderr, "interrupted", "--resume")
    cli.main([*ARGS, "--out", str(out), "--resume"])
    assert_same_run(out, whole)


def test_ctrl_c_while_starting_is_one_line_and_130(tmp_path):
    stopped = python("-c", STARTUP, *ARGS, "--out", str(tmp_path / "run"))
    assert stopped.returncode == 130
    one_error_line(stopped.stderr, "interrupted")
    assert not (tmp_path / "run").exists()


def test_one_writer_per_folder_and_the_kernel_frees_a_killed_one(tmp_path, whole):
    out, paused = tmp_path / "run", tmp_path / "paused"
    first = subprocess.Popen(
        child(out, "checkpoint.pt", "pause", 1, paused), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 240
        while not paused.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert paused.exists(), "the first run never reached its first checkpoint"
        second = python("-m", "advreg.cli", *ARGS, "--out", str(out), "--resume")
        assert second.returncode == 2
        one_error_line(second.stderr, str(out), "in use")
    finally:
        first.kill()
        first.wait(timeout=60)
    cli.main([*ARGS, "--out", str(out), "--resume"])  # the kill released the lock
    assert_same_run(out, whole)


def test_evaluate_takes_the_lock_and_resume_keeps_its_keys(tmp_path, whole, capsys):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    with RunFolder(out):
        expect_error(capsys, ["evaluate", str(out), "--attacks", "fgsm"], 2, "in use")
    cli.main(["evaluate", str(out), "--attacks", "fgsm"])
    evaluated = json.loads((out / "metrics.json").read_text())
    assert "test_error_fgsm" in evaluated and "test_error_fgsm" not in json.loads((whole / "metrics.json").read_text())
    cli.main([*ARGS, "--out", str(out), "--resume"])
    assert json.loads((out / "metrics.json").read_text()) == evaluated


def expect_error(capsys, argv, status, *words):
    """``cli.main(argv)`` ends with ``status`` and one line, and no warning comes before it."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exit_info:
        warnings.simplefilter("always")
        cli.main(argv)
    assert exit_info.value.code == status
    assert not caught, [str(w.message) for w in caught]
    return one_error_line(capsys.readouterr().err, *words)


class Evil:
    def __reduce__(self):  # unpickling would create the file named by MARKER
        return (Path.touch, (Path(os.environ["ADVREG_TEST_MARKER"]),))


def checkpoint_of(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=True)


def save_checkpoint_with(**changes):
    def corrupt(folder):
        state = checkpoint_of(folder)
        state.update(changes)
        torch.save(state, folder / "checkpoint.pt")

    return corrupt


def without_seconds(folder):
    state = checkpoint_of(folder)
    del state["history"][-1]["seconds"]
    torch.save(state, folder / "checkpoint.pt")


def wrong_shape(folder):
    state = checkpoint_of(folder)
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(3, 3)
    torch.save(state, folder / "checkpoint.pt")


def foreign_optimizer(folder):
    state = checkpoint_of(folder)
    params = [torch.nn.Parameter(v.clone()) for v in state["model"].values() if v.is_floating_point()]
    state["optimizer"] = torch.optim.Adam(params).state_dict()
    torch.save(state, folder / "checkpoint.pt")


def wrong_momentum(folder):
    state = checkpoint_of(folder)
    entry = next(iter(state["optimizer"]["state"].values()))
    entry["momentum_buffer"] = torch.zeros(7)
    torch.save(state, folder / "checkpoint.pt")


def edited_config(folder):  # the config.json of seed 1 beside seed 0's checkpoint, resumed with --seed 1
    config = json.loads((folder / "config.json").read_text())
    config["seed"] = 1
    (folder / "config.json").write_text(json.dumps(config))


def write(name, content):
    def corrupt(folder):
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return corrupt


def config_folder(folder):
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def drop_metric(folder):
    metrics = json.loads((folder / "metrics.json").read_text())
    del metrics["test_error"]
    (folder / "metrics.json").write_text(json.dumps(metrics))


def drop_column(folder):
    lines = (folder / "history.csv").read_text().splitlines()
    (folder / "history.csv").write_text("\n".join(line.replace("test_error", "test_err") for line in lines))


RESUME = [*ARGS, "--out", "{run}", "--resume"]


@pytest.mark.parametrize(
    "corrupt, argv, status, words",
    [
        (lambda f: torch.save(torch.zeros(3), f / "checkpoint.pt"), RESUME, 2, ["checkpoint.pt", "holds a Tensor"]),
        (lambda f: torch.save([1, 2], f / "checkpoint.pt"), RESUME, 2, ["holds a list"]),
        (lambda f: torch.save({"model": {}}, f / "checkpoint.pt"), RESUME, 2, ["lacks epoch"]),
        (save_checkpoint_with(history=[]), RESUME, 2, ["epoch and history disagree"]),
        (save_checkpoint_with(rng={}), RESUME, 2, ["rng"]),
        (save_checkpoint_with(rng={"torch": torch.zeros(2), "loader": None}), RESUME, 2, ["random state"]),
        (without_seconds, RESUME, 2, ["history row", "seconds"]),
        (save_checkpoint_with(scheduler={"last_epoch": "x"}), RESUME, 2, ["schedule", "milestones"]),
        (wrong_shape, RESUME, 2, ["do not fit the model", "size mismatch"]),
        (foreign_optimizer, RESUME, 2, ["optimizer", "lacks"]),
        (wrong_momentum, RESUME, 2, ["does not fit its shape"]),
        (write("checkpoint.pt", b"PK\x03\x04 truncated"), RESUME, 2, ["corrupt"]),
        (
            write("checkpoint.pt", pickle.dumps({"a": [1]}, protocol=4)),
            RESUME,
            2,
            ["weights_only", "arbitrary code execution", "trusted source"],
        ),  # a pickle torch refuses: its advice in full
        (write("config.json", "[1, 2]"), RESUME, 2, ["config.json", "not an object"]),
        (write("config.json", b"\xff\xfe{}"), RESUME, 2, ["config.json", "UTF-8"]),
        (config_folder, RESUME, 2, ["config.json", "is a folder"]),
        (edited_config, [*RESUME, "--seed", "1"], 2, ["checkpoint.pt", "different configuration"]),
        (write("metrics.json", "[]"), RESUME, 2, ["metrics.json", "not an object"]),
        (drop_metric, ["report", "{run}", "--out", "{tmp}/report"], 2, ["metrics.json", "test_error"]),
        (drop_column, ["report", "{run}", "--out", "{tmp}/report"], 2, ["history.csv", "test_error"]),
        (write("config.json", '{"seed": 0}'), ["report", "{run}", "--out", "{tmp}/report"], 2, ["config.json"]),
        (wrong_shape, ["evaluate", "{run}", "--attacks", "fgsm"], 2, ["do not fit the model"]),
        (
            lambda f: torch.save(torch.zeros(3), f / "checkpoint.pt"),
            ["analyze", "curves", "{run}", "--out", "{tmp}/a"],
            0,
            [],
        ),  # curves reads history.csv only
    ],
)
def test_a_corrupt_run_folder_is_one_line(tmp_path, whole, capsys, corrupt, argv, status, words):
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    corrupt(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    if status == 0:
        cli.main(argv)
    else:
        expect_error(capsys, argv, status, *words)
    assert before == {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}  # nothing lost or rewritten


def test_a_malicious_checkpoint_never_runs_and_the_line_keeps_torchs_advice(tmp_path, whole, monkeypatch):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(whole, run)
    monkeypatch.setenv("ADVREG_TEST_MARKER", str(marker))
    torch.save({**checkpoint_of(run), "model": Evil()}, run / "checkpoint.pt")
    for argv in ([*ARGS, "--out", str(run), "--resume"], ["evaluate", str(run)]):
        done = python("-m", "advreg.cli", *argv)
        assert done.returncode == 2 and not marker.exists()
        line = one_error_line(done.stderr, "checkpoint.pt", "weights_only", "trusted source")
        assert "arbitrary code execution" in line


@pytest.mark.parametrize(
    "command",
    [
        [*ARGS, "--out", "{out}"],
        ["bench", "--methods", "erm", "--seeds", "1", "--epochs", "1", "--quiet", "--out", "{out}"],
        ["analyze", "curves", "{whole}", "--out", "{out}"],
        ["report", "{whole}", "--out", "{out}"],
    ],
)
@pytest.mark.parametrize("out", ["file", "file/sub"])
def test_an_out_that_is_or_lies_under_a_file_is_one_line(tmp_path, whole, capsys, command, out):
    (tmp_path / "file").write_text("mine")
    argv = [a.format(out=tmp_path / out, whole=whole) for a in command]
    expect_error(capsys, argv, 2, str(tmp_path / "file"), "is a file")
    assert (tmp_path / "file").read_text() == "mine"


def test_resume_of_a_folder_that_does_not_exist_says_so(tmp_path, capsys):
    expect_error(capsys, [*ARGS, "--out", str(tmp_path / "nowhere"), "--resume"], 2, "does not exist", "--resume")
    assert not (tmp_path / "nowhere").exists()


def test_a_setting_refused_after_the_folder_is_made_leaves_no_config(tmp_path, capsys):
    out = tmp_path / "run"  # augmentation of 1-D data is refused while the run builds, after the folder exists
    expect_error(capsys, [*ARGS, "--out", str(out), "--set", "data.augment=standard"], 2, "data.augment")
    assert not (out / "config.json").exists()
    cli.main([*ARGS, "--out", str(out), "--epochs", "1"])  # the corrected command starts
    assert (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "code, status, words", [(28, 1, "no space left"), (30, 1, "cannot write"), (13, 1, "cannot write")]
)  # ENOSPC, EROFS, EACCES
def test_a_full_or_read_only_disk_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, whole, capsys, monkeypatch, code, status, words
):
    import advreg.io

    out, opened = tmp_path / "run", []

    def failing_open(path, mode="r", *args, **kwargs):  # the second checkpoint's temporary file fails as the disk would
        handle = open(path, mode, *args, **kwargs)
        opened.append(Path(path).name.startswith(".checkpoint.pt.tmp"))
        if sum(opened) == 2 and opened[-1]:
            handle.close()
            raise OSError(code, os.strerror(code))  # as a write to a full disk: no file name
        return handle

    monkeypatch.setattr(advreg.io, "open", failing_open, raising=False)  # atomic_write_bytes's open, only
    expect_error(capsys, [*ARGS, "--out", str(out)], status, str(out / "checkpoint.pt"), words)
    assert checkpoint_of(out)["epoch"] == 1 and not [p for p in out.iterdir() if ".tmp" in p.name]
    monkeypatch.undo()
    cli.main([*ARGS, "--out", str(out), "--resume"])
    assert_same_run(out, whole)


def test_only_advregs_own_leftovers_make_a_folder_fresh(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".notes.txt.tmp12").write_text("mine")  # hidden and temporary-looking, but not advreg's
    expect_error(capsys, [*ARGS, "--out", str(out)], 2, "not empty and holds no advreg run")
    assert sorted(p.name for p in out.iterdir()) == [".notes.txt.tmp12"]  # nothing added to someone else's folder
