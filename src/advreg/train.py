"""Train one configuration into a run folder: config.json, history.csv, metrics.json and checkpoint.pt.

The checkpoint, written atomically after every epoch, holds the model, optimizer, scheduler and RNG
states, so ``resume=True`` continues an interrupted run to the numbers of an uninterrupted one (CPU).
The folder itself (lock, checks, files) is :mod:`advreg.runs`; this module builds the run and loops.
"""

from __future__ import annotations

import copy
import math
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import advreg
from advreg import distributed, models
from advreg.config import OptimConfig, TrainConfig
from advreg.data import DataSplits, TensorLoader, augment, load_dataset
from advreg.evaluate import AttackSettings, evaluate, margin, robust_error
from advreg.methods import check_preset, resolve
from advreg.perturb import NonFiniteLossError
from advreg.perturb.engine import PERTURB_ON
from advreg.recipes import get_recipe
from advreg.runs import (  # noqa: F401
    BEST,
    CHECKPOINT,
    CONFIG,
    HISTORY,
    METRICS,
    RunFolder,
    RunFolderError,
    check_same_run,
    load_weights,
    open_run,
    read_best,
    read_checkpoint,
    same_config,
)
from advreg.stages import build_loss, build_optimizer, build_transform, check_members
from advreg.step import PRECISIONS, Step

REPLICA_SEED_STRIDE = 7919  # replica r > 0 draws from seed + stride·r; replica 0 from the one-process stream
MIN_LOSS_SCALE = 1.0  # below it, float16 training has been skipping every step (GradScaler starts at 2^16)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or inf."""


@dataclass
class Run:
    """Everything a configuration builds; the training state lives in these objects."""

    config: TrainConfig
    data: DataSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: TensorLoader
    generator: torch.Generator  # the shuffling order
    device: torch.device
    box: tuple[float, float]  # the input range (DataSplits.box), computed once
    step: Step  # transform → loss → perturbation → optimizer on one batch
    robust: AttackSettings | None  # the PGD of the robust errors tracked each epoch (robust.track), or None
    augment: augment.Augment | None = None  # crop/flip/Cutout/AutoAugment of image batches, before stage 1
    scaler: torch.amp.GradScaler | None = None  # speed.precision=fp16: the loss scale (checkpointed)
    train_model: nn.Module | None = None  # what the training passes call: the model's DDP wrapper or torch.compile
    replicas: distributed.Replicas | None = None  # under torchrun: this process's rank among the replicas

    @property
    def forward_model(self) -> nn.Module:
        return self.model if self.train_model is None else self.train_model


def train(config: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``config`` into folder ``out`` and return the final metrics (also in metrics.json).

    Under ``torchrun`` (WORLD_SIZE > 1) the replicas train it together (:mod:`advreg.distributed`); replica 0
    writes the folder."""
    out = Path(out)
    validate(config)
    replicas = distributed.from_environment(config.device)
    try:
        return _train(config, out, resume, progress, replicas)
    finally:
        if replicas is not None:
            replicas.close()


def _train(
    config: TrainConfig, out: Path, resume: bool, progress: bool, replicas: distributed.Replicas | None
) -> dict[str, Any]:
    if replicas is None:
        folder, checkpoint = open_run(out, config, resume)
    else:
        folder, checkpoint = _open_together(out, config, resume, replicas)
    try:  # folder: locked by this process (replica 0), None on the other replicas
        return _train_in(out, folder, config, checkpoint, progress, replicas)
    finally:
        if folder is not None:
            folder.release()


def _train_in(
    out: Path,
    folder: RunFolder | None,
    config: TrainConfig,
    checkpoint: dict[str, Any] | None,
    progress: bool,
    replicas: distributed.Replicas | None,
) -> dict[str, Any]:
    run = build_run(config, replicas)
    start, history = restore(run, checkpoint, out / CHECKPOINT) if checkpoint else (0, [])
    if folder is not None and not (out / CONFIG).exists():  # only now: a setting that cannot build leaves no
        folder.write_config(config, code_version())  # config.json that would block the corrected command
    if folder is not None and checkpoint:  # derived from the checkpoint: complete, whenever the last run was killed
        folder.write_history(history)
    bar = tqdm(
        range(start, config.epochs),
        initial=start,
        total=config.epochs,
        unit="epoch",
        desc=f"{config.method} seed {config.seed}",
        disable=not (progress and folder is not None),
        leave=False,
    )
    for epoch in bar:
        history.append(run_epoch(run, epoch))
        snapshot = _snapshot(run, epoch + 1, history)
        if folder is not None:  # best.pt before the checkpoint: a kill in between redoes this epoch and this save
            best = {"epoch": epoch + 1, "model": run.model.state_dict()} if _is_best(history) else None
            folder.save_epoch(snapshot, best)
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val_err=f"{history[-1]['val_error']:.1f}")
    if replicas is not None:
        replicas.barrier()  # best.pt is written
    metrics = final_metrics(run, history, out / BEST)
    if replicas is not None:
        metrics["world_size"] = replicas.world
    return metrics if folder is None else folder.write_metrics(metrics)


def validate(config: TrainConfig) -> None:
    """Raise ValueError, before any work, on a setting that cannot run."""
    check_preset(config)
    check_members(config)
    if config.recipe:
        get_recipe(config.recipe)
    validate_speed(config)
    if not (isinstance(config.epochs, int) and config.epochs >= 1):
        raise ValueError(f"epochs must be an integer >= 1, got {config.epochs!r}")
    if not (0 < config.data.train_fraction <= 1 and 0 <= config.data.label_noise <= 1):
        raise ValueError(
            f"data.train_fraction must be in (0, 1] and data.label_noise in [0, 1], got "
            f"{config.data.train_fraction!r} and {config.data.label_noise!r}"
        )
    validate_optim(config.optim)
    r = config.robust
    if r.margin_samples < 0:
        raise ValueError(f"robust.margin_samples must be >= 0 (0 leaves test_margin out), got {r.margin_samples!r}")
    if r.norm not in ("linf", "l2") or r.pixels < 0 or r.step_pixels <= 0 or r.steps < 1:
        raise ValueError(
            f"robust.norm must be linf or l2, robust.pixels >= 0, robust.step_pixels > 0 and "
            f"robust.steps >= 1, got {r.norm!r}, {r.pixels!r}, {r.step_pixels!r}, {r.steps!r}"
        )
    if any(not 0 < f <= 1 for f in config.optim.milestones):
        raise ValueError(f"optim.milestones are fractions of the epochs in (0, 1], got {config.optim.milestones}")
    if config.model.name not in models.MODELS:
        raise ValueError(f"unknown model {config.model.name!r}; choose one of: {', '.join(models.MODELS)}")
    if config.model.norm not in models.NORMS or config.data.augment not in augment.PRESETS:
        raise ValueError(
            f"model.norm must be one of {models.NORMS} and data.augment one of {tuple(augment.PRESETS)}, "
            f"got {config.model.norm!r} and {config.data.augment!r}"
        )
    models.check_options(config.model.hidden, config.model.dropout, config.model.dropout_layers)
    resolve_device(config.device)


def validate_optim(o: OptimConfig) -> None:
    if o.batch_size < 1 or o.lr <= 0 or o.clip_grad < 0:
        raise ValueError("optim.batch_size must be >= 1, optim.lr > 0 and optim.clip_grad >= 0 (0 is off)")
    if o.momentum < 0 or o.weight_decay < 0 or (o.nesterov and o.momentum == 0):
        raise ValueError(
            f"optim.momentum and optim.weight_decay must be >= 0, and optim.nesterov needs "
            f"optim.momentum > 0, got {o.momentum!r}, {o.weight_decay!r}, {o.nesterov!r}"
        )


def validate_speed(config: TrainConfig) -> None:
    sp = config.speed
    if sp.precision not in PRECISIONS:
        raise ValueError(f"speed.precision must be one of {PRECISIONS}, got {sp.precision!r}")
    if sp.precision == "fp16" and config.optim.clip_grad > 0:
        raise ValueError(
            "optim.clip_grad clips each pass's gradient, which float16 training keeps scaled; "
            "use speed.precision=bf16 (no loss scale) or optim.clip_grad=0"
        )
    if sp.perturb_on not in PERTURB_ON:
        raise ValueError(f"speed.perturb_on must be local or global, got {sp.perturb_on!r}")
    for name in ("channels_last", "compile"):
        if not isinstance(getattr(sp, name), bool):
            raise ValueError(f"speed.{name} must be true or false, got {getattr(sp, name)!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but CUDA is not available; use --set device=cpu")
    return device


def build_run(config: TrainConfig, replicas: distributed.Replicas | None = None) -> Run:
    """Data, model, optimizer and schedule of ``config``, seeded: the same config builds the same run
    (under ``replicas``, the model is wrapped in DistributedDataParallel for the training passes)."""
    torch.manual_seed(config.seed)
    device = distributed.replica_device(resolve_device(config.device), replicas)
    data = _to_device(load_data(config), device)
    model = build_model(config, data).to(device)
    if config.speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(config.seed)
    loader = TensorLoader(*data.train, config.optim.batch_size, shuffle=True, generator=generator)
    if replicas is not None:
        _check_last_batch(len(data.train[1]), config.optim.batch_size, replicas.world)
    scaler = torch.amp.GradScaler(device.type) if config.speed.precision == "fp16" else None
    train_model, engine = _training_model(config, model, device, scaler, replicas)
    optimizer = build_optimizer(config, model.parameters(), steps_per_epoch=len(loader), **engine)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestone_epochs(config), gamma=config.optim.lr_decay)
    box = data.box()  # the input range: the attacks' clip and the unit of their sizes
    if replicas is not None and replicas.rank > 0:  # its own dropout masks, MixUp partners, PGD starts (not rank 0's)
        torch.manual_seed(config.seed + REPLICA_SEED_STRIDE * replicas.rank)
    step = Step(
        model if train_model is None else train_model,
        build_transform(config, box),
        build_loss(config),
        optimizer,
        data.num_classes,
        config.speed.precision,
        scaler,
        config.optim.clip_grad,
        transform_model=model if replicas is not None else None,
    )
    return Run(
        config,
        data,
        model,
        optimizer,
        scheduler,
        loader,
        generator,
        device,
        box,
        step,
        _robust_settings(config, box),
        _augmentation(config, data),
        scaler,
        train_model,
        replicas,
    )


def _check_last_batch(rows: int, batch_size: int, world: int) -> None:
    last = rows % batch_size
    if 0 < last < world:
        raise ValueError(
            f"the last batch of each epoch has {last} rows, fewer than the {world} replicas; choose an "
            f"optim.batch_size whose remainder in the {rows} training rows is 0 or at least {world}"
        )


def _training_model(
    config: TrainConfig,
    model: nn.Module,
    device: torch.device,
    scaler: torch.amp.GradScaler | None,
    replicas: distributed.Replicas | None,
) -> tuple[nn.Module | None, dict[str, Any]]:
    """What the training passes call (the DDP wrapper, torch.compile; None: the model itself) and the perturbation
    engine's options: the scaler (unscale each pass that builds Δ, skip an overflowing step), the model (BatchNorm
    bookkeeping without hooks, which torch.compile needs) and, under DDP, ``no_sync`` and ``perturb_on``."""
    engine: dict[str, Any] = dict(model=model, grad_scaler=scaler)
    train_model = None
    if replicas is not None:  # the passes that build Δ stay local to each replica (speed.perturb_on=local)
        train_model = replicas.wrap(model, device)
        engine.update(no_sync=train_model.no_sync, perturb_on=config.speed.perturb_on)
    if config.speed.compile:
        train_model = torch.compile(train_model if train_model is not None else model)
    return train_model, engine


def milestone_epochs(config: TrainConfig) -> list[int]:
    """The epochs after which the learning rate is multiplied by ``optim.lr_decay``."""
    return sorted({max(1, round(f * config.epochs)) for f in config.optim.milestones})


def build_model(config: TrainConfig, data: DataSplits) -> nn.Module:
    """The configured network for ``data``; image inputs are normalized by the training set's channel statistics
    inside it (``model.normalize``), so that attacks and augmentation work on pixels in [0, 1]."""
    m = config.model
    mean = std = None
    if m.normalize and len(data.input_shape) == 3:
        mean, std = (t.tolist() for t in augment.channel_stats(data.train[0].cpu()))
    return models.build(
        m.name,
        data.num_classes,
        input_shape=data.input_shape,
        hidden=m.hidden,
        dropout=m.dropout,
        dropout_layers=m.dropout_layers,
        norm=m.norm,
        mean=mean,
        std=std,
    )


def _augmentation(config: TrainConfig, data: DataSplits) -> augment.Augment | None:
    name = config.data.augment
    if name not in augment.PRESETS:
        raise ValueError(f"unknown data.augment {name!r}; choose one of: {', '.join(augment.PRESETS)}")
    if name != "none" and len(data.input_shape) != 3:
        raise ValueError(
            f"data.augment={name} crops and flips images; {data.name} has inputs of shape "
            f"{data.input_shape}: leave data.augment=none"
        )
    return None if name == "none" else augment.PRESETS[name]


def _robust_settings(config: TrainConfig, box: tuple[float, float]) -> AttackSettings | None:
    r = config.robust
    return AttackSettings.in_levels(r.pixels, r.step_pixels, r.steps, r.norm, box) if r.track else None


def load_data(config: TrainConfig) -> DataSplits:
    """The splits of ``config``'s run (its seed picks the validation rows, the training share and the noise)."""
    d = config.data
    return load_dataset(
        d.name,
        seed=config.seed,
        val_fraction=d.val_fraction,
        train_fraction=d.train_fraction,
        label_noise=d.label_noise,
        data_dir=d.dir or None,
    )


def run_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training set, then the schedule's step and an evaluation; a history row."""
    start, lr = time.perf_counter(), run.optimizer.param_groups[0]["lr"]
    train_loss, train_error = train_epoch(run, epoch)
    run.scheduler.step()
    seconds = time.perf_counter() - start  # training only: the evaluation below is not counted
    val, test = evaluate(run.model, *run.data.val), evaluate(run.model, *run.data.test)
    row = {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": train_loss,
        "train_error": train_error,
        "val_loss": val["nll"],
        "val_error": val["error"],
        "test_loss": test["nll"],
        "test_error": test["error"],
    }
    if run.robust is not None:
        row.update(
            val_robust_error=robust_error(run.model, *run.data.val, run.robust),
            test_robust_error=robust_error(run.model, *run.data.test, run.robust),
        )
    return {**row, "seconds": seconds}


def train_epoch(run: Run, epoch: int) -> tuple[float, float]:
    """One pass over the training set: the running loss and error (%) of each step's first pass (at θ, or at θ+Δ
    for a perturbation without a clean pass: RMP, RWP, and AMP's steps between refreshes with ``amp.every``)."""
    run.model.train()
    losses, sizes, predictions, labels = [], [], [], []  # reduced once at the end: no work per step
    for x, y in run.loader:
        loss, logits, y = train_step(run, x, y)
        losses.append(loss.detach())
        sizes.append(len(y))
        predictions.append(logits)
        labels.append(y)
    weights = torch.tensor(sizes, device=run.device, dtype=torch.float64)
    wrong = (torch.cat(predictions).argmax(dim=1) != torch.cat(labels)).sum()
    totals = torch.stack([(torch.stack(losses).double() * weights).sum(), wrong.double(), weights.sum()])
    if run.replicas is not None:
        run.replicas.sum(totals)
    loss_sum, wrong_count, n = totals.tolist()  # one host synchronisation per epoch
    train_loss = loss_sum / n
    if not math.isfinite(train_loss):
        raise TrainingDiverged(
            f"the training loss became {train_loss} in epoch {epoch + 1}; {suspects(run.config, perturbed=False)}"
        )
    if run.scaler is not None and run.scaler.get_scale() < MIN_LOSS_SCALE:  # every step overflows: none is taken
        raise TrainingDiverged(
            f"float16 training skipped its steps until the loss scale fell to "
            f"{run.scaler.get_scale():.3g} in epoch {epoch + 1}: the passes overflow float16 "
            "whatever the scale. Use speed.precision=bf16 or fp32, or lower the perturbation radius"
        )
    return train_loss, 100.0 * wrong_count / n


def _is_best(history: list[dict[str, float]]) -> bool:
    """The last epoch has the lowest validation robust error so far (the first of a tie wins)."""
    if "val_robust_error" not in history[-1]:
        return False
    return all(history[-1]["val_robust_error"] < row["val_robust_error"] for row in history[:-1])


def train_step(run: Run, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One optimizer step of ``run`` on the loader's batch ``(x, y)`` (augmented, and this replica's shard of it
    under DDP): the loss and the logits of the pass the optimizer reports (:class:`advreg.Step`), and the labels
    of the rows this replica trained on."""
    x, y, weight = _batch(run, x, y)
    try:
        out = run.step(x, y, weight)
    except NonFiniteLossError as err:
        raise TrainingDiverged(
            f"training {run.config.method} diverged: {err}; in this run, {suspects(run.config, err.perturbed)}"
        ) from None
    return out.loss, out.logits, y


def _batch(run: Run, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
    """The augmented batch (this replica's slice under DDP) and the weight of its mean loss, so that the replicas'
    average gradient is the whole batch's."""
    if run.augment is not None:  # the loader's generator draws it: checkpointed, so a resumed run is the same
        x = run.augment(x, run.generator)
    weight = 1.0
    if run.replicas is not None:  # augmented as a whole, as in one process; then this replica's slice
        x, y, weight = run.replicas.shard(x, y)
    if run.config.speed.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y, weight


RADIUS_KEYS = {
    "amp": ("amp.epsilon", "amp.inner_lr"),
    "sam": ("sam.rho",),
    "awp": ("awp.gamma",),
    "rmp": ("rmp.epsilon",),
    "rwp": ("rwp.gamma",),
}  # the size of each weight perturbation's Δ
LOSS_KEYS = {
    "ce": ("loss.flooding", "loss.smoothing"),
    "amm": ("amm.lam",),
    "trades": ("trades.beta",),
    "mart": ("mart.beta",),
}  # what scales each loss stage (a 0 is off)


def suspects(config: TrainConfig, perturbed: bool) -> str:
    """What to lower after a NaN or inf loss, the likeliest setting first: the perturbation's size if only a
    ``perturbed`` pass (at θ+Δ) was non-finite; else the learning rate, the loss's settings that are on, or the
    perturbation's size (its gradient moved the weights). First the one furthest above its method's default."""
    radius = RADIUS_KEYS.get(config.stages.perturbation, ())
    loss = tuple(key for key in LOSS_KEYS.get(config.stages.loss, ()) if _setting(config, key))
    preset = resolve(TrainConfig(method=config.method), [])

    def excess(key: str) -> float:  # a default of 0 (a loss term off by default) tells nothing
        default = _setting(preset, key)
        return abs(_setting(config, key) / default) if default else 1.0

    first, *others = sorted(radius if perturbed else ("optim.lr", *loss, *radius), key=excess, reverse=True)
    text = f"lower {first} (now {_setting(config, first)}) and start again"
    rest = ", ".join(f"{key} (now {_setting(config, key)})" for key in others)
    return text + (f"; next suspects: {rest}" if others else "")


def _setting(config: TrainConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def final_metrics(run: Run, history: list[dict[str, float]], best: Path | None = None) -> dict[str, Any]:
    """Flat metrics of the final weights: errors and ECE in percent, NLL in nats, the test margin (DeepFool L2);
    with robust tracking, also the robust errors of the last and the ``best`` checkpoint (:func:`robust_metrics`)."""
    metrics: dict[str, Any] = {
        "method": run.config.method,
        "seed": run.config.seed,
        "epochs": run.config.epochs,
        "train_seconds": sum(row["seconds"] for row in history),
    }
    for split in ("train", "val", "test"):
        for key, value in evaluate(run.model, *getattr(run.data, split)).items():
            metrics[f"{split}_{key}"] = None if math.isnan(value) else value
    if run.config.robust.margin_samples > 0:  # DeepFool: K-fold batches for up to 50 steps, costly on big networks
        for key, value in margin(run.model, run.data.test[0][: run.config.robust.margin_samples], box=run.box).items():
            metrics[f"test_{key}"] = None if math.isnan(value) else value
    if run.robust is not None and best is not None:
        metrics.update(robust_metrics(run, history, best))
    return metrics


def robust_metrics(run: Run, history: list[dict[str, float]], best: Path) -> dict[str, Any]:
    """Robust errors (%) of the last weights and of the best checkpoint (lowest validation robust error, never
    chosen on test), and the robust generalization gap of each: test robust error - train robust error."""
    best_state = read_best(best, run.config.epochs)
    best_model = copy.deepcopy(run.model)
    load_weights(best_model, best_state["model"], best)
    out: dict[str, Any] = {
        "best_epoch": best_state["epoch"],
        "best_val_robust_error": history[best_state["epoch"] - 1]["val_robust_error"],
    }
    for tag, model in (("last", run.model), ("best", best_model)):
        test = robust_error(model, *run.data.test, run.robust)
        train = robust_error(model, *run.data.train, run.robust)
        out.update(
            {
                f"{tag}_test_error": evaluate(model, *run.data.test)["error"],
                f"{tag}_test_robust_error": test,
                f"{tag}_train_robust_error": train,
            }
        )
        out["robust_gap" if tag == "last" else "best_robust_gap"] = test - train
    return out


# -- the run folder and the checkpoint -----------------------------------------------------------
def _open_together(
    out: Path, config: TrainConfig, resume: bool, replicas: distributed.Replicas
) -> tuple[RunFolder | None, dict[str, Any] | None]:
    """Replica 0 checks, prepares and locks the folder; every replica learns whether it could (so that none waits
    for a replica that failed) and then reads the checkpoint to resume from."""
    failure, folder, checkpoint = None, None, None
    if replicas.main:
        try:
            folder, checkpoint = open_run(out, config, resume)
        except (OSError, ValueError) as err:  # RunFolderError, a corrupt config.json or checkpoint, permissions
            failure = err
    if not replicas.all_true(failure is None):  # a collective: every replica takes part
        if folder is not None:
            folder.release()
        if failure is not None:
            raise failure
        raise RunFolderError(f"replica 0 could not prepare the run folder {out}: its error says why")
    if not replicas.main and resume and (out / CHECKPOINT).exists():
        checkpoint = read_checkpoint(out / CHECKPOINT)
    return folder, checkpoint


def _snapshot(run: Run, epochs_done: int, history: list[dict[str, float]]) -> dict[str, Any]:
    """The checkpoint; under DDP every replica calls it (their random streams are gathered), replica 0 saves it."""
    rng = {"torch": torch.get_rng_state(), "loader": run.generator.get_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    if run.replicas is not None:  # one stream per replica, in rank order; the loader's is shared
        rng.update({key: run.replicas.gather(rng[key]) for key in ("torch", "cuda") if key in rng})
    return {
        "epoch": epochs_done,
        "config": run.config.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": rng,
        "history": history,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "world_size": _world(run),
    }


def restore(run: Run, checkpoint: dict[str, Any], path: Path = Path(CHECKPOINT)) -> tuple[int, list[dict[str, float]]]:
    """Load a checkpoint (of read_checkpoint's shape) into ``run``; a state that does not fit the run is a
    RunFolderError naming ``path``."""
    if not same_config(checkpoint["config"], run.config) or checkpoint["epoch"] > run.config.epochs:
        raise RunFolderError(
            f"{path} belongs to a different configuration than config.json (was config.json "
            "edited?); restore config.json, or delete the folder to start over"
        )
    if checkpoint.get("world_size", 1) != _world(run):  # local Δ, the slices and the random draws depend on it
        raise RunFolderError(
            f"the checkpoint was written by {checkpoint.get('world_size', 1)} process(es) and this "
            f"run has {_world(run)}; resume with the same torchrun --nproc_per_node"
        )
    load_weights(run.model, checkpoint["model"], path)
    try:
        _load_training_state(run, checkpoint)
    except (RuntimeError, TypeError, KeyError, ValueError, IndexError, AttributeError) as err:
        reason = " ".join(str(err).split())
        raise RunFolderError(
            f"{path} holds an optimizer, schedule or random state that does not fit this run "
            f"({type(err).__name__}: {reason}); delete the run folder to start over"
        ) from None
    return checkpoint["epoch"], list(checkpoint["history"])


def _load_training_state(run: Run, checkpoint: dict[str, Any]) -> None:
    check_optimizer_state(run.optimizer, checkpoint["optimizer"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    _load_scheduler(run.scheduler, checkpoint["scheduler"])
    if run.scaler is not None and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    rng = checkpoint["rng"]
    mine = (lambda state: state) if run.replicas is None else (lambda states: states[run.replicas.rank])  # noqa: E731
    torch.set_rng_state(mine(rng["torch"]))
    run.generator.set_state(rng["loader"])
    if "cuda" in rng and run.device.type == "cuda":
        torch.cuda.set_rng_state(mine(rng["cuda"]), run.device)


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """Raise ValueError unless ``saved`` is a state of this kind of optimizer over these parameters: torch's own
    load_state_dict takes another optimizer's settings or tensors of the wrong shape, and the next step fails."""
    groups, fresh = saved.get("param_groups"), optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(fresh) or not isinstance(saved.get("state"), dict):
        raise ValueError("its param_groups or state are not this optimizer's")
    for group, mine in zip(groups, fresh):  # flags (bool, None) are left out: torch defaults those it adds later
        needed = {k for k, v in mine.items() if not isinstance(v, bool) and v is not None}
        missing = sorted(needed - set(group)) if isinstance(group, dict) else ["params"]
        if missing:
            raise ValueError(f"a parameter group lacks {', '.join(missing)}: another optimizer saved it")
    shapes = {i: p.shape for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for index, entry in saved["state"].items():
        if (
            index not in shapes
            or not isinstance(entry, dict)
            or any(isinstance(v, Tensor) and v.dim() > 0 and v.shape != shapes[index] for v in entry.values())
        ):
            raise ValueError(f"the state of parameter {index} does not fit its shape")


def _load_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, saved: dict[str, Any]) -> None:
    """torch's load_state_dict updates the scheduler's __dict__ with anything, and the next step fails: check that
    each value it needs is there and of its kind (a number for a number) first; flags (bool, None) are left out,
    as torch defaults those it adds later."""
    for key, value in scheduler.state_dict().items():
        kind = (int, float) if isinstance(value, (int, float)) else type(value)
        if value is not None and not isinstance(value, bool) and not isinstance(saved.get(key), kind):
            raise ValueError(f"the schedule's {key} is {saved.get(key)!r}, not a {type(value).__name__}")
    scheduler.load_state_dict(saved)


def _world(run: Run) -> int:
    return 1 if run.replicas is None else run.replicas.world


def _to_device(data: DataSplits, device: torch.device) -> DataSplits:
    move = lambda pair: (pair[0].to(device), pair[1].to(device))  # noqa: E731
    return DataSplits(data.name, move(data.train), move(data.val), move(data.test), data.num_classes, data.input_shape)


def code_version() -> dict[str, Any]:
    """The advreg version, its git commit (and whether the tree had changes), torch and Python."""
    version: dict[str, Any] = {
        "advreg": advreg.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        version.update(git_commit=commit, git_dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        version.update(git_commit=None, git_dirty=None)  # installed from a wheel: the version says it
    return version
