"""Run configuration: frozen dataclasses with the papers' defaults, overridden by ``--set key=value``.

A :class:`TrainConfig` and its JSON form (``config.json``) hold everything needed to rerun a run.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DataConfig:
    """The data set and its split: validation share, training share, label noise, folder, augmentation."""

    name: str = "mnist1d"
    val_fraction: float = 0.1  # carved out of the training set; the papers tune on 10% of it
    train_fraction: float = 1.0  # train on a random share of the rest (AMM paper, Sec. 4.3.2)
    label_noise: float = 0.0  # share of training labels replaced by random classes (AMM paper, Sec. 4.3.3)
    dir: str = ""  # the folder holding the image sets' files (cifar10, svhn, ...); "" is $ADVREG_DATA
    augment: str = "none"  # none | standard (crop 4 + flip) | digits (crop 2) | cutout | cifar_aa (AutoAugment)


@dataclass(frozen=True)
class ModelConfig:
    """The network: its name, hidden widths (MLP), dropout, normalization layers and input normalization."""

    name: str = "mlp"
    hidden: tuple[int, ...] = (100, 100)
    dropout: float = 0.0  # the Dropout baseline uses 0.1 after each ReLU
    dropout_layers: str = "all"  # all (AMP paper) | last: the penultimate layer only (ALPS paper, rate 0.5)
    norm: str = "batch"  # the image networks' normalization: batch | group (32 channels a group, AMM paper)
    normalize: bool = True  # image inputs (C, H, W): (x - mean)/std of the training set inside the model


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum and step decay (AMP paper, Sec. 5.1: lr 0.1, /10 at 50% and 75% of training)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    batch_size: int = 50
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs
    lr_decay: float = 0.1
    clip_grad: float = 0.0  # clip each gradient's global L2 norm to this (AMM paper, Sec. 4.2: 10); 0 is off


@dataclass(frozen=True)
class StagesConfig:
    """Which member of each stage a step uses (DESIGN §1)."""

    transform: str = "identity"  # identity | mixup | fgsm | alps | pgd (adversarial training's examples)
    perturbation: str = "none"  # none | amp | sam | rmp | awp | rwp
    loss: str = (
        "ce"  # ce (cross-entropy, with loss.smoothing and loss.flooding) | amm (CE + λ·margin term) | trades | mart
    )


@dataclass(frozen=True)
class LossConfig:
    """The cross-entropy of the ``ce`` and ``amm`` losses: label smoothing α and flood level b."""

    smoothing: float = 0.0  # label smoothing α (AMP paper: 0.2)
    flooding: float = 0.0  # flood level b (AMP paper: 0.02); 0 is off


@dataclass(frozen=True)
class RobustConfig:
    """Robust errors each epoch (AWP paper: PGD-20 with the training threat model) and the best checkpoint by
    validation robust error beside the last; in pixel levels of the input range like ``pgd``."""

    track: bool = False  # the adversarial-training presets turn it on
    pixels: float = 8.0
    step_pixels: float = 2.0
    steps: int = 20
    norm: str = "linf"  # linf | l2
    margin_samples: int = 1000  # metrics.json's test_margin (DeepFool L2) over the first N test samples; 0 is off


@dataclass(frozen=True)
class SpeedConfig:
    """How the passes run: beyond floating-point rounding, only ``perturb_on`` (which gradient builds Δ under DDP)
    and float16's skipped overflowing steps change what training computes."""

    precision: str = (
        "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast with a GradScaler: an overflowing step is skipped)
    )
    channels_last: bool = False  # image networks and batches in channels-last memory format
    compile: bool = False  # torch.compile the model
    perturb_on: str = "local"  # under torchrun: Δ from each replica's slice of the batch (local) or the whole (global)


def declared_members() -> list[Any]:
    """Every stage member that declares a config section (:class:`advreg.registry.Member`), in declaration order."""
    from advreg import registry  # the members' modules import nothing of this one

    return [m for stage in registry.STAGES for m in registry.members(stage).values() if m.config is not None]


def former_sections() -> dict[str, str]:
    """The former name of a member's section (in the config.json of older runs) -> its name now."""
    return {m.formerly: m.section for m in declared_members() if m.formerly}


def with_member_sections(cls: type) -> type:
    """Give ``cls`` one field per stage member that declares a config section (:mod:`advreg.registry`), after its
    ``loss`` field: a member's settings are declared in its own module, and this is where the run's config gets them."""
    declared, own = declared_members(), cls.__dict__.get("__annotations__", {})
    for member in declared:
        if member.section in own:
            raise ValueError(
                f"the {member.stage} {member.name!r} declares the section {member.section!r}, which "
                "the run's config has already; give the member another name or section"
            )
    annotations: dict[str, Any] = {}
    for name, kind in own.items():
        annotations[name] = kind
        if name == "loss":
            for member in declared:
                annotations[member.section] = member.config
                setattr(cls, member.section, field(default_factory=member.config))
    cls.__annotations__ = annotations
    return cls


@dataclass(frozen=True)
@with_member_sections
class TrainConfig:
    """Everything that defines a run: the method preset, seed, epochs and device, and one section per part of the
    run (``data``, ``model``, ``optim``, ``stages``, ``loss``, then one per stage member that declares settings, named
    after it (``amp``, ``pgd``, ...; :func:`with_member_sections`), then ``robust``, ``speed``); each dotted key is a
    ``--set`` key. Checked as it is built: a float setting must be finite, the seed in range."""

    method: str = "erm"
    recipe: str = ""  # the training recipe the run was built with (advreg.recipes), for the record
    seed: int = 0
    epochs: int = 100
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def __post_init__(self) -> None:  # every way a config is built (--set, config.json, Python) is checked
        check_numbers(self)
        check_seed(self.seed)

    def to_dict(self) -> dict[str, Any]:
        """The nested dict of every setting, the form of config.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """The config of ``to_dict``'s form (a config.json), sections under their former names included."""
        renamed = former_sections()
        return _from_dict(cls, {renamed.get(k, k): v for k, v in data.items()}, prefix="")


def __getattr__(name: str) -> type:
    """A stage member's config dataclass by its class name (``advreg.config.AMPConfig``), as it was importable
    before each member declared its own in its module."""
    found = {m.config.__name__: m.config for m in declared_members()}
    if name in found:
        return found[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# torch seeds from [-2^63, 2^64 - 1], negative ones taken mod 2^64 (-1 is 2^64 - 1), and replica r of a run draws
# from seed + train.REPLICA_SEED_STRIDE·r: in the signed 64-bit range no two seeds share a stream and no replica's
# seed leaves torch's range
SEED_RANGE = (-(2**63), 2**63 - 1)
FLOAT32_MAX = 3.4028234663852886e38  # a setting past it is inf in a float32 tensor (and 1e309 is inf already)


def check_numbers(config: Any, prefix: str = "") -> None:
    """Refuse a NaN, an infinite value, or one beyond float32's range in any float setting of ``config`` (tuples of
    floats included): it would train on NaN, and config.json cannot hold it (JSON has no NaN or Infinity)."""
    for name, kind in typing.get_type_hints(type(config)).items():
        value, key = getattr(config, name), prefix + name
        if dataclasses.is_dataclass(value):
            check_numbers(value, key + ".")
        elif _is_float_kind(kind):
            items = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, numbers.Real) and not abs(v) <= FLOAT32_MAX for v in items):  # NaN fails too
                default = getattr(type(config)(), name)
                raise ValueError(
                    f"{key} must be a finite number, at most {FLOAT32_MAX:.4g} in size (the tensors' "
                    f"float32), got {value!r}; give one, e.g. --set {key}={_text(default)} (the default)"
                )


def check_seed(seed: Any) -> None:
    low, high = SEED_RANGE
    if isinstance(seed, numbers.Integral) and not low <= seed <= high:
        raise ValueError(f"seed must be in [-2**63, 2**63 - 1], the signed 64-bit range torch seeds from, got {seed}")


def _is_float_kind(kind: Any) -> bool:
    return kind is float or (typing.get_origin(kind) is tuple and typing.get_args(kind)[0] is float)


def _text(value: Any) -> str:
    """``value`` as ``--set`` writes it: a tuple as comma-separated items."""
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def override(config: Any, assignments: list[str]) -> Any:
    """Apply ``key=value`` strings (dotted keys, e.g. ``amp.epsilon=0.2``) to a frozen config."""
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {assignment!r} (example: --set amp.epsilon=0.2)")
        section, _, rest = key.strip().partition(".")
        new = former_sections().get(section) if isinstance(config, TrainConfig) else None
        if new:
            raise ValueError(f"the {section} section is now {new}: use --set {new}.{rest}={text.strip()}")
        config = _replace(config, key.strip().split("."), text.strip(), key.strip())
    return config


def keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key that ``--set`` accepts."""
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out += keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return out


def _replace(config: Any, path: list[str], text: str, full_key: str) -> Any:
    hints = typing.get_type_hints(type(config))
    name = path[0]
    if name not in hints:
        parents = full_key.split(".")[: -len(path)]
        prefix = ".".join(parents) + "." if parents else ""
        raise ValueError(f"unknown setting {full_key!r}; valid keys: {', '.join(keys(config, prefix))}")
    current = getattr(config, name)
    if dataclasses.is_dataclass(current):
        if len(path) == 1:
            raise ValueError(f"{full_key!r} is a section; set one of its keys, e.g. {keys(current, name + '.')[0]}")
        return dataclasses.replace(config, **{name: _replace(current, path[1:], text, full_key)})
    if len(path) > 1:
        raise ValueError(f"unknown setting {full_key!r}: {name!r} has no sub-keys")
    return dataclasses.replace(config, **{name: parse_value(text, hints[name], full_key)})


def parse_value(text: str, kind: Any, key: str) -> Any:
    """Parse ``text`` as a value of type ``kind`` (bool, int, float, str or tuple of those)."""
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        parts = [p for p in text.replace(" ", "").split(",") if p]
        return tuple(parse_value(p, item, key) for p in parts)
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key} expects true or false, got {text!r}")
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"{key} expects a value of type {kind.__name__}, got {text!r}") from None


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(sorted(prefix + k for k in unknown))}")
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _from_dict(kind, value, f"{prefix}{name}.")
        elif typing.get_origin(kind) is tuple:
            values[name] = tuple(value)
        else:
            values[name] = value
    return cls(**values)
