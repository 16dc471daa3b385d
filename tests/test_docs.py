"""The documentation cannot drift from the code: the generated CLI reference covers every option of the parser,
every public object on the API pages has a docstring (and the check catches one that has none), every ``advreg``
command the pages show parses, the README stays a short front door whose links resolve, and the example trains.

``mkdocs build --strict`` itself (broken links, anchors, the same docstring check) runs in scripts/test.sh.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import sys
import types
from pathlib import Path

import pytest

from advreg.cli import build_parser

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
        "| `--norm NORM` | `linf` | a \\| b: `linf`, `l2` |", "| `--seed SEED` | `0` |  |", "| `--quiet` |  |  |"]


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
        "fake_api", "fake_api.bare", "fake_api.Settings", "fake_api.Engine.state_dict", "fake_api.Engine.radius"]
    assert hooks.missing_docstrings(["fake_api.documented", "fake_api.Engine.step"]) == []


def _commands(markdown: str) -> list[list[str]]:
    """The ``advreg`` command lines of the bash blocks, as argument lists. Lines with shell variables are skipped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if "advreg" not in tokens or "$" in line:
                continue
            args = tokens[tokens.index("advreg") + 1:]
            ends = [i for i, t in enumerate(args) if t in ("&&", ";", "|", "do", "done")]
            found.append(args[:ends[0]] if ends else args)
    return found


def test_every_advreg_command_in_the_docs_parses():
    commands = [c for page in _pages() for c in _commands(page.read_text(encoding="utf-8"))]
    assert len(commands) >= 8
    parser = build_parser()
    for args in commands:
        parser.parse_args(args)  # a wrong option or choice exits with status 2


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
