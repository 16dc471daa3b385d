"""``advreg train`` as a user runs it: the run folder, resume after a kill, and one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from advreg import cli
from advreg.config import TrainConfig, override
from advreg.methods import resolve
from advreg.runs import LOCK
from advreg.train import train

FAST = ["--set", "model.hidden=32", "--set", "optim.batch_size=100"]


pytestmark = pytest.mark.usefixtures("data_cache")  # conftest.py: one cache for the module


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "advreg.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def without_time(metrics):
    return {k: v for k, v in metrics.items() if "seconds" not in k}


def test_train_amp_writes_the_run_folder(tmp_path):
    out = tmp_path / "amp0"
    result = run_cli(
        "train",
        "--dataset",
        "mnist1d",
        "--model",
        "mlp",
        "--method",
        "amp",
        "--seed",
        "0",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--quiet",
        *FAST,
        "--set",
        "amp.epsilon=0.3",
    )
    assert result.returncode == 0, result.stderr
    assert "test" in result.stdout and "error %" in result.stdout  # the closing table
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "amp" and config["amp"]["epsilon"] == 0.3 and config["epochs"] == 2
    assert config["code_version"]["advreg"] and config["code_version"]["torch"] == torch.__version__
    rows = (out / "history.csv").read_text().splitlines()
    assert rows[0].split(",") == [
        "epoch",
        "lr",
        "train_loss",
        "train_error",
        "val_loss",
        "val_error",
        "test_loss",
        "test_error",
        "seconds",
    ]
    assert len(rows) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_error", "test_nll", "test_ece", "val_error"):
        assert isinstance(metrics[key], float)
    assert 0 <= metrics["test_error"] <= 100 and metrics["test_nll"] > 0
    assert (out / "checkpoint.pt").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [LOCK]  # no temporary files left


def test_same_seed_same_numbers_different_seed_different(tmp_path):
    config = resolve(TrainConfig(method="amp", epochs=2), ["model.hidden=16", "optim.batch_size=200"])
    a = train(config, tmp_path / "a", progress=False)
    b = train(config, tmp_path / "b", progress=False)
    c = train(override(config, ["seed=1"]), tmp_path / "c", progress=False)
    assert without_time(a) == without_time(b)
    assert a["test_nll"] != c["test_nll"]


def test_a_killed_run_resumes_to_the_same_numbers(tmp_path):
    args = ["train", "--method", "amp", "--epochs", "6", "--quiet", *FAST]
    reference = run_cli(*args, "--out", str(tmp_path / "whole"))
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "advreg.cli", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    history = out / "history.csv"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:  # kill once two epochs are on disk
        if history.exists() and len(history.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "metrics.json").exists()

    resumed = run_cli(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert without_time(json.loads((out / "metrics.json").read_text())) == without_time(whole)
    strip = lambda text: [r.rsplit(",", 1)[0] for r in text.splitlines()]  # noqa: E731 (drop seconds)
    assert strip(history.read_text()) == strip((tmp_path / "whole" / "history.csv").read_text())


def test_resume_in_process_after_an_interruption(tmp_path, interrupted_then_resumed):
    config = resolve(
        TrainConfig(method="sam", epochs=4), ["model.hidden=16", "optim.batch_size=200", "model.dropout=0.1"]
    )
    whole = train(config, tmp_path / "whole", progress=False)
    assert without_time(interrupted_then_resumed(config)) == without_time(whole)


def expect_usage_error(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("advreg: error:") and "\n" not in err and "Traceback" not in err
    assert words in err
    return err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--method", "nope", "--out", "x"], "invalid choice: 'nope'"),
        (["train", "--dataset", "cifar9", "--out", "x"], "invalid choice: 'cifar9'"),
        (["train", "--model", "resnet1000", "--out", "x"], "invalid choice"),
        (["train", "--out", "x", "--set", "amp.epsilon"], "key=value"),
        (["train", "--out", "x", "--set", "amp.radius=1"], "unknown setting 'amp.radius'"),
        (["train", "--out", "x", "--set", "amp.epsilon=-1", "--method", "amp"], "epsilon must be"),
        (["train", "--out", "x", "--epochs", "0"], "epochs must be"),
        (["train"], "--out"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    expect_usage_error(capsys, argv, words)
    assert not (tmp_path / "x").exists()  # nothing written before the settings are known to be good


def test_out_folder_conflicts(capsys, tmp_path):
    out = str(tmp_path / "run")
    base = ["train", "--epochs", "1", "--out", out, "--quiet", *FAST]
    cli.main(base)
    capsys.readouterr()
    expect_usage_error(capsys, base, "--resume")  # same run again without --resume
    expect_usage_error(capsys, base + ["--seed", "3", "--resume"], "seed: 0 there, 3 here")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    expect_usage_error(capsys, ["train", "--out", str(tmp_path / "other")], "not empty")
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    expect_usage_error(capsys, base + ["--resume"], "corrupt")


def test_a_finished_run_resumed_reports_the_same_metrics(capsys, tmp_path):
    base = ["train", "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet", *FAST]
    cli.main(base)
    first = json.loads((tmp_path / "r" / "metrics.json").read_text())
    cli.main(base + ["--resume"])
    assert without_time(json.loads((tmp_path / "r" / "metrics.json").read_text())) == without_time(first)


def test_divergence_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "train",
                "--method",
                "amp",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "nan"),
                "--quiet",
                "--set",
                "optim.lr=1e30",
                "--set",
                "optim.momentum=0",
            ]
        )
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "not finite" in err or "became" in err
    assert "lr" in err and "Traceback" not in err


def test_digits_is_the_second_dataset(tmp_path):
    config = resolve(TrainConfig(method="amp", epochs=6), ["data.name=digits"])
    metrics = train(config, tmp_path / "digits", progress=False)
    assert metrics["test_error"] < 25  # 10 classes, chance is 90%; measured 12.0
    assert json.loads((tmp_path / "digits" / "config.json").read_text())["data"]["name"] == "digits"


def test_the_test_margin_is_over_the_first_samples_or_off(tmp_path):
    from advreg.evaluate import margin
    from advreg.robustness import load_run

    base = resolve(TrainConfig(epochs=1), ["data.name=digits", "model.hidden=8"])
    few = train(resolve(base, ["robust.margin_samples=50"]), tmp_path / "few", progress=False)
    _, data, model = load_run(tmp_path / "few")
    box = (data.train[0].min().item(), data.train[0].max().item())  # the data's input range
    assert few["test_margin"] == pytest.approx(margin(model, data.test[0][:50], box=box)["margin"])
    off = train(resolve(base, ["robust.margin_samples=0"]), tmp_path / "off", progress=False)
    assert "test_margin" not in off and "test_error" in off
