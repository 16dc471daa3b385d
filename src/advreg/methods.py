"""The named methods of the papers as presets of the three stages of a step (DESIGN §1).

batch transform → loss → weight perturbation: a preset is a few settings of the stages; any other
combination is written with ``--set`` (e.g. ``--method amp --set stages.transform=mixup``).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from advreg import transforms
from advreg.config import TrainConfig, override
from advreg.losses import AMMLoss, LossStage, OnLogits, OnPair, make_loss, mart_loss, trades_loss
from advreg.perturb import AMP, AWP, RMP, RWP, SAM

PERTURBATIONS = ("none", "amp", "sam", "rmp", "awp", "rwp")
LOSSES = ("ce", "amm", "trades", "mart")
PAIR_LOSSES = {"trades": trades_loss, "mart": mart_loss}  # on clean and adversarial logits: need stages.transform=pgd
# the config section that configures each stage member; setting it while the member is off is an error
SECTION_OF = {"mixup": ("transform", "mixup"), "alps": ("transform", "alps"), "adv": ("transform", "fgsm"),
              "at": ("transform", "pgd"), "amp": ("perturbation", "amp"), "sam": ("perturbation", "sam"),
              "rmp": ("perturbation", "rmp"), "awp": ("perturbation", "awp"), "rwp": ("perturbation", "rwp"),
              "amm": ("loss", "amm"), "trades": ("loss", "trades"), "mart": ("loss", "mart")}
TRAINER_SECTIONS = ("optim", "robust")  # trainer options: a preset may set them, and a user may set them back
AT = ("stages.transform=pgd", "robust.track=True")
AT_PAPER = "Madry et al., ICLR 2018; PGD-10, L∞ 8/255 step 2/255"
AWP_PAPER = "Wu, Xia & Wang, NeurIPS 2020, Algorithm 2"


@dataclass(frozen=True)
class Method:
    name: str
    settings: tuple[str, ...]  # key=value overrides of the defaults (ERM)
    passes: str  # forward/backward passes per step
    paper: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("erm", (), "1", "empirical risk minimization (AMP paper, Sec. 5.1)"),
    Method("dropout", ("model.dropout=0.1",), "1", "Srivastava et al., JMLR 2014; 10% after each ReLU"),
    Method("label_smoothing", ("loss.smoothing=0.2",), "1", "Szegedy et al., CVPR 2016; α = 0.2"),
    Method("flooding", ("loss.flooding=0.02",), "1", "Ishida et al., ICML 2020; b = 0.02"),
    Method("mixup", ("stages.transform=mixup",), "1", "Zhang et al., ICLR 2018; λ ~ Beta(1, 1)"),
    Method("adv", ("stages.transform=fgsm",), "2 (1 for the example)",
           "Goodfellow et al., ICLR 2015; FGSM training, 1 pixel level"),
    Method("alps", ("stages.transform=alps",), "2 (1 without gradients, for k*)",
           "Guo et al., IJCAI 2021, Algorithm 1"),
    Method("rmp", ("stages.perturbation=rmp",), "1", "AMP paper's random model perturbation, radius 0.1"),
    Method("amp", ("stages.perturbation=amp",), "N+1", "Zheng et al., CVPR 2021, Algorithm 1"),
    Method("sam", ("stages.perturbation=sam",), "2", "Foret et al., ICLR 2021"),
    Method("amm", ("stages.loss=amm", "optim.clip_grad=10.0"),
           "1, then up to u passes of C copies and 1+u forwards with AVG, twice with MIN (DeepFool, u = 6, "
           "C = amm.candidates, 2 copies for a misclassified sample)",
           "Yan, Guo & Zhang, TPAMI; MIN+EXP, λ = 32, c = 2, d = 1, gradients clipped at 10"),
    Method("at", AT, "11 (10 for PGD)", AT_PAPER),
    Method("trades", (*AT, "stages.loss=trades"), "13 (11 for PGD: p(x) and 10 steps; 2 for the loss)",
           "Zhang et al., ICML 2019; β = 6"),
    Method("mart", (*AT, "stages.loss=mart"), "12 (10 for PGD, 2 for the loss)", "Wang et al., ICLR 2020; β = 6"),
    Method("at_awp", (*AT, "stages.perturbation=awp"), "12", f"{AWP_PAPER}; γ = 0.01 (Sec. 4.4)"),
    Method("at_rwp", (*AT, "stages.perturbation=rwp"), "11", "AWP paper's random weight perturbation; γ = 0.01"),
    Method("trades_awp", (*AT, "stages.loss=trades", "stages.perturbation=awp", "awp.gamma=0.005"), "15",
           f"{AWP_PAPER}, Eq. 16; γ = 0.005 (Sec. 5.1)"),
    Method("mart_awp", (*AT, "stages.loss=mart", "stages.perturbation=awp", "awp.gamma=0.005"), "14",
           f"{AWP_PAPER}, Eq. 17; γ = 0.005 (Sec. 5.1)"),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def resolve(config: TrainConfig, user_settings: list[str]) -> TrainConfig:
    """``config`` with its method's preset applied, then the user's ``key=value`` settings.

    Raises ValueError when a setting contradicts the preset's own stage choice, or configures a stage
    member that is not in use (``amp.epsilon`` without the AMP perturbation): both would be ignored.
    """
    method = get_method(config.method)
    preset = dict(s.split("=", 1) for s in method.settings)
    for setting in user_settings:
        key, _, value = setting.partition("=")
        key = key.strip()
        if key.startswith("stages.") and key in preset and preset[key] != value.strip():
            raise ValueError(f"--method {method.name} sets {key}={preset[key]}; use another --method "
                             f"(or erm) with --set {key}={value.strip()} instead")
    resolved = override(override(config, list(method.settings)), user_settings)
    check_sections_in_use(resolved, [s.partition("=")[0].strip() for s in user_settings])
    return resolved


def check_sections_in_use(config: TrainConfig, keys: list[str]) -> None:
    for key in keys:
        section = key.split(".")[0]
        if section in SECTION_OF:
            stage, member = SECTION_OF[section]
            if getattr(config.stages, stage) != member:
                owner = next(m.name for m in METHODS.values() if f"stages.{stage}={member}" in m.settings)
                raise ValueError(f"{key} configures the {member} {stage}, which this run does not use; "
                                 f"add --set stages.{stage}={member} (or use --method {owner})")


def check_preset(config: TrainConfig) -> None:
    """Each preset setting must be on: a config built without ``resolve``, or with the method's regularizer
    set back to its ERM value (``--method dropout --set model.dropout=0``), would train ERM under its name."""
    erm = TrainConfig()
    for setting in get_method(config.method).settings:
        key, value = setting.split("=", 1)
        section, name = key.split(".")
        have = getattr(getattr(config, section), name)
        if section == "stages" and have != value:
            raise ValueError(f"method {config.method} needs {key}={value}, the config has {have}; "
                             "build it with advreg.methods.resolve")
        if section not in TRAINER_SECTIONS and have == getattr(getattr(erm, section), name):
            raise ValueError(f"method {config.method} with {key}={have} is ERM; use --method erm, or give "
                             f"{key} a value that turns the regularizer on (the preset's is {value})")


def validate_stages(config: TrainConfig) -> None:
    if config.stages.transform not in transforms.TRANSFORMS:
        raise ValueError(f"unknown stages.transform {config.stages.transform!r}; "
                         f"choose one of: {', '.join(transforms.TRANSFORMS)}")
    if config.stages.loss not in LOSSES:
        raise ValueError(f"unknown stages.loss {config.stages.loss!r}; choose one of: {', '.join(LOSSES)}")
    if config.stages.perturbation not in PERTURBATIONS:
        raise ValueError(f"unknown stages.perturbation {config.stages.perturbation!r}; "
                         f"choose one of: {', '.join(PERTURBATIONS)}")
    if config.stages.loss in PAIR_LOSSES and config.stages.transform != "pgd":
        raise ValueError(f"stages.loss={config.stages.loss} needs adversarial examples beside the clean batch; "
                         f"add --set stages.transform=pgd (or use --method {config.stages.loss})")


def build_transform(config: TrainConfig, input_range: tuple[float, float]) -> transforms.Transform:
    kind = config.stages.transform
    if kind == "mixup":
        return transforms.MixUp(config.mixup.alpha)
    if kind == "fgsm":
        return transforms.FGSMExamples(config.adv.pixels, input_range)
    if kind == "alps":
        return transforms.ALPS(config.alps.alpha, config.alps.beta, config.alps.epsilon)
    if kind == "pgd":  # the examples maximize the loss's own adversarial term: TRADES's KL, else CE
        a, loss = config.at, config.stages.loss
        return transforms.PGDExamples(a.pixels, a.step_pixels, a.steps, a.norm, input_range,
                                      objective="kl" if loss == "trades" else "ce", keep_clean=loss in PAIR_LOSSES)
    return transforms.identity


def build_loss(config: TrainConfig) -> LossStage:
    criterion = make_loss(config.loss.smoothing, config.loss.flooding)
    if config.stages.loss == "amm":
        return AMMLoss(criterion, **dataclasses.asdict(config.amm))  # the section's keys are AMMLoss's
    if config.stages.loss in PAIR_LOSSES:
        if config.loss.smoothing or config.loss.flooding:
            raise ValueError("loss.smoothing and loss.flooding apply to the ce and amm losses, not to "
                             f"{config.stages.loss}; leave them at 0")
        beta = getattr(config, config.stages.loss).beta
        if beta < 0:
            raise ValueError(f"{config.stages.loss}.beta must be >= 0, got {beta!r} (the papers use 6)")
        return OnPair(functools.partial(PAIR_LOSSES[config.stages.loss], beta=beta))
    return OnLogits(criterion)


def build_optimizer(config: TrainConfig, params: Iterable[torch.Tensor], steps_per_epoch: int = 1,
                    **engine: Any) -> torch.optim.Optimizer:
    """SGD, or SGD wrapped by the configured weight perturbation (AWP's warm-up counts ``steps_per_epoch``);
    ``engine`` holds the perturbation engine's options (``model``, ``grad_scaler``, ``no_sync``), unused by SGD."""
    o = config.optim
    sgd = dict(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
    kind = config.stages.perturbation
    if kind == "none":
        return torch.optim.SGD(params, **sgd)
    sgd.update(engine)
    if kind == "amp":
        a = config.amp
        return AMP(params, torch.optim.SGD, epsilon=a.epsilon, inner_lr=a.inner_lr, inner_steps=a.inner_steps,
                   norm=a.norm, every=a.every, reuse=a.reuse, alpha=a.alpha, **sgd)
    if kind == "sam":
        s = config.sam
        return SAM(params, torch.optim.SGD, rho=s.rho, adaptive=s.adaptive, eta=s.eta, **sgd)
    if kind == "rmp":
        return RMP(params, torch.optim.SGD, epsilon=config.rmp.epsilon, **sgd)
    if kind == "awp":
        a = config.awp
        if not (isinstance(a.warmup, int) and a.warmup >= 0):
            raise ValueError(f"awp.warmup is a number of epochs >= 0, got {a.warmup!r}")
        return AWP(params, torch.optim.SGD, gamma=a.gamma, steps=a.steps, warmup_steps=a.warmup * steps_per_epoch,
                   **sgd)
    if kind == "rwp":
        return RWP(params, torch.optim.SGD, gamma=config.rwp.gamma, **sgd)
    raise ValueError(f"unknown stages.perturbation {kind!r}; choose one of: {', '.join(PERTURBATIONS)}")
