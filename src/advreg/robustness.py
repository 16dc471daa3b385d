"""Robust test error of a trained run: white-box FGSM and PGD, black-box transfer, and the unbounded-PGD sanity check.

Defaults follow the AMP paper (Appendix F): ε = 4 pixel levels, PGD with step 1 level and 10 steps, where a level is
1/255 of the data's input range; the sanity check (ALPS §5) is PGD without a ball, 200 steps of 0.01 of that range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from advreg.attacks import eval_mode, fgsm, pgd, pixel_level
from advreg.config import TrainConfig
from advreg.data import DataSplits
from advreg.evaluate import AttackSettings, predict_logits
from advreg.runs import CHECKPOINT, METRICS, RunFolder, load_config, load_weights, read_checkpoint
from advreg.train import build_model, load_data

ATTACKS = ("fgsm", "pgd", "autoattack")  # autoattack: the optional extra, pip install "advreg[autoattack]"
STANDARD_AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")  # AutoAttack's standard L∞ version, in its order
TARGET_CLASSES = 9  # the standard version's target classes of APGD-T and FAB-T


def load_run(folder: str | Path) -> tuple[TrainConfig, DataSplits, nn.Module]:
    """The config, data and final model of a finished run folder (weights read with weights_only=True)."""
    folder = finished_run(folder)
    config = load_config(folder)
    checkpoint = read_checkpoint(folder / CHECKPOINT)
    data = load_data(config)
    model = build_model(config, data)
    load_weights(model, checkpoint["model"], folder / CHECKPOINT)
    return config, data, model.eval()


def finished_run(folder: str | Path) -> Path:
    folder = Path(folder)
    if not (folder / METRICS).is_file() or not (folder / CHECKPOINT).exists():
        raise ValueError(
            f"{folder} holds no finished advreg run (config.json, checkpoint.pt, metrics.json); "
            "train it first with advreg train"
        )
    return folder


def default_settings(data: DataSplits, eps: float | None = None) -> AttackSettings:
    lo, hi = data.box()
    level = pixel_level((lo, hi))  # one 8-bit pixel level of the input range
    eps = 4 * level if eps is None else eps
    if not eps >= 0:
        raise ValueError(f"--eps must be >= 0 (in the data's units), got {eps}")
    alpha = level if eps >= level or eps == 0 else eps / 4  # the paper's step of 1 level; a 0-ball projects to x
    return AttackSettings(eps=eps, alpha=alpha, steps=10, box=(lo, hi))


def robust_errors(
    target: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: list[str],
    settings: AttackSettings,
    source: nn.Module | None = None,
    batch_size: int = 500,
) -> dict[str, float]:
    """Test error (%) of ``target`` on examples crafted on ``source`` (itself if None), per attack, and the
    point-wise worst case over them (``_worst``: a sample counts as broken if any attack breaks it)."""
    suffix = "" if source is None else "_transfer"
    crafter = target if source is None else source
    gen = torch.Generator().manual_seed(0)  # PGD's random start: the same examples on every call
    broken = {a: torch.zeros(len(y), dtype=torch.bool) for a in attacks}
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        for attack in attacks:
            adv = _craft(attack, crafter, xb, yb, settings, gen)
            broken[attack][i : i + batch_size] = (predict_logits(target, adv).argmax(1) != yb).cpu()
    errors = {f"test_error_{a}{suffix}": 100.0 * b.double().mean().item() for a, b in broken.items()}
    if len(attacks) > 1:
        worst = torch.stack(list(broken.values())).any(dim=0)
        errors[f"test_error_worst{suffix}"] = 100.0 * worst.double().mean().item()
    return errors


def _craft(
    attack: str, model: nn.Module, x: Tensor, y: Tensor, s: AttackSettings, generator: torch.Generator
) -> Tensor:
    if attack == "fgsm":
        return fgsm(model, x, y, s.eps, box=s.box)
    if attack == "autoattack":
        return autoattack(model, x, y, s.eps, s.box)
    return pgd(model, x, y, s.eps, s.alpha, s.steps, norm=s.norm, box=s.box, generator=generator)


@dataclass(frozen=True)
class AutoAttackPlan:
    """The standard version's attacks that apply to K classes and D features, and why the others do not."""

    attacks: tuple[str, ...]
    target_classes: int  # of APGD-T and FAB-T: min(9, K - 1), the classes ranked 2nd, 3rd, ... by the logits
    left_out: dict[str, str]  # attack -> why it does not run
    height: int  # AutoAttack sees a sample as a (1, height, D / height) image


def autoattack_plan(num_classes: int, features: int) -> AutoAttackPlan:
    """The standard ensemble with min(9, K - 1) target classes; APGD-T out for K < 4 (its targeted DLR loss
    divides by z_π1 - (z_π3 + z_π4)/2, four logits), Square out when no image of height > 1 has D pixels."""
    height = max(k for k in range(1, math.isqrt(features) + 1) if features % k == 0)
    left_out: dict[str, str] = {}
    if num_classes < 4:
        left_out["apgd-t"] = f"its targeted DLR loss needs at least 4 classes, the model has {num_classes}"
    if height == 1:
        left_out["square"] = f"it searches image patches, and {features} features make no image of height > 1"
    attacks = tuple(a for a in STANDARD_AUTOATTACK if a not in left_out)
    return AutoAttackPlan(attacks, min(TARGET_CLASSES, num_classes - 1), left_out, height)


def plan_for(model: nn.Module, x: Tensor) -> AutoAttackPlan:
    """:func:`autoattack_plan` for ``model``'s number of logits and ``x``'s sample size."""
    with torch.no_grad():
        num_classes = predict_logits(model, x[:1]).shape[1]
    return autoattack_plan(num_classes, x[0].numel())


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, box: tuple[float, float]) -> Tensor:
    """AutoAttack (Croce & Hein, ICML 2020), standard L∞ version, from the optional ``pyautoattack`` package.

    AutoAttack assumes images in [0, 1]: it attacks u ↦ f(lo + (hi - lo)·u) with ε/(hi - lo), the same problem in
    the data's own box, and sees a sample as a (1, h, D/h) image (its Square attack searches image patches; any
    reshaping bounds the same L∞ ball). The standard settings run, less the attacks that do not apply to the
    model's K classes and D features, with min(9, K - 1) target classes (:func:`autoattack_plan`).
    """
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise ValueError(
            'the autoattack attack needs the optional package pyautoattack: pip install "advreg[autoattack]"'
        ) from None
    lo, hi = box
    plan = plan_for(model, x)
    scaled = _UnitBox(model, lo, hi, x.shape[1:]).eval()
    attack = AutoAttack(scaled, eps=eps / (hi - lo), norm="Linf", seed=0, device=x.device, version="standard")
    attack.verbose = False
    attack.attacks_to_run = list(plan.attacks)  # the package's way to choose attacks; its settings stay standard
    attack.apgd_targeted.n_target_classes = attack.fab.n_target_classes = plan.target_classes
    with eval_mode(model):
        u = ((x - lo) / (hi - lo)).reshape(len(x), 1, plan.height, -1)
        u_adv, _ = attack.run_standard_evaluation(u, y, batch_size=len(y))  # (examples, their predictions)
    return lo + (hi - lo) * u_adv.detach().reshape(x.shape)


class _UnitBox(nn.Module):
    """f(lo + (hi - lo)·u): the model seen on image-shaped inputs u in [0, 1]."""

    def __init__(self, model: nn.Module, lo: float, hi: float, sample_shape: torch.Size):
        super().__init__()
        self.model, self.lo, self.scale, self.sample_shape = model, lo, hi - lo, tuple(sample_shape)

    def forward(self, u: Tensor) -> Tensor:
        return self.model(self.lo + self.scale * u.reshape(len(u), *self.sample_shape))


def sanity_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, steps: int = 200, alpha: float = 0.01, batch_size: int = 500
) -> float:
    """Accuracy (%) left after unbounded PGD: far above 0 means the gradients are masked, not the model robust."""
    right = 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        adv = pgd(model, xb, yb, eps=math.inf, alpha=alpha, steps=steps, norm="linf", random_start=False)
        right += (predict_logits(model, adv).argmax(1) == yb).sum().item()
    return 100.0 * right / len(y)


def attack_record(attacks: list[str], settings: AttackSettings, model: nn.Module, x: Tensor) -> dict[str, Any]:
    """The settings of the attacks that ran: ε and the norm; PGD's step and steps if PGD ran; AutoAttack's attacks,
    target classes and the attacks it left out, if it ran."""
    record: dict[str, Any] = {"attack_eps": settings.eps}
    if "pgd" in attacks:
        record.update(attack_alpha=settings.alpha, attack_steps=settings.steps)
    record["attack_norm"] = "linf"
    if "autoattack" in attacks:
        plan = plan_for(model, x)
        record.update(
            autoattack_attacks=list(plan.attacks),
            autoattack_target_classes=plan.target_classes,
            autoattack_left_out=plan.left_out,
        )
    return record


def evaluate_run(
    folder: str | Path,
    attacks: list[str],
    eps: float | None = None,
    source: str | Path | None = None,
    sanity: bool = False,
) -> dict[str, Any]:
    """Add robust test errors (and the attack settings) to the run's metrics.json; return the new keys. The run
    folder stays locked meanwhile: a ``train --resume`` of it waits for none of this and is refused instead."""
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"unknown attack(s) {', '.join(unknown) or '(none)'}; choose from: {', '.join(ATTACKS)}")
    with RunFolder(finished_run(folder)) as run_folder:  # checked first: no lock file in a folder without a run
        return _evaluate_locked(run_folder, attacks, eps, source, sanity)


def _evaluate_locked(
    run_folder: RunFolder, attacks: list[str], eps: float | None, source: str | Path | None, sanity: bool
) -> dict[str, Any]:
    config, data, model = load_run(run_folder.path)
    settings = default_settings(data, eps)
    x, y = data.test
    results: dict[str, Any] = robust_errors(model, x, y, attacks, settings)
    if source is not None:
        source_config, _, source_model = load_run(source)
        if source_config.data.name != config.data.name:
            raise ValueError(
                f"the source run was trained on {source_config.data.name}, the target on "
                f"{config.data.name}; transfer needs the same dataset"
            )
        results.update(robust_errors(model, x, y, attacks, settings, source=source_model))
        results["attack_source"] = str(source)
    if sanity:
        span = settings.box[1] - settings.box[0]  # 0.01 on [0, 1] images, as in ALPS; the same fraction elsewhere
        results["test_accuracy_pgd_unbounded"] = sanity_accuracy(model, x, y, alpha=0.01 * span)
    results.update(attack_record(attacks, settings, model, x))
    run_folder.write_metrics(results)
    return results
