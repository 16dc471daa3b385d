"""Strict run-folder files: metrics.json is RFC 8259 JSON (a NaN metric is null and reads back as NaN, old files
with NaN tokens still load), and a corrupt history.csv or metrics.json is one line ``advreg: error:`` naming it."""

import json
import math
import shutil

import pytest

from advreg import cli
from advreg.io import write_json
from advreg.runs import load_config, load_metrics
from advreg.train import train

pytestmark = pytest.mark.usefixtures("data_cache")  # conftest.py: one cache for the module

# adversarial training without a validation split: the best checkpoint's validation robust error is NaN
BENCH = [
    "bench",
    "--dataset",
    "digits",
    "--methods",
    "at",
    "--seeds",
    "1",
    "--epochs",
    "1",
    "--jobs",
    "1",
    "--quiet",
    "--set",
    "model.hidden=16",
    "--set",
    "data.val_fraction=0",
    "--set",
    "data.train_fraction=0.25",
    "--set",
    "robust.steps=2",
    "--set",
    "robust.margin_samples=0",
]


def strict(text):
    """json.loads that refuses NaN and Infinity, as jq, JavaScript's JSON.parse and RFC 8259 do."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def one_error_line(capsys, argv, *words):
    """``cli.main(argv)`` exits with status 2 and one line ``advreg: error:`` holding ``words``, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("advreg: error:"), lines
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def nan_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("strict") / "bench"
    cli.main([*BENCH, "--out", str(out)])
    return out


def copy_of(bench, tmp_path):
    shutil.copytree(bench, tmp_path / "bench")
    return tmp_path / "bench", tmp_path / "bench" / "runs" / "at" / "seed0"


def test_write_json_is_strict_and_a_null_metric_reads_back_as_nan(tmp_path):
    write_json(tmp_path / "metrics.json", {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}, "e": "at"})
    assert strict((tmp_path / "metrics.json").read_text()) == {"a": None, "b": [None, 1.5], "c": {"d": None}, "e": "at"}
    metrics = load_metrics(tmp_path)
    assert math.isnan(metrics["a"]) and metrics["e"] == "at"
    (tmp_path / "metrics.json").write_text('{"a": NaN, "b": 2.0}')  # written before strict JSON: still loads
    old = load_metrics(tmp_path)
    assert math.isnan(old["a"]) and old["b"] == 2.0


def test_a_nan_metric_is_null_in_the_file_and_the_tables_read_it_as_before(nan_bench, tmp_path, capsys):
    out, run = copy_of(nan_bench, tmp_path)
    saved = strict((run / "metrics.json").read_text())  # strict: no NaN token left in the file
    assert saved["best_val_robust_error"] is None and saved["val_error"] is None
    assert saved["best_test_robust_error"] >= 0
    cli.main(["bench", "--collect", str(out)])  # the tables of this copy (its folders)
    rows = (out / "results.csv").read_text().splitlines()
    best_val = rows[0].split(",").index("best_val_robust_error")
    assert rows[1].split(",")[best_val] == "nan"  # as the file's NaN token read before
    tables = {name: (out / name).read_bytes() for name in ("results.csv", "summary.md")}
    cli.main(["report", str(run), "--out", str(tmp_path / "new")])
    old = {**saved, "best_val_robust_error": math.nan}  # what advreg wrote before: a NaN token
    (run / "metrics.json").write_text(json.dumps(old))
    cli.main(["bench", "--collect", str(out)])
    assert {name: (out / name).read_bytes() for name in tables} == tables
    cli.main(["report", str(run), "--out", str(tmp_path / "old")])
    assert (tmp_path / "old" / "report.md").read_text() == (tmp_path / "new" / "report.md").read_text()
    assert strict((tmp_path / "old" / "report.json").read_text()) == strict(
        (tmp_path / "new" / "report.json").read_text()
    )


def test_train_returns_nan_where_the_file_holds_null(nan_bench, tmp_path):
    _, run = copy_of(nan_bench, tmp_path)
    metrics = train(load_config(run), run, resume=True, progress=False)  # finished: the final metrics again
    assert math.isnan(metrics["best_val_robust_error"]) and metrics["val_error"] is None
    assert strict((run / "metrics.json").read_text())["best_val_robust_error"] is None


def rename_column(text):
    return text.replace("test_error", "test_err", 1)


def word_in_a_cell(text):
    header, first, *rest = text.splitlines()
    cells = first.split(",")
    cells[header.split(",").index("test_error")] = "n/a"
    return "\n".join([header, ",".join(cells), *rest]) + "\n"


def short_row(text):
    header, first, *rest = text.splitlines()
    return "\n".join([header, first.rsplit(",", 1)[0], *rest]) + "\n"


def long_row(text):
    header, first, *rest = text.splitlines()
    return "\n".join([header, first + ",7", *rest]) + "\n"


@pytest.mark.parametrize(
    "corrupt, words",
    [
        (rename_column, ["has no column test_error"]),
        (word_in_a_cell, ["line 2, column test_error", "'n/a' is not a number"]),
        (lambda text: word_in_a_cell(text).replace("\n", "\n\n", 1), ["line 3, column test_error"]),  # the file's line
        (lambda text: "", ["is empty"]),
        (lambda text: text.splitlines()[0] + "\n", ["has no epoch yet"]),
        (short_row, ["line 2", "header's"]),
        (long_row, ["line 2", "header's"]),
        (lambda text: b"\xff\xfe" + text.encode(), ["not UTF-8 CSV"]),
    ],
)
@pytest.mark.parametrize(
    "command", [["analyze", "curves", "{run}", "--out", "{tmp}/a"], ["report", "{run}", "--out", "{tmp}/r"]]
)
def test_a_corrupt_history_is_one_line_naming_it(nan_bench, tmp_path, capsys, corrupt, words, command):
    _, run = copy_of(nan_bench, tmp_path)
    history = run / "history.csv"
    text = corrupt(history.read_text())
    history.write_bytes(text) if isinstance(text, bytes) else history.write_text(text)
    argv = [a.format(run=run, tmp=tmp_path) for a in command]
    line = one_error_line(capsys, argv, str(history), *words)
    assert "advreg train --resume" in line or "at least one epoch" in line  # what to do


@pytest.mark.parametrize("content, kind", [("[1, 2]", "list"), ("7", "int"), ('"done"', "str")])
def test_a_bench_metrics_json_that_is_no_object_is_one_line_naming_it(nan_bench, tmp_path, capsys, content, kind):
    out, run = copy_of(nan_bench, tmp_path)
    (run / "metrics.json").write_text(content)
    for argv in ([*BENCH, "--out", str(out)], ["bench", "--collect", str(out)]):
        one_error_line(capsys, argv, str(run / "metrics.json"), f"holds a JSON {kind}, not an object")
