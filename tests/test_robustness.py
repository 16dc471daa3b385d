"""``advreg evaluate``: robust test errors written into a run's metrics.json, transfer, and the sanity check."""

import json

import pytest
import torch

from advreg import cli, models
from advreg.config import TrainConfig
from advreg.methods import resolve
from advreg.robustness import (
    autoattack,
    autoattack_plan,
    default_settings,
    evaluate_run,
    load_run,
    robust_errors,
)
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


@pytest.mark.parametrize(
    "args, words",
    [
        (["--attacks", "cw"], "unknown attack"),
        (["--eps", "-1"], "--eps must be"),
    ],
)
def test_bad_evaluate_input_is_one_line(runs, capsys, args, words):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(runs / "erm"), *args])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_a_folder_without_a_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(tmp_path)])
    assert exit_info.value.code == 2 and "no finished advreg run" in capsys.readouterr().err


@pytest.fixture
def short_square(monkeypatch):
    """Square with 300 queries, not the standard 5000: it takes most of the time, and no test here is about it."""
    pytest.importorskip("pyautoattack")
    from pyautoattack import AutoAttack

    real = AutoAttack._set_version

    def short(self, version="standard"):
        real(self, version)
        self.square.n_queries = 300

    monkeypatch.setattr(AutoAttack, "_set_version", short)


def test_autoattack_stays_in_the_ball_and_the_worst_case_is_pointwise(runs, short_square, monkeypatch):
    import advreg.robustness

    _, data, model = load_run(runs / "erm")
    x, y = data.test[0][:64], data.test[1][:64]
    settings = default_settings(data)
    crafted = []  # what robust_errors scores: one batch
    monkeypatch.setattr(advreg.robustness, "autoattack", lambda *args: crafted.append(autoattack(*args)) or crafted[-1])
    errors = robust_errors(model, x, y, ["fgsm", "pgd", "autoattack"], settings)
    (adv,) = crafted
    assert (adv - x).abs().max() <= settings.eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        broken = (model(adv).argmax(1) != y).double().mean().item()
    assert errors["test_error_autoattack"] == pytest.approx(100 * broken)  # the error is that of these examples
    assert errors["test_error_worst"] >= max(errors[f"test_error_{a}"] for a in ("fgsm", "pgd", "autoattack"))
    assert errors["test_error_autoattack"] >= errors["test_error_fgsm"]


def test_autoattack_without_its_package_says_how_to_install_it(runs, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"advreg\[autoattack\]"):
        evaluate_run(runs / "erm", ["autoattack"])


@pytest.mark.parametrize(
    "classes, features, attacks, targets",
    [
        (10, 784, ("apgd-ce", "apgd-t", "fab-t", "square"), 9),  # the standard version as it is
        (100, 3072, ("apgd-ce", "apgd-t", "fab-t", "square"), 9),
        (4, 40, ("apgd-ce", "apgd-t", "fab-t", "square"), 3),  # 4 classes: the targeted DLR loss has its 4 logits
        (3, 64, ("apgd-ce", "fab-t", "square"), 2),
        (2, 64, ("apgd-ce", "fab-t", "square"), 1),
        (3, 2, ("apgd-ce", "fab-t"), 2),  # the spiral: 2 features make no image
        (10, 41, ("apgd-ce", "apgd-t", "fab-t"), 9),
    ],
)
def test_autoattack_plan_keeps_the_attacks_that_apply(classes, features, attacks, targets):
    plan = autoattack_plan(classes, features)
    assert plan.attacks == attacks and plan.target_classes == targets
    assert set(plan.left_out) == {"apgd-ce", "apgd-t", "fab-t", "square"} - set(attacks)
    assert features % plan.height == 0 and (plan.height > 1) == ("square" in attacks)


def test_the_plan_starts_from_the_packages_standard_version():
    pytest.importorskip("pyautoattack")
    from pyautoattack import AutoAttack

    standard = AutoAttack(torch.nn.Linear(4, 10), eps=0.1, norm="Linf", version="standard")
    assert autoattack_plan(10, 784).attacks == tuple(standard.attacks_to_run)
    assert (
        autoattack_plan(10, 784).target_classes
        == standard.apgd_targeted.n_target_classes
        == standard.fab.n_target_classes
    )


@pytest.mark.parametrize("classes", [2, 3, 4])
def test_autoattack_runs_its_plan_with_fewer_than_10_classes(classes, monkeypatch, short_square):
    from pyautoattack import AutoAttack

    seen = []
    real = AutoAttack.run_standard_evaluation

    def spy(self, *args, **kwargs):  # what the package is about to run
        seen.append(
            (
                tuple(self.attacks_to_run),
                self.apgd_targeted.n_target_classes,
                self.fab.n_target_classes,
                self.apgd.n_restarts,
            )
        )
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", spy)
    torch.manual_seed(0)
    model = models.build("mlp", classes, input_shape=(16,), hidden=(32,)).eval()
    x = torch.rand(40, 16)
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct, so every sample is attacked
    adv = autoattack(model, x, y, 0.1, (0.0, 1.0))
    plan = autoattack_plan(classes, 16)
    assert seen == [(plan.attacks, plan.target_classes, plan.target_classes, 1)]  # 1 restart: the standard version
    assert ("apgd-t" in plan.attacks) == (classes >= 4) and plan.target_classes == classes - 1
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert (model(adv).argmax(1) != y).any()  # ε = 0.1 of the box breaks some samples of a random net


@pytest.fixture(scope="module")
def spiral_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spiral") / "erm"
    train(resolve(TrainConfig(method="erm", epochs=3), ["data.name=spiral"]), folder, progress=False)
    return folder


def test_autoattack_on_three_classes_says_what_it_left_out(spiral_run):
    pytest.importorskip("pyautoattack")
    results = evaluate_run(spiral_run, ["autoattack"])  # K = 3: the IndexError of APGD-T's targeted DLR loss
    metrics = json.loads((spiral_run / "metrics.json").read_text())
    assert metrics["autoattack_attacks"] == ["apgd-ce", "fab-t"] and metrics["autoattack_target_classes"] == 2
    assert set(metrics["autoattack_left_out"]) == {"apgd-t", "square"}
    assert "4 classes" in metrics["autoattack_left_out"]["apgd-t"]
    assert metrics["test_error"] <= results["test_error_autoattack"] == metrics["test_error_autoattack"] <= 100
    assert "attack_alpha" not in metrics and "attack_steps" not in metrics  # PGD did not run
    assert metrics["attack_eps"] == pytest.approx(default_settings(load_run(spiral_run)[1]).eps)


def test_pgd_settings_are_recorded_only_when_pgd_runs(runs):
    assert {"attack_alpha", "attack_steps", "autoattack_attacks"}.isdisjoint(evaluate_run(runs / "amp", ["fgsm"]))
    with_pgd = evaluate_run(runs / "amp", ["fgsm", "pgd"])
    assert with_pgd["attack_alpha"] == pytest.approx(1 / 255) and with_pgd["attack_steps"] == 10
