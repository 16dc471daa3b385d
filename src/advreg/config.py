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
class AMPConfig:
    """The ``amp`` perturbation (Zheng et al., Algorithm 1): ball radius ε, inner step ζ and steps N, the ball's norm,
    and the efficient mode's refresh period and reuse."""
    epsilon: float = 0.5
    inner_lr: float = 1.0
    inner_steps: int = 1
    norm: str = "global"
    every: int = 1  # the efficient mode: a fresh Δ every k steps, the last one reused in between (1 is AMP)
    reuse: str = "delta"  # what the steps in between reuse: delta (θ + the kept Δ) | gradient (LookSAM's)
    alpha: float = 0.7  # reuse=gradient: the weight of the reused orthogonal gradient (LookSAM's α)


@dataclass(frozen=True)
class SAMConfig:
    """The ``sam`` perturbation (Foret et al.): radius ρ, and ASAM's adaptive ball (Kwon et al.) with its η."""
    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.01  # ASAM's T = |θ| + η on every tensor (0: davda54/sam's T = |θ|)


@dataclass(frozen=True)
class StagesConfig:
    """Which member of each stage a step uses (DESIGN §1)."""
    transform: str = "identity"  # identity | mixup | fgsm | alps | pgd (adversarial training's examples)
    perturbation: str = "none"  # none | amp | sam | rmp | awp | rwp
    loss: str = "ce"  # ce (cross-entropy, with loss.smoothing and loss.flooding) | amm (CE + λ·margin term) | trades | mart


@dataclass(frozen=True)
class LossConfig:
    """The cross-entropy of the ``ce`` and ``amm`` losses: label smoothing α and flood level b."""
    smoothing: float = 0.0  # label smoothing α (AMP paper: 0.2)
    flooding: float = 0.0  # flood level b (AMP paper: 0.02); 0 is off


@dataclass(frozen=True)
class MixupConfig:
    """The ``mixup`` transform (Zhang et al.): the Beta(α, α) that draws λ."""
    alpha: float = 1.0  # λ ~ Beta(α, α)


@dataclass(frozen=True)
class ALPSConfig:
    """The ``alps`` transform (Guo et al., Algorithm 1): the Beta(α, β) of λ and the label ball's radius ε."""
    alpha: float = 9.0  # λ ~ Beta(α, β), mode (α-1)/(α+β-2) = 0.89
    beta: float = 2.0
    epsilon: float = 0.2  # L1 radius of the label ball, in (0, 0.5)


@dataclass(frozen=True)
class FGSMConfig:
    """FGSM examples of the AMP paper's adversarial-training baseline (Sec. 5.1), the ``fgsm`` transform."""
    pixels: float = 1.0  # FGSM step in 8-bit levels of the input range: ε = pixels·(hi - lo)/255


@dataclass(frozen=True)
class RMPConfig:
    """The ``rmp`` perturbation: AMP's random baseline, Δ uniform in an L2 ball."""
    epsilon: float = 0.1  # radius of the L2 ball Δ is drawn from


@dataclass(frozen=True)
class AMMConfig:
    """AMM's margin term (Yan et al.); the defaults are the paper's MIN+EXP (Appendix Table 1), u = 6 (Sec. 4.2)."""
    lam: float = 32.0  # λ, the weight of L_DD
    c: float = 2.0  # scale of correctly classified samples' norms
    d: float = 1.0  # scale of misclassified samples' norms
    aggregation: str = "min"  # avg | min
    shrinkage: str = "exp"  # lin | exp | inv
    steps: int = 6  # u, DeepFool's maximal iterations
    overshoot: float = 0.02
    high_order: bool = True  # differentiate through ∇f; false is the ablation of Sec. 4.3.1
    top_fraction: float = 0.2  # MIN's second condition: among the batch's 20% smallest norms
    clip_value: float = 50.0  # cap of each sample's λ·R term, the truncation of EXP and INV (authors' code)
    candidates: int = 0  # DeepFool's classes: the top ones at x (the authors' code: 10); 0 is all K


@dataclass(frozen=True)
class PGDConfig:
    """The ``pgd`` transform: PGD examples of adversarial training (AWP paper, Sec. 4.4: PGD-10, L∞ 8/255 step 2/255; L2: 128 and 15),
    in pixel levels of the input range (ε = pixels·(hi - lo)/255)."""
    pixels: float = 8.0
    step_pixels: float = 2.0
    steps: int = 10
    norm: str = "linf"  # linf | l2


@dataclass(frozen=True)
class TRADESConfig:
    """The ``trades`` loss (Zhang et al., ICML 2019)."""
    beta: float = 6.0  # weight of KL(p(x) ‖ p(x')) (TRADES paper; AWP paper Eq. 2)


@dataclass(frozen=True)
class MARTConfig:
    """The ``mart`` loss (Wang et al., ICLR 2020)."""
    beta: float = 6.0  # λ of the misclassification-weighted KL (AWP paper Eq. 3; the MART code's beta)


@dataclass(frozen=True)
class AWPConfig:
    """The ``awp`` perturbation (Wu, Xia & Wang, Algorithm 2): the per-layer radius γ, ascent steps, warm-up."""
    gamma: float = 0.01  # ‖v_l‖ ≤ γ‖w_l‖ per layer (AWP paper: 0.01 for AT, 0.005 for TRADES and MART)
    steps: int = 1  # K2 ascent steps of size γ/K2 (Appendix D)
    warmup: int = 0  # epochs of plain adversarial training before AWP starts


@dataclass(frozen=True)
class RWPConfig:
    """The ``rwp`` perturbation: AWP's random baseline, a random direction at the per-layer radius γ."""
    gamma: float = 0.01  # ‖v_l‖ = γ‖w_l‖, random direction (AWP paper, Sec. 5.3)


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
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast with a GradScaler: an overflowing step is skipped)
    channels_last: bool = False  # image networks and batches in channels-last memory format
    compile: bool = False  # torch.compile the model
    perturb_on: str = "local"  # under torchrun: Δ from each replica's slice of the batch (local) or the whole (global)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run: the method preset, seed, epochs and device, and one section per part of the
    run (``data``, ``model``, ``optim``, ``stages``, ``loss``, one per stage member, ``robust``, ``speed``); each
    dotted key is a ``--set`` key. Checked as it is built: a float setting must be finite, the seed in range."""
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
    mixup: MixupConfig = field(default_factory=MixupConfig)
    alps: ALPSConfig = field(default_factory=ALPSConfig)
    fgsm: FGSMConfig = field(default_factory=FGSMConfig)
    amp: AMPConfig = field(default_factory=AMPConfig)
    sam: SAMConfig = field(default_factory=SAMConfig)
    rmp: RMPConfig = field(default_factory=RMPConfig)
    amm: AMMConfig = field(default_factory=AMMConfig)
    pgd: PGDConfig = field(default_factory=PGDConfig)
    trades: TRADESConfig = field(default_factory=TRADESConfig)
    mart: MARTConfig = field(default_factory=MARTConfig)
    awp: AWPConfig = field(default_factory=AWPConfig)
    rwp: RWPConfig = field(default_factory=RWPConfig)
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
        return _from_dict(cls, {RENAMED_SECTIONS.get(k, k): v for k, v in data.items()}, prefix="")


RENAMED_SECTIONS = {"adv": "fgsm", "at": "pgd"}  # config.json of older runs: the sections' former names


# torch seeds from [-2^63, 2^64 - 1], negative ones taken mod 2^64 (-1 is 2^64 - 1), and replica r of a run draws
# from seed + train.REPLICA_SEED_STRIDE·r: in the signed 64-bit range no two seeds share a stream and no replica's
# seed leaves torch's range
SEED_RANGE = (-2**63, 2**63 - 1)
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
                raise ValueError(f"{key} must be a finite number, at most {FLOAT32_MAX:.4g} in size (the tensors' "
                                 f"float32), got {value!r}; give one, e.g. --set {key}={_text(default)} (the default)")


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
        if isinstance(config, TrainConfig) and section in RENAMED_SECTIONS:
            new = RENAMED_SECTIONS[section]
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
        parents = full_key.split(".")[:-len(path)]
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

