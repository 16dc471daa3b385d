"""``advreg analyze KIND ...``: each kind loads its runs, prints its cost, computes with progress, and writes
``KIND.png``, ``KIND.npz`` and ``KIND.json`` (its settings, its runs, summary numbers and the code version) into --out.

Settings are the fields of the kind's config dataclass, given as ``--set key=value`` (``--set dims=2``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from advreg.analysis import boundary, calibration, curves, hessian, landscape, operational, radius, save
from advreg.config import override
from advreg.data import DataSplits
from advreg.evaluate import AttackSettings, evaluate
from advreg.robustness import load_run
from advreg.runs import check_output
from advreg.train import code_version

Loaded = tuple[Any, DataSplits, nn.Module]  # a run folder's (config, data, model)


@dataclass(frozen=True)
class Outcome:
    """What a kind made: the figure, the raw arrays, and summary lines (also saved in the json)."""

    figure: Any
    arrays: dict[str, np.ndarray]
    summary: dict[str, Any]


@dataclass(frozen=True)
class Kind:
    name: str
    help: str
    inputs: str  # "runs" (run folders), "bench" (one bench folder) or "none"
    config: Any  # the config dataclass instance with defaults; --set overrides its fields
    run: Callable[..., Outcome]


def _labels(folders: list[str], labels: list[str] | None) -> list[str]:
    """A run's label: its folder name, with the parent's for bench runs (``at_awp/seed0``)."""
    if labels:
        if len(labels) != len(folders):
            raise ValueError(f"--labels gives {len(labels)} names for {len(folders)} runs; give one per run")
        return labels
    return [
        f"{Path(f).parent.name}/{Path(f).name}" if Path(f).name.startswith("seed") else Path(f).name for f in folders
    ]


def training_attack(config: Any, data: DataSplits) -> AttackSettings:
    """The run's training threat model (``pgd.*``, PGD-10 by default), in the data's units."""
    a = config.pgd
    return AttackSettings.in_levels(a.pixels, a.step_pixels, a.steps, a.norm, data.box())


# -- the kinds -----------------------------------------------------------------------------------------------------
def _landscape(
    runs: list[Loaded], labels: list[str], config: landscape.LandscapeConfig, progress: bool, adversarial: bool = False
) -> Outcome:
    results = [
        landscape.landscape(
            model, data, config, progress=progress, attack=training_attack(cfg, data) if adversarial else None
        )
        for cfg, data, model in runs
    ]
    center = (config.steps - 1) // 2
    summary = {
        label: {
            "loss_at_theta": float(r.loss[(center,) * config.dims]),
            "max_loss": float(r.loss.max()),
            "mean_loss": float(r.loss.mean()),
        }
        for label, r in zip(labels, results)
    }
    arrays = {f"{label}/{k}": v for label, r in zip(labels, results) for k, v in landscape.to_arrays(r).items()}
    return Outcome(landscape.plot(results, labels), arrays, summary)


def _radius(runs: list[Loaded], labels: list[str], config: radius.RadiusConfig, progress: bool) -> Outcome:
    results = [radius.radius_sweep(model, data, config, progress=progress) for _, data, model in runs]
    summary = {
        label: {f"{split}_worst_at_max_radius": float(r.worst[i, -1]) for i, split in enumerate(r.splits)}
        | {f"{split}_random_at_max_radius": float(r.random_mean[i, -1]) for i, split in enumerate(r.splits)}
        for label, r in zip(labels, results)
    }
    arrays = {f"{label}/{k}": v for label, r in zip(labels, results) for k, v in radius.to_arrays(r).items()}
    return Outcome(radius.plot(results, labels), arrays, summary)


def _hessian(runs: list[Loaded], labels: list[str], config: hessian.HessianConfig, progress: bool) -> Outcome:
    results = [hessian.hessian(model, data, config, progress=progress) for _, data, model in runs]
    summary = {
        label: {
            "top_eigenvalue": r.eigenvalue,
            "power_iterations": r.eigen_iterations,
            "converged": r.converged,
            "eigen_residual": r.eigen_residual,
            "trace": r.trace_mean,
            "trace_stderr": r.trace_stderr,
        }
        for label, r in zip(labels, results)
    }
    arrays = {f"{label}/{k}": v for label, r in zip(labels, results) for k, v in hessian.to_arrays(r).items()}
    return Outcome(hessian.plot(results, labels), arrays, summary)


@dataclass(frozen=True)
class BoundaryConfig:
    resolution: int = 300  # grid points per axis
    pad: float = 0.1  # the grid extends the training points' box by this share of its span


def _boundary(runs: list[Loaded], labels: list[str], config: BoundaryConfig, progress: bool) -> Outcome:
    shapes = {data.input_shape for _, data, _ in runs}
    if shapes != {(2,)}:
        raise ValueError(
            f"boundary draws 2-D inputs; these runs have input shapes {sorted(shapes)}: train them "
            "with --dataset spiral"
        )
    train_points = runs[0][1].train
    x_range, y_range = boundary.padded_range(train_points[0], config.pad)
    results = [boundary.decision_regions(model, x_range, y_range, config.resolution) for _, _, model in runs]
    summary = {
        label: {"test_error": evaluate(model, *data.test)["error"]} for label, (_, data, model) in zip(labels, runs)
    }
    arrays = {k: v for i, r in enumerate(results) for k, v in r.arrays(prefix=f"run{i}_").items()}
    return Outcome(boundary.plot_boundaries(results, labels, train_points), arrays, summary)


def _curves(folders: list[str], labels: list[str], config: None, progress: bool) -> Outcome:
    result = curves.load_curves(folders)
    return Outcome(curves.plot_curves(result, labels), result.arrays(), {})


@dataclass(frozen=True)
class CalibrationConfig:
    n_bins: int = 15  # the AMP paper's Appendix D


def _calibration(bench: str, config: CalibrationConfig, progress: bool) -> Outcome:
    result = calibration.reliability(bench, config.n_bins)
    summary = {m: dict(zip(("ece_mean", "ece_std"), result.ece_mean_std(m))) for m in result.methods}
    return Outcome(calibration.plot_reliability(result), result.arrays(), {**summary, **result.info()})


@dataclass(frozen=True)
class OperationalConfig:
    ratios: tuple[float, ...] = operational.FIG4_RATIOS  # ε²/(2σ₁²) of Fig. 4's regions
    epsilon: float = 0.5  # Fig. 1's window and Fig. 9's radius


def _operational(config: OperationalConfig, progress: bool) -> list[tuple[str, Outcome]]:
    """Three figures: Corollary 2's region (Fig. 4), the 1-D AMP loss (Fig. 1), and Fig. 9's scalar example."""
    region = operational.region_grid(config.ratios)
    picture = operational.amp_1d(config.epsilon)
    scalar = operational.scalar_example(config.epsilon)
    return [
        ("operational-region", Outcome(operational.plot_region(region), region.arrays(), {})),
        (
            "amp-1d",
            Outcome(
                operational.plot_amp_1d(picture),
                {"theta": picture.theta, "erm": picture.erm, "amp": picture.amp},
                {"theta_erm": picture.theta_erm, "theta_amp": picture.theta_amp},
            ),
        ),
        (
            "scalar-example",
            Outcome(
                operational.plot_scalar_example(scalar),
                {"theta": scalar.theta, **scalar.objectives},
                {"epsilon": scalar.epsilon, "minimizers": scalar.minimizers},
            ),
        ),
    ]


KINDS = {
    k.name: k
    for k in (
        Kind(
            "landscape",
            "loss along filter-normalised random directions (1-D, or 2-D with --set dims=2)",
            "runs",
            landscape.LandscapeConfig(),
            _landscape,
        ),
        Kind(
            "awp-landscape",
            "the AWP paper's weight-loss landscape: PGD examples crafted for each perturbed model "
            "(the run's at.* threat model)",
            "runs",
            landscape.LandscapeConfig(),
            lambda runs, labels, config, progress: _landscape(runs, labels, config, progress, adversarial=True),
        ),
        Kind(
            "radius",
            "training and test loss at radius r: random directions and the worst case (AMP Fig. 8/10)",
            "runs",
            radius.RadiusConfig(),
            _radius,
        ),
        Kind(
            "hessian",
            "top Hessian eigenvalue (power iteration) and trace (Hutchinson)",
            "runs",
            hessian.HessianConfig(),
            _hessian,
        ),
        Kind(
            "boundary",
            "decision regions of runs on 2-D data (AMP Fig. 6: --dataset spiral)",
            "runs",
            BoundaryConfig(),
            _boundary,
        ),
        Kind(
            "curves", "training and test loss/error per epoch from history.csv (AMP Fig. 11)", "folders", None, _curves
        ),
        Kind(
            "calibration",
            "reliability diagrams and ECE of a bench folder's selected runs (AMP Fig. 7)",
            "bench",
            CalibrationConfig(),
            _calibration,
        ),
        Kind(
            "operational-region",
            "Corollary 2's region (Fig. 4), the 1-D AMP loss (Fig. 1), Fig. 9's example",
            "none",
            OperationalConfig(),
            _operational,
        ),
    )
}


def analyze(
    kind: str,
    inputs: list[str],
    out: str | Path,
    settings: list[str] | None = None,
    labels: list[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Run one analysis kind on ``inputs`` and write its files into ``out``; returns the paths written."""
    if kind not in KINDS:
        raise ValueError(f"unknown analysis {kind!r}; choose one of: {', '.join(KINDS)}")
    spec = KINDS[kind]
    config = _configured(spec, settings or [])
    check_output(out)  # before the work, which can take minutes
    outcomes = _compute(spec, inputs, config, labels, progress, log)
    info = {
        "kind": kind,
        "inputs": [str(i) for i in inputs],
        "settings": _as_dict(config),
        "code_version": code_version(),
    }
    paths: list[Path] = []
    for name, outcome in outcomes:
        written = save(out, name, outcome.figure, outcome.arrays, {**info, "summary": outcome.summary})
        paths += list(written.values())
    return paths


def _configured(spec: Kind, settings: list[str]) -> Any:
    if spec.config is None:
        if settings:
            raise ValueError(f"analyze {spec.name} takes no --set")
        return None
    return override(spec.config, settings)  # the config's own checks raise ValueError on a bad value


def _compute(
    spec: Kind, inputs: list[str], config: Any, labels: list[str] | None, progress: bool, log: Callable[[str], None]
) -> list[tuple[str, Outcome]]:
    if spec.inputs == "none":
        if inputs:
            raise ValueError(f"analyze {spec.name} computes from the paper's formulas and takes no folders")
        return spec.run(config, progress)
    if not inputs:
        raise ValueError(f"analyze {spec.name} needs {'one bench folder' if spec.inputs == 'bench' else 'run folders'}")
    if spec.inputs == "bench":
        if len(inputs) != 1:
            raise ValueError(f"analyze {spec.name} takes one bench folder, got {len(inputs)}")
        runs = sum(len(f) for f in calibration.selected_runs(inputs[0]).values())
        log(f"{spec.name}: the test set of {runs} selected run(s), one forward pass each")
        return [(spec.name, spec.run(inputs[0], config, progress))]
    names = _labels(inputs, labels)
    if spec.inputs == "folders":
        return [(spec.name, spec.run(inputs, names, config, progress))]
    runs = [load_run(folder) for folder in inputs]
    cost = getattr(_module_of(spec), "cost", None)
    if cost is not None:
        log(f"{spec.name}: {cost(runs[0][2], runs[0][1], config)} per run, {len(runs)} run(s)")
    elif spec.name == "boundary":
        log(f"{spec.name}: {config.resolution} × {config.resolution} grid points per run, {len(runs)} run(s)")
    return [(spec.name, spec.run(runs, names, config, progress))]


def _module_of(spec: Kind) -> Any:
    return {"landscape": landscape, "awp-landscape": landscape, "radius": radius, "hessian": hessian}.get(spec.name)


def _as_dict(config: Any) -> dict[str, Any] | None:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None
