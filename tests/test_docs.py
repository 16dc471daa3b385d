"""The documentation cannot drift from the code: the generated CLI reference covers every option of the parser,
every public object on the API pages has a docstring (and the check catches one that has none), every ``advreg``
command the pages show parses (whole commands in bash blocks, fragments and options in the text) and a whole train
or bench command makes valid runs, every example command parses with the example's parser, the tables that explain
each choice list the parser's choices, the README stays a short front door whose links resolve, and the example
trains.

``mkdocs build --strict`` itself (broken links, anchors, the same docstring check) runs in scripts/test.sh.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import importlib.util
import io
import itertools
import re
import shlex
import sys
import types
from pathlib import Path
from unittest import mock

import pytest

from advreg import bench, cli, launchers
from advreg.cli import build_parser
from advreg.train import validate

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load(DOCS / "hooks.py", "advreg_docs_hooks")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_cli_reference_renders_every_subcommand_and_option():
    commands = hooks.subcommands(build_parser())
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert sorted(hooks.CLI_MARKER.findall(page)) == sorted([*commands, "overview"])  # a new one needs its section
    for name, parser in commands.items():
        text = hooks.cli_markdown(parser)
        assert parser.format_usage().split()[1:3] == ["advreg", name]
        for action in parser._actions[1:]:  # after -h, which the table leaves out
            for option in action.option_strings or [action.dest]:
                assert f"`{option}" in text or f", {option}" in text, (name, option)
    expanded = hooks.expand_cli_markers(page)
    assert "<!-- cli:" not in expanded and "usage: advreg bench" in expanded
    assert all(f"| [`advreg {name}`](#advreg-{name}) |" in expanded for name in commands)


def test_cli_table_cells_escape_pipes_and_list_choices():
    parser = build_parser().__class__(prog="advreg demo")
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf", help="a | b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    assert hooks.cli_markdown(parser).splitlines()[-3:] == [
        "| `--norm NORM` | `linf` | a \\| b: `linf`, `l2` |",
        "| `--seed SEED` | `0` |  |",
        "| `--quiet` |  |  |",
    ]


def test_unknown_cli_marker_is_an_error():
    with pytest.raises(ValueError, match="names no sub-command"):
        hooks.expand_cli_markers("<!-- cli: nonsense -->")


def test_every_public_object_on_the_api_pages_has_a_docstring():
    paths = [p for page in sorted((DOCS / "api").glob("*.md")) for p in hooks.api_objects(page.read_text())]
    assert len(paths) > 30
    missing = sorted(hooks.missing_docstrings(paths))
    assert not missing, f"write a docstring for each of: {', '.join(missing)}"


def test_docstring_check_finds_what_mkdocstrings_would_omit(monkeypatch):
    module = types.ModuleType("fake_api")

    def documented():
        """Has one."""

    def bare():
        pass

    @dataclasses.dataclass
    class Settings:  # its __doc__ is the generated signature, not a docstring
        size: int = 1

    class Engine:
        """Documented class."""

        def step(self):
            """Documented method."""

        def state_dict(self):
            pass

        @property
        def radius(self):
            return 1.0

        def _private(self):
            pass

    for obj in (documented, bare, Settings, Engine):
        obj.__module__ = "fake_api"
        setattr(module, obj.__name__, obj)
    monkeypatch.setitem(sys.modules, "fake_api", module)
    assert hooks.missing_docstrings(["fake_api"]) == [
        "fake_api",
        "fake_api.bare",
        "fake_api.Settings",
        "fake_api.Engine.state_dict",
        "fake_api.Engine.radius",
    ]
    assert hooks.missing_docstrings(["fake_api.documented", "fake_api.Engine.step"]) == []


SHELL_LOOP = re.compile(r"for (\w+) in (.+?); do")
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*")  # NAME, OUT, RUN: stands for any valid value
EXAMPLES = {p.name: p for p in sorted((ROOT / "examples").glob("*.py"))}


def _shell_lines(block: str) -> list[str]:
    """The lines of a bash block, continuations joined; a line that uses a ``for`` loop's variable once for each of
    its words."""
    loops = {name: words.split() for name, words in SHELL_LOOP.findall(block)}
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        names = [n for n in loops if f"${n}" in line]
        for values in itertools.product(*(loops[n] for n in names)):
            expanded = line
            for name, value in zip(names, values):
                expanded = expanded.replace(f"${name}", value)
            lines.append(expanded)
    return lines


def _snippets(text: str, rows: bool = True) -> list[tuple[str, bool]]:
    """(command, complete) for each line of the bash blocks (complete) and each inline code span (a fragment);
    ``rows=False`` leaves out the spans in table rows."""
    blocks = [body for lang, body in FENCE.findall(text) if lang == "bash"]
    prose = [line for line in FENCE.sub("", text).splitlines() if rows or not line.startswith("|")]
    return [
        *((line, True) for block in blocks for line in _shell_lines(block)),
        *((span, False) for line in prose for span in CODE_SPAN.findall(line)),
    ]


def _after(tokens: list[str], program: str) -> list[str]:
    """The arguments after ``program`` up to the end of the shell command (``&&``, ``;``, ``|``, ``done``)."""
    args = tokens[tokens.index(program) + 1 :]
    ends = [i for i, t in enumerate(args) if t in ("&&", ";", "|", "do", "done")]
    return args[: ends[0]] if ends else args


def _parses(parser: argparse.ArgumentParser, args: list[str], complete: bool) -> bool:
    """Whether ``args`` parse (``--help`` does, exiting 0); a fragment is made whole first (``_whole``)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(args if complete else _whole(parser, args))
    except SystemExit as end:
        return end.code == 0
    return True


def _whole(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """A fragment (``advreg train ... --resume``, ``--set``) made parseable: nothing required, ``...`` dropped, a
    placeholder (SUBCOMMAND, NAME) or a missing value replaced by a valid one (the first choice, else 1)."""
    commands = hooks.subcommands(parser) if parser.prog == "advreg" else {}
    actions = [a for sub in commands.values() for a in sub._actions] or parser._actions
    for action in actions:
        action.required = False
    options = {s: a for a in actions for s in a.option_strings}
    args = [a for a in args if a != "..."]
    if commands and args and PLACEHOLDER.fullmatch(args[0]):
        args[0] = next(iter(commands))
    whole: list[str] = []
    for arg, following in zip(args, [*args[1:], None]):
        action = options.get(whole[-1]) if whole else None
        whole.append(next(iter(action.choices)) if action and action.choices and PLACEHOLDER.fullmatch(arg) else arg)
        action = options.get(arg)
        if action is not None and action.nargs is None and (following is None or following.startswith("-")):
            whole.append(str(next(iter(action.choices))) if action.choices else "1")
    return whole


def _example_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``examples/NAME``, caught as it parses."""
    module = _load(EXAMPLES[name], f"example_{name[:-3]}")
    with mock.patch.object(argparse.ArgumentParser, "parse_args", lambda self, *_: self):
        return module.parse_args()


def _runs_validate(args: argparse.Namespace) -> None:
    """The runs a complete ``advreg train`` or ``bench`` command makes are valid (its --set, --grid, --variant and
    --recipe among them): what the command checks before any work."""
    if args.command == "train":
        validate(cli.make_config(args))
    elif args.command == "bench" and not args.collect:
        methods = [m for m in args.methods.split(",") if m] + [bench.parse_variant(v) for v in args.variants]
        specs = bench.plan(
            cli.base_config(args),
            methods,
            args.seeds,
            args.settings,
            bench.parse_grid(args.grid),
            Path(args.out),
            args.recipe,
        )
        for config in {dataclasses.replace(spec.config, seed=0) for spec in specs}:  # the seeds' runs differ by it only
            validate(config)


def _advreg_commands() -> list[tuple[str, str, list[str], bool]]:
    """(page, snippet, arguments, complete) of each ``advreg`` command on the pages, whole in a bash block or a
    fragment in the text."""
    found = []
    for page in _pages():
        for snippet, complete in _snippets(page.read_text(encoding="utf-8")):
            tokens = shlex.split(snippet, comments=True)
            args = _after(tokens, "advreg") if "advreg" in tokens else []
            if args:  # not the program's name alone in the text
                found.append((page.name, snippet, args, complete))
    return found


def test_every_advreg_command_in_the_docs_parses():
    """Each command parses with the real parser: its options exist and its values are valid."""
    commands = _advreg_commands()
    assert len(commands) >= 30 and sum(complete for *_, complete in commands) >= 10
    for page, snippet, args, complete in commands:
        assert "$" not in snippet and _parses(build_parser(), args, complete), f"{page}: {snippet}"


@pytest.mark.slow
def test_every_whole_train_and_bench_command_in_the_docs_makes_valid_runs():
    """Its --set, --grid, --variant and --recipe make runs that pass the checks the command makes before any work,
    as on a machine with CUDA (cluster.md's commands are for one)."""
    with mock.patch("torch.cuda.is_available", return_value=True):
        for _, _, args, complete in _advreg_commands():
            if complete:
                _runs_validate(build_parser().parse_args(args))


def test_every_option_in_the_docs_text_is_a_real_one():
    """An option in the text (``--set amp.every=k``) is one of a sub-command of advreg or of an example script; the
    benchmark scripts' (benchmarks.md) and sbatch's (the table rows of cluster.md) are other programs'."""
    candidates = [
        *((build_parser, [name]) for name in hooks.subcommands(build_parser())),
        *((functools.partial(_example_parser, name), []) for name in EXAMPLES),
    ]
    checked = 0
    for page in _pages():
        for snippet, complete in _snippets(page.read_text(encoding="utf-8"), rows=page.name != "cluster.md"):
            if complete or not snippet.startswith("--") or page.name == "benchmarks.md":
                continue
            tokens = shlex.split(snippet)
            assert any(_parses(make(), [*prefix, *tokens], False) for make, prefix in candidates), (
                f"{page.name}: {snippet}"
            )
            checked += 1
    assert checked >= 40


def test_every_example_command_parses_with_the_examples_parser():
    """``python examples/X.py ...`` and ``torchrun ... examples/X.py ...`` on the pages and in the examples'
    docstrings: the example's own parser takes the arguments."""
    snippets = [(p.name, snippet) for p in _pages() for snippet, _ in _snippets(p.read_text(encoding="utf-8"))]
    for name, path in EXAMPLES.items():  # the docstring's indented command lines
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        snippets += [(name, line) for line in doc.splitlines() if line.startswith("    ")]
    checked = 0
    for where, snippet in snippets:
        tokens = shlex.split(snippet, comments=True)
        for name in [n for n in EXAMPLES if f"examples/{n}" in tokens]:
            assert _parses(_example_parser(name), _after(tokens, f"examples/{name}"), True), f"{where}: {snippet}"
            checked += 1
    assert checked >= 4


def test_the_docs_tables_of_choices_list_the_parsers_choices():
    """The hand-written tables that explain each choice: analyze's kinds (cli.md), the recipes (training.md) and the
    --slurm keys (cluster.md) name exactly what the parser takes, in its order."""
    commands = hooks.subcommands(build_parser())
    (kind,) = [a for a in commands["analyze"]._actions if a.dest == "kind"]
    (recipe,) = [a for a in commands["train"]._actions if a.dest == "recipe"]
    assert _table_keys(DOCS / "cli.md", "| kind |") == list(kind.choices)
    assert _table_keys(DOCS / "training.md", "| recipe |") == list(recipe.choices)
    assert _table_keys(DOCS / "cluster.md", "| key |") == [*launchers.SLURM_KEYS, f"{launchers.EXTRA}NAME"]


def _table_keys(page: Path, header: str) -> list[str]:
    """The first column's code spans of the table with ``header``."""
    table = page.read_text(encoding="utf-8").split(header, 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE)


def test_readme_is_a_front_door_whose_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    assert "bash scripts/test.sh" in readme
    assert "advreg train --dataset mnist1d --model mlp --method amp --seed 0 --epochs 100 --out runs/amp0" in readme
    targets = [t for _, _, t in hooks.LINK.findall(readme) if not t.startswith(("http", "#"))]
    assert len(targets) >= 10 and all(t.startswith(("docs/", "examples/")) for t in targets)
    assert [t for t in targets if not (ROOT / t).is_file()] == []
    assert not re.search(r"\bissues? \d", readme)


def test_readme_on_the_site_relinks_docs_and_drops_repository_links():
    text = "[Tutorial](docs/tutorial.md) ![fig](docs/figures/a.png) [`ex.py`](examples/ex.py) [web](https://x.org)"
    assert hooks.readme_for_site(text) == "[Tutorial](tutorial.md) ![fig](figures/a.png) `ex.py` [web](https://x.org)"


def test_docs_pages_carry_no_issue_numbers():
    assert [p.name for p in _pages() if re.search(r"\bissues? \d", p.read_text(encoding="utf-8"))] == []


@pytest.mark.slow
def test_example_trains_on_the_cpu(capsys):
    example = _load(ROOT / "examples" / "amp_mnist1d.py", "amp_mnist1d_example")
    assert 0 <= example.main(["--steps", "5", "--device", "cpu"]) <= 100
    assert "test error after 5 steps" in capsys.readouterr().out
    assert example.main(["--epochs", "3", "--device", "cpu"]) < 80  # 216 steps; chance is 90%
