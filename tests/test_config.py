"""Frozen configuration and ``--set key=value`` overrides."""
import dataclasses

import pytest

from advreg.config import TrainConfig, keys, override


def test_override_parses_each_type():
    c = override(TrainConfig(), ["amp.epsilon=0.2", "amp.inner_steps=3", "model.hidden=200, 50",
                                 "optim.nesterov=true", "amp.norm=per_tensor", "optim.milestones="])
    assert (c.amp.epsilon, c.amp.inner_steps, c.model.hidden) == (0.2, 3, (200, 50))
    assert c.optim.nesterov is True and c.amp.norm == "per_tensor" and c.optim.milestones == ()
    assert TrainConfig().amp.epsilon == 0.5  # defaults untouched: frozen, replaced not mutated
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 3


def test_json_round_trip():
    c = override(TrainConfig(), ["model.hidden=7,8", "sam.adaptive=yes"])
    assert TrainConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("bad, words", [
    ("amp.eps=1", "unknown setting 'amp.eps'.*amp.epsilon"),
    ("amp=1", "section"),
    ("epsilon", "key=value"),
    ("amp.epsilon=big", "float"),
    ("amp.inner_steps=1.5", "int"),
    ("optim.nesterov=maybe", "true or false"),
    ("seed.x=1", "no sub-keys"),
])
def test_bad_overrides_say_what_to_do(bad, words):
    with pytest.raises(ValueError, match=words):
        override(TrainConfig(), [bad])


def test_keys_lists_every_leaf():
    assert {"amp.epsilon", "optim.lr", "model.dropout", "data.val_fraction", "seed"} <= set(keys(TrainConfig()))
