"""The members of the three stages of a step, each declared where it is defined.

A member (a batch transform, a loss, a weight perturbation) calls :func:`register` once, in its own module, with
its stage, its name, the frozen dataclass of its config section and how it is built; the trainer's name lists,
its "is this member in use?" check and its builders (:mod:`advreg.stages`) are read from these declarations.
Adding a member is one new module in its stage's package that registers itself, plus a preset line in
:mod:`advreg.methods`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

STAGES = ("transform", "loss", "perturbation")
PACKAGES = {"transform": "advreg.transforms", "loss": "advreg.losses", "perturbation": "advreg.perturb"}


@dataclass(frozen=True)
class Member:
    """One member of a stage, as its module declares it.

    ``build`` makes the stage object from the member's config section (None without one); its other arguments are
    the stage's: a transform's ``(section, input_range, loss)`` with ``loss`` the run's loss :class:`Member`; a
    loss's ``(section, criterion, loss_config)``; a perturbation's ``(section, params, steps_per_epoch, sgd, engine)``,
    SGD's keywords and the engine's (``model``, ``grad_scaler``, ``no_sync``, ``perturb_on``; plain SGD leaves them).
    A loss declares what it needs of the batch: ``needs_clean`` (the clean inputs beside the transformed ones) and
    ``objective`` (the loss that adversarial examples maximize for it); a transform declares ``gives_clean``.
    ``check(section)`` raises ValueError on the settings its optimizer would refuse, so that a run's config is checked
    before any model exists (a transform or a loss is built for that: it needs nothing else).
    """

    stage: str  # transform | loss | perturbation
    name: str  # the value of stages.<stage>
    build: Callable[..., Any]
    config: type | None = None  # the frozen dataclass of its --set section (TrainConfig's field ``section``)
    section: str = ""  # the config section's name: the member's name unless given
    formerly: str = ""  # the section's name in the config.json of older runs, which still load
    needs_clean: bool = False
    objective: str = "ce"
    gives_clean: bool = False
    check: Callable[[Any], None] | None = None  # a perturbation's check of its section, without parameters

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"a member's stage is one of {STAGES}, got {self.stage!r}")
        if self.config is not None and not self.section:
            object.__setattr__(self, "section", self.name)


_MEMBERS: dict[tuple[str, str], Member] = {}


def register(member: Member) -> Member:
    """Declare ``member``; a second member of the same stage and name is refused."""
    key = (member.stage, member.name)
    if _MEMBERS.get(key, member) is not member:
        raise ValueError(f"the {member.stage} {member.name!r} is declared twice; give the new one another name")
    _MEMBERS[key] = member
    return member


def unregister(stage: str, name: str) -> None:
    """Remove a declared member (a test's own, when it is done)."""
    _MEMBERS.pop((stage, name), None)


def members(stage: str) -> dict[str, Member]:
    """The members of ``stage`` by name, in the order they were declared (every module of the stage's package is
    loaded first: a member declared in a new module there needs no import line)."""
    package = importlib.import_module(PACKAGES[stage])
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)  # loaded once: Python caches it
    return {name: m for (s, name), m in _MEMBERS.items() if s == stage}


def get(stage: str, name: str) -> Member:
    """The member ``name`` of ``stage``; ValueError naming the choices when there is none."""
    found = members(stage)
    if name not in found:
        raise ValueError(f"unknown stages.{stage} {name!r}; choose one of: {', '.join(found)}")
    return found[name]


def owner_of(section: str) -> Member | None:
    """The member whose config section is ``section`` (None: a section of the trainer, such as optim)."""
    return next((m for stage in STAGES for m in members(stage).values() if m.section == section), None)


def in_use(stages: Any, key: str) -> bool:
    """Whether the dotted ``key`` matters to a run whose stage choices are ``stages`` (a StagesConfig): a key of a
    member's section only when that member is the run's choice for its stage."""
    member = owner_of(key.split(".")[0])
    return member is None or getattr(stages, member.stage) == member.name
