"""The stage members declare themselves (advreg.registry): the name lists, the in-use check, the config sections and
the builders come from the declarations, and a new member is one declaration plus one preset line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from advreg import config as config_module
from advreg import registry, stages
from advreg.config import TrainConfig
from advreg.losses import LOSSES
from advreg.methods import METHODS, Method, resolve
from advreg.perturb import PerturbedOptimizer
from advreg.train import train
from advreg.transforms import TRANSFORMS

SMALL = ["data.name=digits", "model.hidden=16", "optim.batch_size=64"]
RHO = 0.01


def test_the_name_lists_are_the_declared_members():
    assert set(TRANSFORMS) == {"identity", "mixup", "fgsm", "alps", "pgd"} == set(registry.members("transform"))
    assert set(LOSSES) == {"ce", "amm", "trades", "mart"} == set(registry.members("loss"))
    assert set(registry.members("perturbation")) == {"none", "amp", "sam", "rmp", "awp", "rwp"}


def test_each_member_section_is_a_config_field_named_after_the_member():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for stage in registry.STAGES:
        for name, member in registry.members(stage).items():
            if member.config is not None:
                assert member.section == name and isinstance(getattr(TrainConfig(), name), member.config)
    assert "adv" not in fields and "at" not in fields  # FGSM's and PGD's sections are fgsm and pgd


def test_in_use_follows_the_stage_choice():
    pgd = resolve(TrainConfig(method="at"), []).stages
    assert registry.in_use(pgd, "pgd.pixels") and not registry.in_use(pgd, "fgsm.pixels")
    assert registry.in_use(pgd, "optim.lr")  # a trainer section is always in use
    with pytest.raises(ValueError, match=r"fgsm.pixels configures the fgsm transform.*stages.transform=fgsm"):
        resolve(TrainConfig(), ["fgsm.pixels=2"])


def test_a_loss_declares_what_it_needs_of_the_batch():
    trades = resolve(TrainConfig(method="trades"), [])
    assert stages.build_transform(trades, (0.0, 1.0)).objective == "kl"  # TRADES's examples maximize its KL
    mart = stages.build_transform(resolve(TrainConfig(method="mart"), []), (0.0, 1.0))
    at = stages.build_transform(resolve(TrainConfig(method="at"), []), (0.0, 1.0))
    assert mart.objective == at.objective == "ce"
    assert registry.get("loss", "trades").needs_clean and registry.get("loss", "mart").needs_clean
    assert registry.get("transform", "pgd").gives_clean and not registry.get("transform", "fgsm").gives_clean


@pytest.mark.parametrize(
    "method, setting, message",
    [
        ("at", "pgd.steps=0", r"^pgd.pixels must be >= 0, pgd.step_pixels > 0 and pgd.steps an integer >= 1"),
        ("amm", "amm.c=-1", r"^amm.lam must be >= 0 and amm.c, amm.d > 0, got amm.lam=32.0, amm.c=-1.0"),
        ("amp", "amp.every=0", r"^amp.every must be an integer >= 1, got 0: a fresh Δ every k steps"),  # a word stays
        ("mixup", "mixup.alpha=0", r"^mixup.alpha must be > 0"),
    ],
)
def test_a_member_names_its_parameter_and_the_config_layer_names_the_key(method, setting, message):
    config = resolve(TrainConfig(method=method), [setting])
    with pytest.raises(ValueError, match=message):
        (
            stages.build_transform(config, (0.0, 1.0)),
            stages.build_loss(config),
            stages.build_optimizer(config, [nn.Parameter(torch.zeros(1))]),
        )


def test_old_section_names_load_and_the_set_key_names_the_new_one():
    config = resolve(TrainConfig(method="at"), ["pgd.pixels=4"])
    old = config.to_dict()
    old["at"], old["adv"] = old.pop("pgd"), old.pop("fgsm")  # a config.json written before the rename
    assert TrainConfig.from_dict(old) == config
    with pytest.raises(ValueError, match=r"adv section is now fgsm: use --set fgsm.pixels=2"):
        resolve(TrainConfig(method="adv"), ["adv.pixels=2"])


def test_a_run_folder_with_the_old_section_names_resumes(tmp_path, monkeypatch):
    import advreg.train as training

    config = resolve(TrainConfig(method="adv", epochs=2), SMALL)
    whole = train(config, tmp_path / "whole", progress=False)
    real_epoch = training.run_epoch

    def interrupted(run, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(run, epoch)

    monkeypatch.setattr(training, "run_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "cut", progress=False)
    monkeypatch.setattr(training, "run_epoch", real_epoch)
    folder = tmp_path / "cut"  # rewritten as an older version wrote it: the sections adv and at
    (folder / "config.json").write_text(json.dumps(_old_names(json.loads((folder / "config.json").read_text()))))
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    torch.save({**checkpoint, "config": _old_names(checkpoint["config"])}, folder / "checkpoint.pt")
    resumed = train(config, folder, resume=True, progress=False)
    assert {**resumed, "train_seconds": 0} == {**whole, "train_seconds": 0}  # the numbers of an uninterrupted run


def _old_names(config: dict) -> dict:
    config = dict(config)
    config["adv"], config["at"] = config.pop("fgsm"), config.pop("pgd")
    return config


# -- a new member: one declaration and one preset line -------------------------------------------------------------
class SignAscent(PerturbedOptimizer):
    """The gradient at θ + ρ·sign(∇J(θ)), ρ fixed: a perturbation written for this test."""

    def _is_active(self) -> bool:
        return True

    def _perturb(self, params, theta):
        for p in params:
            p.add_(p.grad.sign(), alpha=RHO)


@pytest.fixture
def sign_ascent(monkeypatch):
    registry.register(
        registry.Member(
            "perturbation",
            "sign_ascent",
            lambda c, params, steps_per_epoch, sgd, engine: SignAscent(params, torch.optim.SGD, **sgd, **engine),
        )
    )
    monkeypatch.setitem(
        METHODS, "sign_ascent", Method("sign_ascent", ("stages.perturbation=sign_ascent",), 2, "a test's perturbation")
    )
    yield
    registry.unregister("perturbation", "sign_ascent")


def test_a_new_perturbation_is_one_declaration_and_one_preset(sign_ascent, tmp_path):
    config = resolve(TrainConfig(method="sign_ascent", epochs=1), SMALL)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    theta = [p.detach().clone() for p in model.parameters()]
    opt = stages.build_optimizer(config, model.parameters())
    assert isinstance(opt, SignAscent)

    def loss_at(weights):  # the step by hand: SGD (lr 0.1, weight decay 1e-4) with the gradient at θ+ρ·sign(g)
        w = [t.clone().requires_grad_() for t in weights]
        return nn.functional.cross_entropy(x @ w[0].T + w[1], y), w

    loss, w = loss_at(theta)
    g = torch.autograd.grad(loss, w)
    loss_up, w_up = loss_at([t + RHO * gi.sign() for t, gi in zip(theta, g)])
    g_up = torch.autograd.grad(loss_up, w_up)
    expected = [t - 0.1 * (gi + 1e-4 * t) for t, gi in zip(theta, g_up)]

    def closure():
        opt.zero_grad()
        out = nn.functional.cross_entropy(model(x), y)
        out.backward()
        return out

    opt.step(closure)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
    metrics = train(config, tmp_path / "run", progress=False)  # the trainer takes it as any other member
    assert math.isfinite(metrics["test_nll"]) and metrics["method"] == "sign_ascent"


# -- a new member with settings: one module, found where its stage's members live ----------------------------------
NEW_MEMBER = '''"""A perturbation written by the test: the gradient at θ + ρ·sign(∇J(θ)), with its own --set section."""
from dataclasses import dataclass

import torch

from advreg.perturb.engine import PerturbedOptimizer
from advreg.registry import Member, register


@dataclass(frozen=True)
class SignStepConfig:
    rho: float = 0.01


class SignStep(PerturbedOptimizer):
    def __init__(self, params, base_optimizer, rho, **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        self.rho = rho

    def _is_active(self):
        return True

    def _perturb(self, params, theta):
        for p in params:
            p.add_(p.grad.sign(), alpha=self.rho)


register(Member("perturbation", "sign_step", lambda c, params, steps_per_epoch, sgd, engine: SignStep(
    params, torch.optim.SGD, c.rho, **sgd, **engine), SignStepConfig))
'''

PROBE = """import json, sys
import advreg.perturb
advreg.perturb.__path__.append(sys.argv[1])  # the folder holds one more module of the perturbation stage
import torch
from advreg import stages
from advreg.config import TrainConfig
from advreg.methods import resolve
config = resolve(TrainConfig(), ["stages.perturbation=sign_step", "sign_step.rho=0.02"])
opt = stages.build_optimizer(config, [torch.nn.Parameter(torch.zeros(2))])
try:
    resolve(TrainConfig(), ["sign_step.rho=0.03"])  # the key exists, and matters only to a run that chooses it
    refused = ""
except ValueError as err:
    refused = str(err)
print(json.dumps({"optimizer": type(opt).__name__, "rho": opt.rho, "section": config.to_dict()["sign_step"],
                  "loaded": TrainConfig.from_dict(config.to_dict()) == config, "refused": refused}))
"""


def test_a_new_member_with_settings_is_one_module_and_the_config_gets_its_section(tmp_path):
    (tmp_path / "sign_step.py").write_text(NEW_MEMBER)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen.pop("refused").startswith("sign_step.rho configures the sign_step perturbation")
    assert seen == {"optimizer": "SignStep", "rho": 0.02, "section": {"rho": 0.02}, "loaded": True}
    assert "sign_step" not in {f.name for f in dataclasses.fields(TrainConfig)}  # this process never loaded it


def test_a_member_section_that_the_config_has_already_is_refused():
    clash = registry.Member(
        "loss", "clash", lambda c, ce, loss_config: None, section="optim", config=type(TrainConfig().optim)
    )
    registry.register(clash)
    try:
        with pytest.raises(ValueError, match="declares the section 'optim', which the run's config has already"):
            config_module.with_member_sections(type("Probe", (), {"__annotations__": {"optim": "OptimConfig"}}))
    finally:
        registry.unregister("loss", "clash")


def test_a_member_declared_after_the_config_was_built_is_told_where_to_live():
    late = registry.Member("transform", "late", lambda c, box, loss: None, config=type(TrainConfig().mixup))
    registry.register(late)
    try:
        with pytest.raises(
            ValueError,
            match="declares the section 'late', which the run's config lacks: declare it "
            "in a module of advreg.transforms",
        ):
            stages.section(TrainConfig(), late)
    finally:
        registry.unregister("transform", "late")


@pytest.mark.parametrize(
    "method, setting",
    [
        ("amp", "amp.epsilon=-1"),
        ("amp", "amp.inner_steps=-1"),
        ("amp", "amp.every=0"),
        ("amp", "amp.reuse=both"),
        ("amp", "amp.norm=l1"),
        ("sam", "sam.rho=-1"),
        ("sam", "sam.eta=-1"),
        ("rmp", "rmp.epsilon=-1"),
        ("at_awp", "awp.gamma=-1"),
        ("at_awp", "awp.steps=0"),
        ("at_awp", "awp.warmup=-1"),
        ("at_rwp", "rwp.gamma=-1"),
    ],
)
def test_a_perturbation_checks_its_section_without_parameters_as_its_optimizer_does(method, setting):
    config = resolve(TrainConfig(method=method), [setting])
    with pytest.raises(ValueError) as checked:
        stages.check_members(config)
    with pytest.raises(ValueError) as built:
        stages.build_optimizer(config, nn.Linear(2, 2).parameters())
    key = setting.split("=")[0]
    assert str(checked.value) == str(built.value) and key in str(checked.value)  # the --set key, named once


def test_validate_builds_no_optimizer(monkeypatch):
    import advreg.train as training

    def refuse(*args, **kwargs):
        raise AssertionError("validate built an optimizer")

    monkeypatch.setattr(training, "build_optimizer", refuse)
    monkeypatch.setattr(stages, "build_optimizer", refuse)
    training.validate(resolve(TrainConfig(method="amp"), []))
    with pytest.raises(ValueError, match="optim.nesterov needs optim.momentum > 0"):
        training.validate(resolve(TrainConfig(), ["optim.nesterov=true", "optim.momentum=0"]))
