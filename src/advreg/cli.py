"""The ``advreg`` command line: ``train`` (one run folder), ``bench`` (methods × seeds), ``evaluate`` (robust
errors of a run), ``analyze`` (figures of runs) and ``report`` (the reproduction report's table and curves).

Bad input ends with one line ``advreg: error: ...`` and exit status 2, never a traceback; a fault of the machine
(a full disk, a read-only folder) with the same kind of line and exit status 1; Ctrl-C with one line and 130.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading


def _interrupted_at_startup(signum: int, frame: object) -> None:
    """Ctrl-C while the imports below load torch (seconds): one line, not a traceback from inside an import."""
    print("advreg: error: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


EXIT_USAGE, EXIT_FAULT, EXIT_INTERRUPTED = 2, 1, 130
if (
    signal.getsignal(signal.SIGINT) is signal.default_int_handler
    and threading.current_thread() is threading.main_thread()
):  # not when a host chose its own handler, nor imported from a thread (not allowed)
    signal.signal(signal.SIGINT, _interrupted_at_startup)

import argparse  # noqa: E402 (after the handler: these imports take the start-up's time)
import os  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from advreg import __version__, bench, launchers  # noqa: E402
from advreg import config as cfg  # noqa: E402
from advreg.data import DATASETS  # noqa: E402
from advreg.io import atomic_write_bytes  # noqa: E402
from advreg.methods import METHODS  # noqa: E402
from advreg.models import MODELS  # noqa: E402
from advreg.recipes import RECIPES, recipe_defaults, with_recipe  # noqa: E402
from advreg.robustness import ATTACKS, evaluate_run  # noqa: E402
from advreg.runs import check_output, output_folder  # noqa: E402
from advreg.train import TrainingDiverged, train, validate  # noqa: E402

USER_PATH_ERRORS = {
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
    errno.EEXIST: "a file stands where a folder belongs; choose another path",
    errno.ENOENT: "it does not exist; check the path",
    errno.EISDIR: "it is a folder where a file belongs; choose another path",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        _fail(f"{message} (see '{self.prog} --help')")


def _fail(message: str, status: int = EXIT_USAGE) -> None:
    print(f"advreg: error: {message}", file=sys.stderr)
    sys.exit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="advreg", description="Regularize neural networks by adversarial perturbation.")
    parser.add_argument("--version", action="version", version=f"advreg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser(
        "train",
        help="train one method with one seed into a run folder",
        description="Train one method with one seed; writes config.json, history.csv, "
        "metrics.json and a checkpoint into --out.",
    )
    train.add_argument("--dataset", default="mnist1d", choices=DATASETS)
    train.add_argument("--model", default=None, choices=MODELS, help="default: the recipe's, else mlp")
    train.add_argument("--method", default="erm", choices=tuple(METHODS))
    _add_recipe(train)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int, default=None, help=f"default: the recipe's, else {cfg.TrainConfig.epochs}")
    train.add_argument("--out", required=True, help="the run folder (created; must be new unless --resume)")
    _add_settings(
        train,
        "override a setting, e.g. amp.epsilon=0.2 or optim.lr=0.05 (repeatable); an unknown key lists the valid ones",
    )
    train.add_argument(
        "--data-dir",
        default=None,
        help="the folder with the image sets' files (CIFAR, SVHN, GTSRB, Tiny-ImageNet); default $ADVREG_DATA",
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_bench(commands)
    _add_analyze(commands)
    report = commands.add_parser(
        "report",
        help="the reproduction report's table and test-accuracy curves of runs",
        description="Write report.md (dataset, model, method, seed, test and train accuracy), "
        "report.png (test accuracy per epoch) and report.json into --out.",
    )
    report.add_argument("runs", nargs="+", help="finished run folders")
    report.add_argument("--out", required=True, help="the folder for report.md, report.png and report.json")
    evaluate = commands.add_parser(
        "evaluate",
        help="add robust test errors (FGSM, PGD, transfer) to a run's metrics.json",
        description="White-box FGSM and PGD-10 at eps = 4/255 of the input range (AMP paper, Appendix F) unless "
        "--eps is given in the data's units; --source crafts the examples on another run (black box).",
    )
    evaluate.add_argument("run", help="a finished run folder")
    evaluate.add_argument(
        "--attacks",
        default="fgsm,pgd",
        help=f"comma-separated, from: {', '.join(ATTACKS)} "
        '(autoattack is the optional extra: pip install "advreg[autoattack]"); with several, '
        "test_error_worst counts a sample broken by any of them",
    )
    evaluate.add_argument("--eps", type=float, default=None, help="L-inf radius in the data's units")
    evaluate.add_argument("--source", default=None, help="run folder whose model crafts the examples (transfer)")
    evaluate.add_argument(
        "--sanity", action="store_true", help="also report the accuracy left after unbounded PGD (200 steps of 0.01)"
    )
    return parser


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="train several methods over seeds (and a grid), select on validation, summarize",
        description="Train every method x grid point x seed as run folders under --out/runs (resumable), "
        "choose each method's grid point by mean validation error, and write results.csv and "
        "summary.md (mean ± std of test error, NLL and ECE).",
    )
    bench.add_argument("--dataset", default="mnist1d", choices=DATASETS)
    bench.add_argument("--model", default=None, choices=MODELS, help="default: the recipe's, else mlp")
    bench.add_argument("--methods", default="erm,amp", help=f"comma-separated, from: {', '.join(METHODS)}")
    bench.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=[],
        metavar="LABEL=METHOD:K=V;K=V",
        help="one more row: a method with fixed settings, e.g. 'amm_avg_lin=amm:amm.aggregation=avg;"
        "amm.shrinkage=lin' (repeatable; give --methods '' for variants only)",
    )
    bench.add_argument("--data-dir", default=None, help="the folder with the image sets' files; default $ADVREG_DATA")
    bench.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 for every method")
    _add_recipe(bench)
    bench.add_argument("--epochs", type=int, default=None, help=f"default: the recipe's, else {cfg.TrainConfig.epochs}")
    bench.add_argument("--out", default=None, help="the bench folder (reruns skip finished runs); required")
    _add_settings(bench, "a setting for every run, e.g. optim.lr=0.05 (repeatable)")
    bench.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="values to choose from on validation, e.g. amp.epsilon=0.1,0.5 (repeatable; "
        "a key of a stage a method does not use is ignored for that method)",
    )
    bench.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs in parallel (default: cores)")
    bench.add_argument(
        "--attacks",
        default="",
        help="also add robust test errors to every run, e.g. fgsm,pgd "
        "(FGSM and PGD-10 at 4/255 of the input range, as advreg evaluate)",
    )
    bench.add_argument(
        "--attack-source",
        default=None,
        metavar="RUN",
        help="with --attacks: also craft the examples on this run folder's model (black box, e.g. "
        "a separately trained ERM run) and report test_error_*_transfer",
    )
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.add_argument(
        "--launcher",
        default="local",
        choices=("local", "slurm"),
        help="local: --jobs processes on this machine; slurm: every run a Slurm job (one job array, "
        'through submitit: pip install "advreg[slurm]"); a rerun resubmits only the runs '
        "that are neither finished nor pending or running",
    )
    bench.add_argument(
        "--slurm",
        dest="slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --launcher slurm, a job setting: "
        + ", ".join(launchers.SLURM_KEYS)
        + f" (minutes), or {launchers.EXTRA}NAME for any sbatch option (repeatable; saved in "
        "OUT/slurm/settings.json)",
    )
    bench.add_argument("--no-wait", action="store_true", help="with --launcher slurm: submit and return")
    bench.add_argument(
        "--poll",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="with --launcher slurm: how often to ask Slurm while waiting",
    )
    bench.add_argument(
        "--collect",
        default=None,
        metavar="OUT",
        help="write results.csv and summary.md of the bench folder OUT from whatever has finished "
        "(the other options are ignored)",
    )


def _add_settings(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE``, repeatable, collected in ``settings``."""
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        default=None,
        choices=tuple(RECIPES),
        help="a paper's training protocol (optimizer, schedule, augmentation, network, epochs, AMP's "
        "radius) under the method preset and --set: " + "; ".join(f"{r.name}: {r.source}" for r in RECIPES.values()),
    )


def _add_analyze(commands: Any) -> None:
    from advreg.analysis.commands import KINDS

    analyze = commands.add_parser(
        "analyze",
        help="figures of trained runs: landscapes, radius sweeps, Hessian, boundaries, calibration, curves",
        description="Write KIND.png, KIND.npz and KIND.json into --out. Kinds: "
        + "; ".join(f"{k.name}: {k.help}" for k in KINDS.values()),
    )
    analyze.add_argument("kind", choices=tuple(KINDS))
    analyze.add_argument(
        "inputs", nargs="*", help="run folders (a bench folder for calibration; none for operational-region)"
    )
    analyze.add_argument("--out", required=True, help="the folder for the figure and its numbers")
    _add_settings(analyze, "a setting of the analysis, e.g. dims=2, steps=21, samples=500, seed=1 (repeatable)")
    analyze.add_argument("--labels", default="", help="comma-separated names of the runs in the figure")
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")


def make_config(args: argparse.Namespace) -> cfg.TrainConfig:
    return with_recipe(base_config(args, method=args.method, seed=args.seed), args.recipe, args.settings)


def base_config(args: argparse.Namespace, **fields: Any) -> cfg.TrainConfig:
    """The command's dataset, model and epochs; the model and epochs default to the recipe's."""
    model, epochs = recipe_defaults(args.recipe, args.model, args.epochs)
    return cfg.TrainConfig(
        epochs=epochs,
        data=cfg.DataConfig(name=args.dataset, dir=args.data_dir or ""),
        model=cfg.ModelConfig(name=model),
        **fields,
    )


def cmd_train(args: argparse.Namespace) -> None:
    if args.resume and not os.path.lexists(args.out):  # train(resume=True) starts a new run there (bench relies on it)
        raise ValueError(
            f"{args.out} does not exist, so there is no run to resume; check the path, or drop "
            "--resume to start a new run there"
        )
    metrics = train(make_config(args), args.out, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, replica 0 speaks
        print(format_metrics(metrics, args.out))


def cmd_evaluate(args: argparse.Namespace) -> None:
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    results = evaluate_run(args.run, attacks, eps=args.eps, source=args.source, sanity=args.sanity)
    width = max(len(k) for k in results)
    print(
        "\n".join(
            f"{k.ljust(width)}  {v:.4g}" if isinstance(v, float) else f"{k.ljust(width)}  {v}"
            for k, v in results.items()
        )
    )


def cmd_bench(args: argparse.Namespace) -> None:
    if args.collect:
        return _collect(args.collect)
    if not args.out:
        raise ValueError("advreg bench needs --out (the bench folder), or --collect OUT")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1 (runs in parallel), got {args.jobs}")
    if args.launcher != "slurm" and (args.slurm or args.no_wait):
        raise ValueError("--slurm and --no-wait go with --launcher slurm (add --launcher slurm)")
    parameters = launchers.parse_slurm(args.slurm)
    methods = _bench_methods(args)
    base = base_config(args)
    out = check_output(args.out)
    specs = bench.plan(base, methods, args.seeds, args.settings, bench.parse_grid(args.grid), out, args.recipe)
    for spec in specs:
        validate(spec.config)
    output_folder(out)
    attacks = _bench_attacks(args)
    recipe = f", recipe {args.recipe}" if args.recipe else ""
    title = (
        f"{args.dataset}, {base.model.name}, {base.epochs} epochs{recipe}, mean ± std over {args.seeds} seeds; "
        "grid points chosen by mean validation error; best mean in bold"
    )
    bench.save_plan(out, specs, title)
    if args.launcher == "slurm":
        rows = launchers.run_slurm(
            specs,
            out,
            parameters,
            attacks,
            args.attack_source,
            wait_for=not args.no_wait,
            every=args.poll,
            quiet=args.quiet,
        )
        if rows is None:  # --no-wait: the same command, or --collect, writes the tables later
            return
    else:
        rows = bench.execute(
            specs, min(args.jobs, len(specs)), progress=not args.quiet, attacks=attacks, source=args.attack_source
        )
    _write_tables(out, rows, title)


def _bench_methods(args: argparse.Namespace) -> list[str | bench.Variant]:
    """The presets of ``--methods`` (checked) and the ``--variant`` runs."""
    methods: list[str | bench.Variant] = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not (methods or args.variants):
        raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from: {', '.join(METHODS)}")
    return methods + [bench.parse_variant(v) for v in args.variants]


def _bench_attacks(args: argparse.Namespace) -> tuple[str, ...]:
    """The attacks of ``--attacks`` that every finished run is evaluated with (checked)."""
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    if any(a not in ATTACKS for a in attacks):
        raise ValueError(f"unknown attack in --attacks {args.attacks!r}; choose from: {', '.join(ATTACKS)}")
    if args.attack_source and not attacks:
        raise ValueError("--attack-source needs --attacks (e.g. --attacks fgsm,pgd)")
    return attacks


def _collect(folder: str) -> None:
    """--collect: the tables from the finished runs; one line says how many are missing."""
    out = Path(folder)
    specs, title = bench.load_plan(out)
    rows = bench.collect(specs)
    missing = sum(bool(r.get("failed")) for r in rows)
    _write_tables(out, rows, title, fail=False)
    if missing:
        print(
            f"advreg: {missing} of {len(rows)} runs are not finished yet; collect again when they are", file=sys.stderr
        )


def _write_tables(out: Path, rows: list[dict[str, Any]], title: str, fail: bool = True) -> None:
    """results.csv and summary.md (printed); then, if some runs failed, one line with them and exit status 1."""
    chosen = bench.select(rows)
    bench.write_results(out, rows, chosen)
    summary = bench.summarize(rows, chosen, title)
    atomic_write_bytes(out / "summary.md", summary.encode())
    print(summary, end="")
    failed = [r for r in rows if r.get("failed")] if fail else []
    if failed:  # after the files: every other run is in them
        runs = "; ".join(f"{r['folder']}: {r['error']}" for r in failed)
        _fail(
            f"{len(failed)} of {len(rows)} runs failed ({runs}); the others are in {out / 'results.csv'}; "
            "run the same command again to resume the failed ones",
            1,
        )


def cmd_analyze(args: argparse.Namespace) -> None:
    from advreg.analysis.commands import analyze

    labels = [t.strip() for t in args.labels.split(",") if t.strip()] or None
    paths = analyze(args.kind, args.inputs, args.out, args.settings, labels, progress=not args.quiet)
    print("\n".join(str(p) for p in paths))


def cmd_report(args: argparse.Namespace) -> None:
    from advreg.report import report

    paths = report(args.runs, args.out)
    print(paths[0].read_text(), end="")
    print("\n".join(str(p) for p in paths))


def format_metrics(metrics: dict[str, Any], out: str) -> str:
    """The closing table: error and ECE in percent, NLL in nats, one row per split."""

    def cell(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [("split", "error %", "NLL", "ECE %")]
    for split in ("train", "val", "test"):
        rows.append(
            (
                split,
                cell(metrics[f"{split}_error"], 2),
                cell(metrics[f"{split}_nll"], 3),
                cell(metrics[f"{split}_ece"], 2),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(text.rjust(width) for text, width in zip(row, widths)) for row in rows]
    if "robust_gap" in metrics:  # robust.track: the best (by validation) and the last checkpoint
        lines.append(
            f"PGD test error %: best {metrics['best_test_robust_error']:.2f} (epoch {metrics['best_epoch']}), "
            f"last {metrics['last_test_robust_error']:.2f}; robust gap {metrics['robust_gap']:.2f}"
        )
    return (
        f"{metrics['method']} seed {metrics['seed']}, {metrics['epochs']} epochs, "
        f"{metrics['train_seconds']:.1f} s -> {out}\n" + "\n".join(lines)
    )


def main(argv: Sequence[str] | None = None) -> None:
    if signal.getsignal(signal.SIGINT) is _interrupted_at_startup:  # from here on, Ctrl-C unwinds (locks, files)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        commands = {
            "train": cmd_train,
            "bench": cmd_bench,
            "evaluate": cmd_evaluate,
            "analyze": cmd_analyze,
            "report": cmd_report,
        }
        commands[command](args)
    except KeyboardInterrupt:
        resumable = command in ("train", "bench")
        _fail(
            "interrupted; the last finished epoch is saved, continue with --resume"
            if command == "train"
            else "interrupted; finished runs are kept, run the same command again to continue"
            if resumable
            else "interrupted",
            EXIT_INTERRUPTED,
        )
    except ValueError as err:  # bad settings, a foreign --out, a corrupt file: the message says what to do
        _fail(str(err))
    except TrainingDiverged as err:
        _fail(str(err), EXIT_FAULT)
    except OSError as err:
        _fail(*os_error_line(err))


def os_error_line(err: OSError) -> tuple[str, int]:
    """The message and exit status of an OSError: a user's path that is wrong (2), or the machine's fault (1)."""
    where = f"{err.filename}: " if err.filename else ""
    if err.errno in USER_PATH_ERRORS:
        return f"{where}{USER_PATH_ERRORS[err.errno]}", EXIT_USAGE
    if err.errno == errno.ENOSPC:
        return f"{where}no space left on the device; free some space and run the command again", EXIT_FAULT
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where}cannot write there ({err.strerror}); make it writable or choose another folder", EXIT_FAULT
    return f"{where}{err.strerror or err} (errno {err.errno}); check the disk and run the command again", EXIT_FAULT


if __name__ == "__main__":
    main()
