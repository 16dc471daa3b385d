"""``advreg analyze``: every kind from the command line on small runs, as a new user would run it.

The analyses' numbers are checked against references in test_analysis_landscape.py and test_analysis_figures.py;
here: the files, the printed cost, reproducibility for a seed, the runs left untouched, and clear errors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from advreg import cli
from advreg.analysis.commands import KINDS

SMALL = ["--set", "model.hidden=16,16", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two spiral runs (ERM, AMP) and a digits bench folder."""
    root = tmp_path_factory.mktemp("analyze")
    for method in ("erm", "amp"):
        cli.main(
            ["train", "--dataset", "spiral", "--method", method, "--epochs", "3", "--out", str(root / method), *SMALL]
        )
    cli.main(
        [
            "bench",
            "--dataset",
            "digits",
            "--methods",
            "erm",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--out",
            str(root / "bench"),
            "--set",
            "model.hidden=8",
            "--jobs",
            "1",
            "--quiet",
        ]
    )
    return root


def analyze(runs, kind, *args, inputs=("erm", "amp")):
    out = runs / f"out_{kind}"
    cli.main(["analyze", kind, *[str(runs / i) for i in inputs], "--out", str(out), "--quiet", *args])
    return out


@pytest.mark.parametrize(
    "kind, settings",
    [
        ("landscape", ["--set", "steps=5", "--set", "samples=50"]),
        ("awp-landscape", ["--set", "steps=3", "--set", "samples=30"]),
        ("radius", ["--set", "radii=0,0.5", "--set", "directions=2", "--set", "worst_steps=2", "--set", "samples=50"]),
        ("hessian", ["--set", "iterations=5", "--set", "probes=4", "--set", "samples=50"]),
        ("boundary", ["--set", "resolution=20"]),
        ("curves", []),
    ],
)
def test_each_kind_writes_its_figure_numbers_and_settings(runs, kind, settings, capsys):
    before = {m: (runs / m / "checkpoint.pt").read_bytes() for m in ("erm", "amp")}
    out = analyze(runs, kind, *settings)
    for ext in ("png", "npz", "json"):
        assert (out / f"{kind}.{ext}").stat().st_size > 0
    info = json.loads((out / f"{kind}.json").read_text())
    assert info["kind"] == kind and len(info["inputs"]) == 2 and "git_commit" in info["code_version"]
    assert (out / f"{kind}.png").read_bytes()[:4] == b"\x89PNG"
    with np.load(out / f"{kind}.npz", allow_pickle=False) as arrays:
        assert len(arrays.files) > 0
    printed = capsys.readouterr().out
    if kind in ("landscape", "radius", "hessian", "boundary"):
        assert "per run, 2 run(s)" in printed  # the cost, before the work
    if kind == "hessian":  # power iteration's residual ‖Hv − λv‖, beside the eigenvalue it bounds
        assert all(run["eigen_residual"] >= 0 for run in info["summary"].values())
    assert before == {m: (runs / m / "checkpoint.pt").read_bytes() for m in ("erm", "amp")}


def test_the_same_seed_gives_the_same_numbers(runs):
    first = analyze(runs, "landscape", "--set", "steps=5", "--set", "samples=50", "--set", "seed=3")
    a = dict(np.load(first / "landscape.npz"))
    second = analyze(runs, "landscape", "--set", "steps=5", "--set", "samples=50", "--set", "seed=3")
    b = dict(np.load(second / "landscape.npz"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_calibration_of_a_bench_and_the_operational_region(runs):
    out = analyze(runs, "calibration", inputs=("bench",))
    summary = json.loads((out / "calibration.json").read_text())["summary"]
    metrics = json.loads(next((runs / "bench" / "runs").glob("*/seed0/metrics.json")).read_text())
    assert summary["erm"]["ece_mean"] == pytest.approx(metrics["test_ece"])
    out = analyze(runs, "operational-region", inputs=())
    for name in ("operational-region", "amp-1d", "scalar-example"):
        assert (out / f"{name}.png").exists()
    minimizers = json.loads((out / "scalar-example.json").read_text())["summary"]["minimizers"]
    assert minimizers["amp"] == pytest.approx(0.5 / 3, abs=1e-3)  # Fig. 9: θ*_AMP = ε/3 (ε = 0.5)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["analyze", "nope", "x", "--out", "o"], "invalid choice: 'nope'"),
        (["analyze", "landscape", "{erm}", "--out", "o", "--set", "bogus=1"], "unknown setting 'bogus'"),
        (["analyze", "landscape", "{erm}", "--out", "o", "--set", "dims=3"], "dims must be 1"),
        (["analyze", "boundary", "{bench}/runs/erm/seed0", "--out", "o"], "--dataset spiral"),
        (["analyze", "landscape", "--out", "o"], "needs run folders"),
        (["analyze", "landscape", "{erm}", "{amp}", "--out", "o", "--labels", "a"], "one per run"),
        (["analyze", "operational-region", "{erm}", "--out", "o"], "takes no folders"),
        (["analyze", "landscape", "{missing}", "--out", "o"], "holds no finished advreg run"),
    ],
)
def test_bad_input_is_one_line_that_says_what_to_do(runs, argv, words, capsys):
    argv = [a.format(erm=runs / "erm", amp=runs / "amp", bench=runs / "bench", missing=runs / "missing") for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("advreg: error:") and "\n" not in err and words in err


def test_every_kind_is_reachable_from_the_cli():
    assert set(KINDS) == {
        "landscape",
        "awp-landscape",
        "radius",
        "hessian",
        "boundary",
        "curves",
        "calibration",
        "operational-region",
    }


def test_report_tables_and_plots_finished_runs(runs, capsys):
    out = runs / "report"
    cli.main(["report", str(runs / "erm"), str(runs / "amp"), "--out", str(out)])
    table = (out / "report.md").read_text()
    assert table.startswith("| Dataset | Model | Method |") and capsys.readouterr().out.startswith(table)
    metrics = json.loads((runs / "amp" / "metrics.json").read_text())
    amp_row = next(line for line in table.splitlines() if "| amp |" in line)
    assert amp_row == (
        f"| spiral | mlp | amp | 0 | 3 | {100 - metrics['test_error']:.2f} | {100 - metrics['train_error']:.2f} |"
    )
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "report.json").read_text())
    history = (runs / "amp" / "history.csv").read_text().splitlines()
    assert len(saved[1]["curve"]) == len(history) - 1
    with pytest.raises(SystemExit):
        cli.main(["report", str(runs / "missing"), "--out", str(out)])
