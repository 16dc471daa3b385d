"""Training recipes: the papers' full protocols (optimizer, schedule, augmentation, network, AMP's radius) by name.

A recipe is applied under the method preset and the user's ``--set``: ``advreg train --recipe amp_preactresnet18
--dataset cifar10 --method erm`` trains the paper's ERM baseline, ``--method amp`` its AMP, with the same protocol.
Its settings of a stage member (``amp.*``) apply only to runs that use that member.

Which ball: the AMP paper (Sec. 5.1) gives ε = 0.5, ζ = 1 for PreActResNet18 and ε = 0.1, ζ = 0.2 for VGG16, and
the authors' code (hiyouga/AMP-Regularizer) that produced its tables projects each parameter tensor on its own
ball of radius ε, not the whole Δ on one ball as Eq. 4-5 write. The recipes therefore set ``amp.norm=per_tensor``:
the paper's numbers mean that. Set ``amp.norm=global`` for the paper's equations; its ε then needs tuning (a
global ball of radius ε is far smaller than k per-tensor balls of radius ε for a network of k tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

from advreg.config import TrainConfig
from advreg.data import vision
from advreg.methods import resolve
from advreg.registry import in_use

AMP_PAPER_SGD = (  # AMP paper, Sec. 5.1; Nesterov momentum as the authors' code
    "optim.lr=0.1",
    "optim.momentum=0.9",
    "optim.nesterov=true",
    "optim.weight_decay=0.0001",
    "optim.batch_size=50",
    "optim.milestones=0.5,0.75",
    "optim.lr_decay=0.1",  # /10 after 100 and 150 of 200
    "data.val_fraction=0.1",
    "model.normalize=true",
)
NO_FLIP = ("svhn", "gtsrb")  # digits and traffic signs change meaning when mirrored


@dataclass(frozen=True)
class Recipe:
    """A paper's training protocol by name: its network, epochs, ``--set`` settings and where they come from."""

    name: str
    model: str
    epochs: int
    settings: tuple[str, ...]
    source: str


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "amp_preactresnet18",
            "preact_resnet18",
            200,
            (*AMP_PAPER_SGD, "amp.epsilon=0.5", "amp.inner_lr=1.0", "amp.inner_steps=1", "amp.norm=per_tensor"),
            "AMP paper, Sec. 5.1: ε = 0.5, ζ = 1, N = 1 (per-tensor ball, as the authors' code)",
        ),
        Recipe(
            "amp_vgg16",
            "vgg16",
            200,
            (*AMP_PAPER_SGD, "amp.epsilon=0.1", "amp.inner_lr=0.2", "amp.inner_steps=1", "amp.norm=per_tensor"),
            "AMP paper, Sec. 5.1: ε = 0.1, ζ = 0.2, N = 1 (per-tensor ball, as the authors' code)",
        ),
        Recipe(
            "amp_wrn28_10",
            "wrn28_10",
            200,
            (*AMP_PAPER_SGD, "amp.epsilon=0.5", "amp.inner_lr=1.0", "amp.inner_steps=1", "amp.norm=per_tensor"),
            'the reproduction report: WideResNet with PreActResNet18\'s settings ("the same set of hyperparameters")',
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_settings(name: str, config: TrainConfig, user_settings: list[str]) -> list[str]:
    """The settings recipe ``name`` gives the run ``config`` (its method and dataset set), to go before
    ``user_settings``: the augmentation for the dataset, and a stage member's keys only where the run uses it."""
    recipe = get_recipe(name)
    if config.data.name not in vision.READERS:
        raise ValueError(
            f"recipe {name} is the protocol of an image network; use it with one of "
            f"{', '.join(vision.READERS)}, not {config.data.name}"
        )
    used = resolve(config, user_settings)
    augment = "digits" if config.data.name in NO_FLIP else "standard"  # crop, and flip where it keeps the label
    settings = [f"recipe={name}", f"data.augment={augment}", *recipe.settings]
    return [s for s in settings if in_use(used.stages, s.partition("=")[0])]


def with_recipe(config: TrainConfig, name: str | None, user_settings: list[str]) -> TrainConfig:
    """``config`` (method, dataset, model, epochs set) under recipe ``name`` (None: none), then ``user_settings``."""
    if any(s.partition("=")[0].strip() == "recipe" for s in user_settings):
        raise ValueError(
            "recipe records the --recipe a run was built with; pass --recipe NAME instead of --set recipe=NAME"
        )
    if not name:
        return resolve(config, user_settings)
    return resolve(config, [*recipe_settings(name, config, user_settings), *user_settings])


def recipe_defaults(name: str | None, model: str | None, epochs: int | None) -> tuple[str, int]:
    """The model and epochs of a run: the user's where given, else the recipe's, else the library's defaults."""
    recipe = get_recipe(name) if name else None
    default_model, default_epochs = (recipe.model, recipe.epochs) if recipe else ("mlp", TrainConfig.epochs)
    return model or default_model, epochs if epochs is not None else default_epochs


__all__ = ["RECIPES", "Recipe", "get_recipe", "recipe_defaults", "recipe_settings", "with_recipe"]
