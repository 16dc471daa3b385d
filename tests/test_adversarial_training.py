"""Adversarial training (AWP paper, issue 8): PGD examples (CE and TRADES's KL), the pair losses as stages, the
presets, robust errors each epoch, the best and last checkpoints and the robust gap in the run folder.

The losses' formulas are in test_at_losses.py and AWP's geometry in test_awp.py; here the wiring is checked against
references written in the tests.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advreg import cli
from advreg.attacks import pgd
from advreg.batch import Batch
from advreg.config import TrainConfig
from advreg.evaluate import AttackSettings, robust_error
from advreg.losses import OnPair, mart_loss, trades_loss
from advreg.methods import METHODS, resolve
from advreg.stages import build_transform, validate_stages
from advreg.train import BEST, build_run, train, train_step

SMALL = ["data.name=digits", "model.hidden=16", "optim.batch_size=128"]


def small(method: str, *settings: str, epochs: int = 3) -> TrainConfig:
    return resolve(TrainConfig(method=method, epochs=epochs), SMALL + list(settings))


def mlp(d: int = 6, k: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, k)).double()


# -- PGD ---------------------------------------------------------------------------------------------
def test_kl_pgd_is_trades_inner_maximization_step_by_step():
    """Eq. 16 written out: start x + 0.001·width·N(0, I), then x' ← Π(x' + α·sign ∇ KL(p(x) ‖ p(x'))), in the box."""
    model, x = mlp(), torch.rand(10, 6, dtype=torch.float64)
    eps, alpha, steps, box = 0.1, 0.03, 4, (0.0, 1.0)
    got = pgd(
        model,
        x,
        torch.zeros(10, dtype=torch.long),
        eps,
        alpha,
        steps,
        box=box,
        objective="kl",
        generator=torch.Generator().manual_seed(3),
    )
    p = F.softmax(model(x), dim=1).detach()
    x_adv = (x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)).clamp(*box)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        log_q = F.log_softmax(model(x_adv), dim=1)
        kl = (p * (p.log() - log_q)).sum()
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = (x + (x_adv + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(*box)
    torch.testing.assert_close(got, x_adv.detach())
    assert (got - x).abs().max() <= eps + 1e-12


def test_pgd_examples_are_made_in_eval_mode_in_pixel_levels_and_keep_the_clean_batch_for_pair_losses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.rand(16, 6) * 16, torch.randint(0, 3, (16,))  # digits' range [0, 16]
    stats = [b.clone() for b in model.buffers()]
    for loss, objective in (("ce", "ce"), ("trades", "kl"), ("mart", "ce")):
        config = resolve(TrainConfig(method="erm"), ["stages.transform=pgd", f"stages.loss={loss}"])
        run_transform = build_transform(config, (0.0, 16.0))
        assert run_transform.objective == objective
        assert run_transform.eps == pytest.approx(8 * 16 / 255) and run_transform.alpha == pytest.approx(2 * 16 / 255)
        model.train()
        batch = run_transform(model, x, y, 3)
        assert model.training and all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
        assert torch.equal(batch.target, y) and batch.clean is x  # the clean batch, for TRADES's and MART's f(x)
        x_adv = batch.inputs
        assert x_adv.shape == (16, 6)
        assert (x_adv - x).abs().max() <= 8 * 16 / 255 + 1e-5 and x_adv.min() >= 0 and x_adv.max() <= 16


# -- the pair losses as a stage ------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", [trades_loss, mart_loss])
def test_on_pair_runs_each_half_through_the_model_and_returns_the_clean_logits(criterion):
    model, x, x_adv = mlp(), torch.rand(5, 6, dtype=torch.float64), torch.rand(5, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    loss, logits = OnPair(criterion)(model, Batch(x_adv, y, clean=x))
    torch.testing.assert_close(loss, criterion(model(x), model(x_adv), y))
    torch.testing.assert_close(logits, model(x))
    with pytest.raises(ValueError, match="stages.transform=pgd"):
        OnPair(criterion)(model, Batch(x_adv, y))


def test_pair_losses_need_adversarial_examples_and_refuse_ignored_settings():
    with pytest.raises(ValueError, match="stages.transform=pgd"):
        validate_stages(resolve(TrainConfig(), ["stages.loss=trades"]))
    with pytest.raises(ValueError, match="loss.smoothing"):
        train(small("trades", "loss.smoothing=0.1"), "/nonexistent/never/written", progress=False)
    with pytest.raises(ValueError, match="pgd.pixels"):
        resolve(TrainConfig(method="erm"), ["pgd.pixels=4"])  # the PGD transform is off: it would be ignored


# -- presets -----------------------------------------------------------------------------------------------
def test_presets_carry_the_awp_papers_settings():
    c = {
        name: resolve(TrainConfig(method=name), [])
        for name in ("at", "trades", "mart", "at_awp", "trades_awp", "mart_awp", "at_rwp")
    }
    for config in c.values():
        assert config.stages.transform == "pgd" and config.robust.track
        assert (config.pgd.pixels, config.pgd.step_pixels, config.pgd.steps, config.pgd.norm) == (8, 2, 10, "linf")
        assert (config.robust.pixels, config.robust.step_pixels, config.robust.steps) == (8, 2, 20)
    assert [c[n].stages.loss for n in ("at", "trades", "mart")] == ["ce", "trades", "mart"]
    assert c["trades"].trades.beta == 6 and c["mart"].mart.beta == 6
    assert c["at_awp"].stages.perturbation == "awp" and c["at_awp"].awp.gamma == 0.01
    assert c["trades_awp"].awp.gamma == 0.005 and c["mart_awp"].awp.gamma == 0.005
    assert c["at_rwp"].stages.perturbation == "rwp" and c["at_rwp"].rwp.gamma == 0.01
    assert {"at", "trades", "mart", "at_awp", "trades_awp", "mart_awp"} <= set(METHODS)


def test_gamma_zero_is_the_unperturbed_method_bit_for_bit():
    plain = build_run(small("trades"))
    zero = build_run(small("trades_awp", "awp.gamma=0"))
    for run in (plain, zero):
        torch.manual_seed(1)
        for x, y in list(run.loader)[:3]:
            train_step(run, x, y)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), zero.model.parameters()))


def test_awp_warmup_counts_epochs_of_steps():
    run = build_run(small("at_awp", "awp.warmup=2"))
    assert run.optimizer.warmup_steps == 2 * len(run.loader)


# -- robust errors during training, best and last --------------------------------------------------------
@pytest.fixture(scope="module")
def at_awp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("at_awp") / "run"
    config = small("at_awp", "optim.lr=0.05", epochs=4)
    return config, out, train(config, out, progress=False)


def test_history_tracks_robust_errors_and_best_is_chosen_on_validation(at_awp_run):
    config, out, metrics = at_awp_run
    rows = list(csv.DictReader((out / "history.csv").open()))
    val = [float(r["val_robust_error"]) for r in rows]
    test = [float(r["test_robust_error"]) for r in rows]
    best = val.index(min(val))  # the first of a tie
    assert metrics["best_epoch"] == best + 1 and (out / BEST).exists()
    assert metrics["best_val_robust_error"] == pytest.approx(val[best])
    assert metrics["best_test_robust_error"] == pytest.approx(test[best])  # the same seeded PGD
    assert metrics["last_test_robust_error"] == pytest.approx(test[-1])
    assert metrics["last_test_error"] == pytest.approx(metrics["test_error"])
    assert metrics["robust_gap"] == pytest.approx(
        metrics["last_test_robust_error"] - metrics["last_train_robust_error"]
    )
    assert metrics["best_robust_gap"] == pytest.approx(
        metrics["best_test_robust_error"] - metrics["best_train_robust_error"]
    )
    assert all(0 <= t <= 100 for t in test) and all(float(r["test_error"]) <= t for r, t in zip(rows, test))


def test_robust_errors_are_pgd20_of_the_threat_model_in_pixel_levels(at_awp_run):
    config, out, metrics = at_awp_run
    run = build_run(config)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    run.model.load_state_dict(state["model"])
    lo, hi = run.data.train[0].min().item(), run.data.train[0].max().item()
    settings = AttackSettings(8 * (hi - lo) / 255, 2 * (hi - lo) / 255, 20, (lo, hi), "linf")
    assert run.robust == settings
    x, y = run.data.test
    gen = torch.Generator().manual_seed(0)
    wrong = sum(
        int(
            (
                run.model.eval()(
                    pgd(
                        run.model,
                        x[i : i + 500],
                        y[i : i + 500],
                        settings.eps,
                        settings.alpha,
                        20,
                        box=(lo, hi),
                        generator=gen,
                    )
                ).argmax(1)
                != y[i : i + 500]
            ).sum()
        )
        for i in range(0, len(y), 500)
    )
    assert metrics["last_test_robust_error"] == pytest.approx(100 * wrong / len(y))
    assert robust_error(run.model, x, y, settings) == pytest.approx(100 * wrong / len(y))


def test_tracking_does_not_change_the_training(tmp_path):
    tracked = train(small("at", epochs=2), tmp_path / "a", progress=False)
    untracked = train(small("at", "robust.track=false", epochs=2), tmp_path / "b", progress=False)
    assert tracked["test_nll"] == untracked["test_nll"] and tracked["train_nll"] == untracked["train_nll"]
    assert "robust_gap" not in untracked and not (tmp_path / "b" / BEST).exists()


def test_an_interrupted_run_resumes_to_the_same_best_and_last(at_awp_run, interrupted_then_resumed):
    config, _, whole = at_awp_run
    drop = lambda m: {k: v for k, v in m.items() if "seconds" not in k}  # noqa: E731
    assert drop(interrupted_then_resumed(config)) == drop(whole)


def test_cli_trains_mart_awp_and_writes_the_flat_keys(tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(
        [
            "train",
            "--dataset",
            "digits",
            "--method",
            "mart_awp",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--set",
            "model.hidden=16",
            "--set",
            "optim.batch_size=256",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_error", "best_test_robust_error", "last_test_robust_error", "robust_gap"):
        assert isinstance(metrics[key], float)
