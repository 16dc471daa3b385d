"""The three stages of a step built from a run's config (DESIGN §1): batch transform → loss → weight perturbation.

Each stage's members declare themselves (:mod:`advreg.registry`); this module reads the run's choice of each stage
(``stages.*``), checks that the choices fit together, and builds them from their config sections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Iterable, Iterator

import torch

from advreg import registry
from advreg.config import TrainConfig
from advreg.losses import LossStage, make_loss
from advreg.transforms import Transform


def section(config: TrainConfig, member: registry.Member) -> Any:
    """The member's config section in ``config`` (None for a member without settings)."""
    if member.config is None:
        return None
    if not hasattr(config, member.section):  # declared after advreg.config was loaded: TrainConfig has no field
        raise ValueError(
            f"the {member.stage} {member.name!r} declares the section {member.section!r}, which the run's "
            f"config lacks: declare it in a module of {registry.PACKAGES[member.stage]}, which "
            "advreg.config loads"
        )
    return getattr(config, member.section)


@contextlib.contextmanager
def config_keys(member: registry.Member) -> Iterator[None]:
    """A member names its own parameters in its errors (``pixels must be >= 0``); a ValueError raised inside
    names them as the ``--set`` keys of the member's section (``fgsm.pixels must be >= 0``)."""
    try:
        yield
    except ValueError as err:
        if member.config is None:
            raise
        names = "|".join(f.name for f in dataclasses.fields(member.config))
        # a parameter as a sentence's subject or in a list of them, not an ordinary word ("a fresh Δ every k steps")
        pattern = rf"(?<![\w.'\"])({names})(?= must| \(| and |, | >| <|=| an | is | ')"
        raise ValueError(re.sub(pattern, rf"{member.section}.\1", str(err))) from None


def chosen(config: TrainConfig, stage: str) -> registry.Member:
    """The member that ``config`` chooses for ``stage``; ValueError naming the choices for an unknown one."""
    return registry.get(stage, getattr(config.stages, stage))


def validate_stages(config: TrainConfig) -> None:
    """Raise ValueError on an unknown member, or a loss that needs clean inputs the transform does not give."""
    transform, loss = chosen(config, "transform"), chosen(config, "loss")
    chosen(config, "perturbation")
    if loss.needs_clean and not transform.gives_clean:
        givers = [m.name for m in registry.members("transform").values() if m.gives_clean]
        raise ValueError(
            f"stages.loss={loss.name} needs adversarial examples beside the clean batch; "
            f"add --set stages.transform={givers[0]} (or use --method {loss.name})"
        )


def check_members(config: TrainConfig) -> None:
    """Raise ValueError, before any data or model exists, on a setting that the run's members refuse: the transform
    and the loss are built (from their settings alone), the perturbation checks its section (``Member.check``)."""
    validate_stages(config)
    build_transform(config, (0.0, 1.0))  # the range only scales the sizes in pixel levels
    build_loss(config)
    member = chosen(config, "perturbation")
    if member.check is not None:
        with config_keys(member):
            member.check(section(config, member))


def build_transform(config: TrainConfig, input_range: tuple[float, float]) -> Transform:
    """The run's batch transform; sizes in pixel levels of ``input_range``, examples for the run's loss."""
    member = chosen(config, "transform")
    with config_keys(member):
        return member.build(section(config, member), input_range, chosen(config, "loss"))


def build_loss(config: TrainConfig) -> LossStage:
    """The run's loss stage, around the cross-entropy of ``loss.smoothing`` and ``loss.flooding``."""
    member = chosen(config, "loss")
    criterion = make_loss(config.loss.smoothing, config.loss.flooding)
    with config_keys(member):
        return member.build(section(config, member), criterion, config.loss)


def build_optimizer(
    config: TrainConfig, params: Iterable[torch.Tensor], steps_per_epoch: int = 1, **engine: Any
) -> torch.optim.Optimizer:
    """SGD, or SGD wrapped by the configured weight perturbation (AWP's warm-up counts ``steps_per_epoch``);
    ``engine`` holds the perturbation engine's options (``model``, ``grad_scaler``, ``no_sync``), unused by SGD."""
    o = config.optim
    sgd = dict(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
    member = chosen(config, "perturbation")
    with config_keys(member):
        return member.build(section(config, member), params, steps_per_epoch, sgd, engine)
