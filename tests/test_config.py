"""Frozen configuration and ``--set key=value`` overrides."""

import dataclasses
import json
import math

import pytest
import torch

from advreg.config import OptimConfig, TrainConfig, keys, override
from advreg.train import REPLICA_SEED_STRIDE


def test_override_parses_each_type():
    c = override(
        TrainConfig(),
        [
            "amp.epsilon=0.2",
            "amp.inner_steps=3",
            "model.hidden=200, 50",
            "optim.nesterov=true",
            "amp.norm=per_tensor",
            "optim.milestones=",
        ],
    )
    assert (c.amp.epsilon, c.amp.inner_steps, c.model.hidden) == (0.2, 3, (200, 50))
    assert c.optim.nesterov is True and c.amp.norm == "per_tensor" and c.optim.milestones == ()
    assert TrainConfig().amp.epsilon == 0.5  # defaults untouched: frozen, replaced not mutated
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 3


def test_json_round_trip():
    c = override(TrainConfig(), ["model.hidden=7,8", "sam.adaptive=yes"])
    assert TrainConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "bad, words",
    [
        ("amp.eps=1", "unknown setting 'amp.eps'.*amp.epsilon"),
        ("amp=1", "section"),
        ("epsilon", "key=value"),
        ("amp.epsilon=big", "float"),
        ("amp.inner_steps=1.5", "int"),
        ("optim.nesterov=maybe", "true or false"),
        ("seed.x=1", "no sub-keys"),
    ],
)
def test_bad_overrides_say_what_to_do(bad, words):
    with pytest.raises(ValueError, match=words):
        override(TrainConfig(), [bad])


def test_keys_lists_every_leaf():
    assert {"amp.epsilon", "optim.lr", "model.dropout", "data.val_fraction", "seed"} <= set(keys(TrainConfig()))


def _float_keys(config, prefix=""):
    """Every dotted key of a float or tuple-of-floats field, read off the dataclasses."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_keys(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) or (isinstance(value, tuple) and value and isinstance(value[0], float)):
            yield prefix + f.name


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400", "1e300", "-3.5e38"])
def test_every_float_setting_refuses_a_non_finite_value(text):
    float_keys = list(_float_keys(TrainConfig()))
    assert {"optim.lr", "optim.weight_decay", "optim.lr_decay", "optim.milestones", "amp.epsilon"} <= set(float_keys)
    for key in float_keys:
        with pytest.raises(ValueError, match=f"{key} must be a finite number") as info:
            override(TrainConfig(), [f"{key}={text}"])
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="optim.milestones must be a finite"):
        override(TrainConfig(), [f"optim.milestones=0.5,{text}"])


def test_a_non_finite_value_is_refused_however_the_config_is_built():
    with pytest.raises(ValueError, match="optim.lr must be a finite number"):
        TrainConfig(optim=OptimConfig(lr=math.nan))
    with pytest.raises(ValueError, match="amp.epsilon must be a finite number"):  # a hand-edited config.json
        TrainConfig.from_dict(json.loads('{"amp": {"epsilon": Infinity}}'))
    # so any config writes as strict JSON (no NaN or Infinity tokens)
    assert TrainConfig.from_dict(json.loads(json.dumps(TrainConfig().to_dict(), allow_nan=False))) == TrainConfig()


@pytest.mark.parametrize(
    "seed, ok", [(0, True), (-(2**63), True), (2**63 - 1, True), (2**63, False), (2**64, False), (-(2**63) - 1, False)]
)
def test_the_seed_is_a_signed_64_bit_integer(seed, ok):
    if not ok:
        with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*63 - 1\]"):
            TrainConfig(seed=seed)
        return
    assert TrainConfig(seed=seed).seed == seed
    torch.Generator().manual_seed(seed)  # what the run's seed goes through: the data split, the shuffling,
    torch.Generator().manual_seed(seed + REPLICA_SEED_STRIDE * 1024)  # and a replica's stream under torchrun
