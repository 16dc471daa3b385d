"""The named methods of the papers as presets of the three stages of a step (DESIGN §1).

batch transform → loss → weight perturbation: a preset is a few settings of the stages; any other
combination is written with ``--set`` (e.g. ``--method amp --set stages.transform=mixup``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from advreg import registry
from advreg.config import TrainConfig, override

TRAINER_SECTIONS = ("optim", "robust")  # trainer options: a preset may set them, and a user may set them back
AT = ("stages.transform=pgd", "robust.track=True")
AT_PAPER = "Madry et al., ICLR 2018; PGD-10, L∞ 8/255 step 2/255"
AWP_PAPER = "Wu, Xia & Wang, NeurIPS 2020, Algorithm 2"


@dataclass(frozen=True)
class Method:
    """A named method of the papers: its settings of the stages (over the ERM defaults), the forward passes of the
    model per step (a count, a function of the run's config, or None where the data decide: AMM's DeepFool),
    where it comes from, and what the passes are."""

    name: str
    settings: tuple[str, ...]  # key=value overrides of the defaults (ERM)
    passes: int | Callable[[TrainConfig], int] | None
    paper: str
    passes_note: str = ""

    def forward_passes(self, config: TrainConfig) -> int | None:
        """The model's forward passes in one training step of ``config`` (None: they depend on the batch)."""
        return self.passes(config) if callable(self.passes) else self.passes


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("erm", (), 1, "empirical risk minimization (AMP paper, Sec. 5.1)"),
        Method("dropout", ("model.dropout=0.1",), 1, "Srivastava et al., JMLR 2014; 10% after each ReLU"),
        Method("label_smoothing", ("loss.smoothing=0.2",), 1, "Szegedy et al., CVPR 2016; α = 0.2"),
        Method("flooding", ("loss.flooding=0.02",), 1, "Ishida et al., ICML 2020; b = 0.02"),
        Method("mixup", ("stages.transform=mixup",), 1, "Zhang et al., ICLR 2018; λ ~ Beta(1, 1)"),
        Method(
            "adv",
            ("stages.transform=fgsm",),
            2,
            "Goodfellow et al., ICLR 2015; FGSM training, 1 pixel level",
            "1 for the example",
        ),
        Method(
            "alps", ("stages.transform=alps",), 2, "Guo et al., IJCAI 2021, Algorithm 1", "1 without gradients, for k*"
        ),
        Method("rmp", ("stages.perturbation=rmp",), 1, "AMP paper's random model perturbation, radius 0.1"),
        Method(
            "amp", ("stages.perturbation=amp",), lambda c: c.amp.inner_steps + 1, "Zheng et al., CVPR 2021, Algorithm 1"
        ),
        Method("sam", ("stages.perturbation=sam",), 2, "Foret et al., ICLR 2021"),
        Method(
            "amm",
            ("stages.loss=amm", "optim.clip_grad=10.0"),
            None,
            "Yan, Guo & Zhang, TPAMI; MIN+EXP, λ = 32, c = 2, d = 1, gradients clipped at 10",
            "1, then up to u passes of C copies and 1+u forwards with AVG, twice with MIN (DeepFool, u = 6, "
            "C = amm.candidates, 2 copies for a misclassified sample)",
        ),
        Method("at", AT, lambda c: c.pgd.steps + 1, AT_PAPER, "pgd.steps for PGD"),
        Method(
            "trades",
            (*AT, "stages.loss=trades"),
            lambda c: c.pgd.steps + 3,
            "Zhang et al., ICML 2019; β = 6",
            "pgd.steps + 1 for PGD (p(x) and the steps), 2 for the loss",
        ),
        Method(
            "mart",
            (*AT, "stages.loss=mart"),
            lambda c: c.pgd.steps + 2,
            "Wang et al., ICLR 2020; β = 6",
            "pgd.steps for PGD, 2 for the loss",
        ),
        Method(
            "at_awp", (*AT, "stages.perturbation=awp"), lambda c: c.pgd.steps + 2, f"{AWP_PAPER}; γ = 0.01 (Sec. 4.4)"
        ),
        Method(
            "at_rwp",
            (*AT, "stages.perturbation=rwp"),
            lambda c: c.pgd.steps + 1,
            "AWP paper's random weight perturbation; γ = 0.01",
        ),
        Method(
            "trades_awp",
            (*AT, "stages.loss=trades", "stages.perturbation=awp", "awp.gamma=0.005"),
            lambda c: c.pgd.steps + 5,
            f"{AWP_PAPER}, Eq. 16; γ = 0.005 (Sec. 5.1)",
        ),
        Method(
            "mart_awp",
            (*AT, "stages.loss=mart", "stages.perturbation=awp", "awp.gamma=0.005"),
            lambda c: c.pgd.steps + 4,
            f"{AWP_PAPER}, Eq. 17; γ = 0.005 (Sec. 5.1)",
        ),
    )
}


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
            raise ValueError(
                f"--method {method.name} sets {key}={preset[key]}; use another --method "
                f"(or erm) with --set {key}={value.strip()} instead"
            )
    resolved = override(override(config, list(method.settings)), user_settings)
    check_sections_in_use(resolved, [s.partition("=")[0].strip() for s in user_settings])
    return resolved


def check_sections_in_use(config: TrainConfig, keys: list[str]) -> None:
    """Raise ValueError for a key of a stage member's section (``amp.epsilon``) when the run does not use that
    member: the setting would be ignored."""
    for key in keys:
        if not registry.in_use(config.stages, key):
            member = registry.owner_of(key.split(".")[0])
            choice = f"stages.{member.stage}={member.name}"
            owner = next((m.name for m in METHODS.values() if choice in m.settings), None)
            raise ValueError(
                f"{key} configures the {member.name} {member.stage}, which this run does not use; "
                f"add --set {choice}" + (f" (or use --method {owner})" if owner else "")
            )


def check_preset(config: TrainConfig) -> None:
    """Each preset setting must be on: a config built without ``resolve``, or with the method's regularizer
    set back to its ERM value (``--method dropout --set model.dropout=0``), would train ERM under its name."""
    erm = TrainConfig()
    for setting in get_method(config.method).settings:
        key, value = setting.split("=", 1)
        section, name = key.split(".")
        have = getattr(getattr(config, section), name)
        if section == "stages" and have != value:
            raise ValueError(
                f"method {config.method} needs {key}={value}, the config has {have}; "
                "build it with advreg.methods.resolve"
            )
        if section not in TRAINER_SECTIONS and have == getattr(getattr(erm, section), name):
            raise ValueError(
                f"method {config.method} with {key}={have} is ERM; use --method erm, or give "
                f"{key} a value that turns the regularizer on (the preset's is {value})"
            )
