"""Every method of the registry through one contract (DESIGN §6), and the presets' wiring (DESIGN §1).

Contract: finite loss, weights restored, state_dict round trip, determinism for a seed. Then the stages
compose (AMP on MixUp batches, AMP with flooding) and ``resolve`` refuses settings that would be ignored.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from advreg import transforms
from advreg.cli import build_parser, make_config
from advreg.config import TrainConfig, keys, override
from advreg.losses import cross_entropy
from advreg.methods import METHODS, Method, check_preset, resolve
from advreg.stages import build_optimizer
from advreg.train import build_run, train_step, validate

SMALL = ["data.name=digits", "model.hidden=16", "optim.batch_size=64"]
STEPS = 3


def small_config(name: str, *settings: str, seed: int = 0) -> TrainConfig:
    return resolve(TrainConfig(method=name, epochs=1, seed=seed), SMALL + list(settings))


def batches(run, n: int):
    it = iter(run.loader)
    return [tuple(t.clone() for t in next(it)) for _ in range(n)]


def params(run):
    return [p.detach().clone() for p in run.model.parameters()]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


def train_on(run, data):
    run.model.train()
    return [train_step(run, x, y) for x, y in data]


# -- the contract, for every method ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_finite_loss_and_the_weights_move(name):
    run = build_run(small_config(name))
    before = params(run)
    for loss, logits, _ in train_on(run, batches(run, STEPS)):
        assert loss.dim() == 0 and math.isfinite(loss.item())
        assert logits.shape == (64, run.data.num_classes) and torch.isfinite(logits).all()
    assert not same(params(run), before)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_weights_restored_exactly_when_the_base_step_is_zero(name):
    run = build_run(small_config(name))
    for group in run.optimizer.param_groups:
        group.update(lr=0.0, momentum=0.0, weight_decay=0.0)
    before = params(run)
    for loss, _, _ in train_on(run, batches(run, STEPS)):
        assert math.isfinite(loss.item())
    assert same(params(run), before)  # every perturbation went back to θ, bit for bit
    assert all(p.grad is not None for p in run.model.parameters())  # the steps did run


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_dict_round_trip(name):
    config = small_config(name)
    k, m = 2, 3
    run = build_run(config)
    data = batches(run, k + m)
    train_on(run, data[:k])
    saved = copy.deepcopy(
        {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "rng": torch.get_rng_state()}
    )
    train_on(run, data[k:])
    expected = params(run)

    def resumed(load_optimizer: bool):
        fresh = build_run(config)
        fresh.model.load_state_dict(saved["model"])
        if load_optimizer:
            fresh.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        train_on(fresh, data[k:])
        return params(fresh)

    assert same(resumed(True), expected)
    assert not same(resumed(False), expected)  # the momentum in the state matters: the check has teeth


@pytest.mark.parametrize("name", sorted(METHODS))
def test_determinism_for_a_seed(name):
    def trained(seed: int):
        run = build_run(small_config(name, seed=seed))
        train_on(run, batches(run, STEPS))
        return params(run)

    first = trained(0)
    assert same(trained(0), first)
    assert not same(trained(1), first)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_metadata_and_forward_passes_per_step(name):
    method = METHODS[name]
    assert isinstance(method, Method) and method.name == name
    assert method.paper.strip() and (method.passes is None) == (name == "amm")
    assert isinstance(method.settings, tuple)
    valid = set(keys(TrainConfig()))
    for setting in method.settings:
        key, sep, _ = setting.partition("=")
        assert sep and key in valid
    override(TrainConfig(), list(method.settings))  # every preset setting parses
    assert (method.settings == ()) == (name == "erm")  # ERM is the defaults

    config = small_config(name)
    validate(config)
    check_preset(config)
    for setting in method.settings:  # the preset is applied
        key, value = setting.split("=")
        section, field = key.split(".")
        assert str(getattr(getattr(config, section), field)) == value

    run = build_run(config)
    calls = []
    run.model.register_forward_hook(lambda *_: calls.append(1))
    train_on(run, batches(run, 1))
    if name == "amm":  # DeepFool stops early; MIN runs it twice: a clean pass, then per step (≤ u) copies and a check
        assert 1 + 4 <= len(calls) <= 1 + 2 * (1 + 2 * config.amm.steps)
    else:
        assert len(calls) == method.forward_passes(config)


def test_the_registry_holds_the_amp_papers_baselines():
    assert {"erm", "dropout", "label_smoothing", "flooding", "mixup", "adv", "rmp", "amp", "sam"} <= set(METHODS)


def test_presets_carry_the_papers_hyperparameters():
    """AMP paper, Sec. 5.1: dropout 10%, smoothing 0.2, flood 0.02, Beta(1, 1), 1 pixel, RMP radius 0.1."""
    c = {name: resolve(TrainConfig(method=name), []) for name in METHODS}
    assert c["dropout"].model.dropout == 0.1
    assert c["label_smoothing"].loss.smoothing == 0.2
    assert c["flooding"].loss.flooding == 0.02
    assert c["mixup"].stages.transform == "mixup" and c["mixup"].mixup.alpha == 1.0
    assert c["adv"].stages.transform == "fgsm" and c["adv"].fgsm.pixels == 1.0
    assert c["rmp"].stages.perturbation == "rmp" and c["rmp"].rmp.epsilon == 0.1
    assert c["amp"].stages.perturbation == "amp" and c["amp"].amp.inner_steps == 1
    assert c["sam"].stages.perturbation == "sam"
    run = build_run(small_config("adv"))
    assert run.step.transform.eps == pytest.approx(1 / 255)  # digits pixels lie in [0, 1]


# -- composing the stages ---------------------------------------------------------------------
class Counting:
    def __init__(self, fn):
        self.fn, self.calls, self.seen = fn, 0, []

    def __call__(self, *args):
        self.calls += 1
        self.seen.append(args)
        return self.fn(*args)


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_amp_on_mixup_batches_transforms_once_and_passes_n_plus_one_times(inner_steps):
    config = small_config("amp", "stages.transform=mixup", f"amp.inner_steps={inner_steps}")
    run = build_run(config)
    assert isinstance(run.step.transform, transforms.MixUp)
    run.step.transform, run.step.loss_fn = Counting(run.step.transform), Counting(run.step.loss_fn)
    before = params(run)
    for step, (x, y) in enumerate(batches(run, 2), start=1):
        loss, _, _ = train_step(run, x, y)
        assert math.isfinite(loss.item())
        assert run.step.transform.calls == step
        assert run.step.loss_fn.calls == step * (inner_steps + 1)
    targets = [args[1].target for args in run.step.loss_fn.seen[-(inner_steps + 1) :]]
    assert targets[0].shape == (64, run.data.num_classes)  # soft MixUp targets
    assert all(t is targets[0] for t in targets)  # every pass of a step sees the same mixed batch
    assert not same(params(run), before)


def test_flooding_composes_with_amp_through_the_command_line_setting():
    args = build_parser().parse_args(
        [
            "train",
            "--method",
            "amp",
            "--dataset",
            "digits",
            "--out",
            "unused",
            "--set",
            "loss.flooding=0.02",
            "--set",
            "model.hidden=16",
        ]
    )
    config = make_config(args)
    assert config.stages.perturbation == "amp" and config.loss.flooding == 0.02
    run = build_run(config)
    logits = torch.zeros(4, 10)
    logits[torch.arange(4), torch.arange(4)] = 20.0  # CE ≈ 2e-8, below the flood level
    y = torch.arange(4)
    J = cross_entropy(logits, y)
    torch.testing.assert_close(run.step.loss_fn.criterion(logits, y), 2 * 0.02 - J)
    loss, _, _ = train_on(run, batches(run, 1))[0]
    assert math.isfinite(loss.item())


# -- resolve and validate refuse what would be ignored ------------------------------------------
@pytest.mark.parametrize(
    "method, setting",
    [
        ("amp", "stages.perturbation=sam"),
        ("amp", "stages.perturbation=none"),
        ("mixup", "stages.transform=fgsm"),
        ("erm", "amp.epsilon=0.1"),
        ("erm", "mixup.alpha=0.4"),
        ("erm", "fgsm.pixels=2"),
        ("erm", "sam.rho=0.1"),
        ("erm", "rmp.epsilon=0.2"),
        ("sam", "amp.epsilon=0.1"),
        ("amp", "mixup.alpha=0.4"),
    ],
)
def test_resolve_rejects_contradicting_or_unused_settings(method, setting):
    with pytest.raises(ValueError):
        resolve(TrainConfig(method=method), [setting])


@pytest.mark.parametrize(
    "method, settings",
    [
        ("amp", ["amp.epsilon=0.1"]),
        ("amp", ["stages.perturbation=amp"]),  # agrees with the preset
        ("erm", ["stages.perturbation=amp", "amp.epsilon=0.1"]),
        ("amp", ["stages.transform=mixup", "mixup.alpha=0.4"]),
        ("mixup", ["mixup.alpha=0.4"]),
        ("label_smoothing", ["loss.smoothing=0.1"]),
    ],
)
def test_resolve_accepts_settings_of_stages_in_use(method, settings):
    config = resolve(TrainConfig(method=method), settings)
    validate(config)


def test_an_unknown_stage_member_is_a_value_error():
    for setting in ("stages.transform=cutmix", "stages.perturbation=awp2"):
        config = resolve(TrainConfig(), [setting])
        with pytest.raises(ValueError, match="unknown stages"):
            validate(config)


def test_a_preset_built_without_resolve_is_refused():
    with pytest.raises(ValueError, match="resolve"):
        validate(TrainConfig(method="amp"))
    with pytest.raises(ValueError, match="resolve"):
        check_preset(TrainConfig(method="mixup"))
    validate(TrainConfig(method="erm"))
    validate(resolve(TrainConfig(method="amp"), []))


@pytest.mark.parametrize(
    "name, key", [("dropout", "model.dropout"), ("label_smoothing", "loss.smoothing"), ("flooding", "loss.flooding")]
)
def test_a_preset_with_its_regularizer_off_is_refused(name, key):
    from advreg.train import validate

    with pytest.raises(ValueError, match="is ERM"):
        validate(TrainConfig(method=name))  # built without resolve
    with pytest.raises(ValueError, match="is ERM"):
        validate(resolve(TrainConfig(method=name), [f"{key}=0"]))
    validate(resolve(TrainConfig(method=name), [f"{key}=0.05"]))  # another strength is still the method


def test_dropout_on_the_penultimate_layer_only():
    from advreg.models import build

    every = build("mlp", 10, input_shape=(8,), hidden=(16, 16, 16), dropout=0.5)
    last = build("mlp", 10, input_shape=(8,), hidden=(16, 16, 16), dropout=0.5, dropout_layers="last")
    kinds = lambda m: [type(layer).__name__ for layer in m.net]  # noqa: E731
    assert kinds(every).count("Dropout") == 3
    assert kinds(last).count("Dropout") == 1 and kinds(last)[-2] == "Dropout"  # just before the classifier
    with pytest.raises(ValueError, match="dropout_layers"):
        build("mlp", 10, input_shape=(8,), dropout=0.5, dropout_layers="first")


def test_the_sam_settings_reach_the_optimizer():
    config = small_config("sam", "sam.rho=0.2", "sam.adaptive=true", "sam.eta=0")
    opt = build_optimizer(config, [torch.nn.Parameter(torch.zeros(2))])
    assert (opt.rho, opt.adaptive, opt.eta) == (0.2, True, 0.0)  # eta=0: davda54/sam's ASAM
    assert opt.param_groups[0]["rho"] == 0.2  # in the group, as lr
