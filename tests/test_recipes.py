"""The AMP paper's training recipe (Sec. 5.1) as a preset under the method and the user's settings."""

from pathlib import Path

import pytest
import torch

from advreg import bench, cli
from advreg.config import AMPConfig, DataConfig, TrainConfig
from advreg.recipes import RECIPES, with_recipe
from advreg.train import milestone_epochs, validate


def config_of(argv):
    return cli.make_config(cli.build_parser().parse_args(["train", "--out", "unused", *argv]))


def test_the_paper_protocol_for_preactresnet18_and_vgg16():
    amp = config_of(["--dataset", "cifar10", "--recipe", "amp_preactresnet18", "--method", "amp"])
    assert (amp.model.name, amp.epochs, amp.recipe) == ("preact_resnet18", 200, "amp_preactresnet18")
    o = amp.optim
    assert (o.lr, o.momentum, o.nesterov, o.weight_decay, o.batch_size, o.lr_decay) == (0.1, 0.9, True, 1e-4, 50, 0.1)
    assert milestone_epochs(amp) == [100, 150]  # divided by 10 after 100 and 150 of 200 epochs
    assert (amp.data.augment, amp.data.val_fraction, amp.model.normalize) == ("standard", 0.1, True)
    assert amp.amp == AMPConfig(epsilon=0.5, inner_lr=1.0, inner_steps=1, norm="per_tensor")
    vgg = config_of(["--dataset", "cifar100", "--recipe", "amp_vgg16", "--method", "amp"])
    assert vgg.model.name == "vgg16" and vgg.amp == AMPConfig(
        epsilon=0.1, inner_lr=0.2, inner_steps=1, norm="per_tensor"
    )
    validate(amp)
    validate(vgg)


def test_baselines_share_the_protocol_without_amp_settings():
    erm = config_of(["--dataset", "cifar10", "--recipe", "amp_preactresnet18", "--method", "erm"])
    amp = config_of(["--dataset", "cifar10", "--recipe", "amp_preactresnet18", "--method", "amp"])
    assert erm.amp == AMPConfig() and erm.stages.perturbation == "none"
    assert erm.optim == amp.optim and erm.data == amp.data and erm.model == amp.model
    dropout = config_of(["--dataset", "cifar10", "--recipe", "amp_preactresnet18", "--method", "dropout"])
    assert dropout.model.dropout == 0.1 and dropout.optim == amp.optim  # the preset goes over the recipe
    validate(erm)


def test_user_settings_and_flags_go_over_the_recipe():
    c = config_of(
        [
            "--dataset",
            "cifar10",
            "--recipe",
            "amp_vgg16",
            "--method",
            "amp",
            "--epochs",
            "3",
            "--model",
            "preact_resnet18",
            "--set",
            "amp.epsilon=0.3",
            "--set",
            "optim.nesterov=false",
        ]
    )
    assert (c.epochs, c.model.name, c.amp.epsilon, c.amp.inner_lr, c.optim.nesterov) == (
        3,
        "preact_resnet18",
        0.3,
        0.2,
        False,
    )
    with pytest.raises(ValueError, match="does not use"):  # amp.* on ERM is still refused from the user
        config_of(["--dataset", "cifar10", "--recipe", "amp_vgg16", "--method", "erm", "--set", "amp.epsilon=0.3"])


@pytest.mark.parametrize(
    "dataset, augment",
    [("svhn", "digits"), ("gtsrb", "digits"), ("cifar100", "standard"), ("tinyimagenet", "standard")],
)
def test_no_horizontal_flip_for_digits_and_traffic_signs(dataset, augment):
    assert config_of(["--dataset", dataset, "--recipe", "amp_preactresnet18"]).data.augment == augment


def test_without_a_recipe_the_library_defaults_hold():
    c = config_of([])
    assert c == TrainConfig()
    assert with_recipe(TrainConfig(), None, []) == TrainConfig()


def test_a_recipe_needs_an_image_set_and_is_not_a_setting():
    with pytest.raises(ValueError, match="image network"):
        config_of(["--dataset", "mnist1d", "--recipe", "amp_vgg16"])
    with pytest.raises(ValueError, match="--recipe NAME"):
        config_of(["--dataset", "cifar10", "--set", "recipe=amp_vgg16"])


def test_unknown_recipe_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--out", "x", "--recipe", "resnet_magic"])
    assert "amp_preactresnet18" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown recipe"):
        validate(TrainConfig(recipe="resnet_magic"))


def test_bench_plans_every_row_under_the_recipe():
    base = TrainConfig(data=DataConfig(name="cifar10"), epochs=200)
    specs = bench.plan(
        base, ["erm", "amp"], 1, [], {"amp.epsilon": ["0.1", "0.5"]}, Path("out"), recipe="amp_preactresnet18"
    )
    by_row = {(s.method, s.point): s.config for s in specs}
    assert set(by_row) == {("erm", ()), ("amp", ("amp.epsilon=0.1",)), ("amp", ("amp.epsilon=0.5",))}
    assert all(c.optim.nesterov and c.recipe == "amp_preactresnet18" for c in by_row.values())
    assert by_row[("amp", ("amp.epsilon=0.1",))].amp.norm == "per_tensor"
    assert by_row[("erm", ())].amp == AMPConfig()


def test_every_recipe_builds_its_network():
    from advreg import models

    for recipe in RECIPES.values():
        net = models.build(recipe.model, 10, input_shape=(3, 32, 32))
        assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
