"""``advreg evaluate``: robust test errors written into a run's metrics.json, transfer, and the sanity check."""
import json

import pytest

from advreg import cli
from advreg.config import TrainConfig
from advreg.methods import resolve
from advreg.robustness import evaluate_run, load_run
from advreg.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    for method in ("erm", "amp"):
        config = resolve(TrainConfig(method=method, epochs=3), ["data.name=digits", "model.hidden=32"])
        train(config, root / method, progress=False)
    return root


def test_evaluate_adds_robust_errors_and_keeps_the_metrics(runs):
    before = json.loads((runs / "erm" / "metrics.json").read_text())
    results = evaluate_run(runs / "erm", ["fgsm", "pgd"], sanity=True)
    after = json.loads((runs / "erm" / "metrics.json").read_text())
    assert {k: after[k] for k in before} == before
    assert after["test_error_fgsm"] == results["test_error_fgsm"]
    assert after["test_error"] <= after["test_error_fgsm"] <= 100
    assert after["test_error_pgd"] >= after["test_error_fgsm"] - 1.0  # PGD-10 is at least as strong, up to noise
    assert after["attack_eps"] == pytest.approx(4 / 255)  # digits lie in [0, 1]: 4 per pixel is 4/255
    assert 0 <= after["test_accuracy_pgd_unbounded"] <= 100


def test_eps_zero_reproduces_the_clean_test_error(runs):
    results = evaluate_run(runs / "amp", ["fgsm", "pgd"], eps=0.0)
    clean = json.loads((runs / "amp" / "metrics.json").read_text())["test_error"]
    assert results["test_error_fgsm"] == pytest.approx(clean) and results["test_error_pgd"] == pytest.approx(clean)


def test_transfer_crafts_on_the_source_and_scores_the_target(runs, capsys):
    cli.main(["evaluate", str(runs / "amp"), "--attacks", "pgd", "--source", str(runs / "erm")])
    metrics = json.loads((runs / "amp" / "metrics.json").read_text())
    assert "test_error_pgd_transfer" in metrics and metrics["attack_source"] == str(runs / "erm")
    assert "test_error_pgd_transfer" in capsys.readouterr().out
    _, _, model = load_run(runs / "amp")
    assert not model.training


@pytest.mark.parametrize("args, words", [
    (["--attacks", "cw"], "unknown attack"),
    (["--eps", "-1"], "--eps must be"),
])
def test_bad_evaluate_input_is_one_line(runs, capsys, args, words):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(runs / "erm"), *args])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_a_folder_without_a_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(tmp_path)])
    assert exit_info.value.code == 2 and "no finished advreg run" in capsys.readouterr().err


def test_autoattack_stays_in_the_ball_and_the_worst_case_is_pointwise(runs):
    pytest.importorskip("pyautoattack")
    from advreg.robustness import autoattack, default_settings, robust_errors

    _, data, model = load_run(runs / "erm")
    x, y = data.test[0][:64], data.test[1][:64]
    settings = default_settings(data)
    adv = autoattack(model, x, y, settings.eps, settings.box)
    assert (adv - x).abs().max() <= settings.eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    errors = robust_errors(model, x, y, ["fgsm", "pgd", "autoattack"], settings)
    assert errors["test_error_worst"] >= max(errors[f"test_error_{a}"] for a in ("fgsm", "pgd", "autoattack"))
    assert errors["test_error_autoattack"] >= errors["test_error_fgsm"]


def test_autoattack_without_its_package_says_how_to_install_it(runs, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"advreg\[autoattack\]"):
        evaluate_run(runs / "erm", ["autoattack"])
