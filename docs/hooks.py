"""MkDocs hook (mkdocs.yml ``hooks:``): the pages that are generated from the code, and the docstring check.

- A line ``<!-- cli: NAME -->`` on a page becomes the usage and the argument table of ``advreg NAME``
  (``overview``: the table of sub-commands), rendered from :func:`advreg.cli.build_parser` at build time, so the
  CLI reference cannot drift from the parser.
- ``<!-- readme -->`` (the home page) becomes README.md, its ``docs/`` links made relative to the site and its
  links to other files of the repository (outside the site) left as plain text, so the two never differ.
- Every object that an API page renders (a ``::: advreg.x`` line), and each public member that mkdocstrings shows
  with it, must have a docstring: one without fails the build and is named in the error.

Pure functions (``cli_markdown``, ``missing_docstrings``) are imported by ``tests/test_docs.py`` as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

README_MARKER = "<!-- readme -->"
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
CLI_MARKER = re.compile(r"^<!-- cli: ([\w-]+) -->$", re.MULTILINE)
API_OBJECT = re.compile(r"^::: ([\w.]+)", re.MULTILINE)
SPHINX_ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|exc|obj):<code>(~?)([^<]*)</code>")
USAGE_WIDTH = 100


# --- the CLI reference --------------------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-command parsers of ``parser`` by name, in the order they were added."""
    return dict(_subparsers(parser).choices)


def cli_markdown(parser: argparse.ArgumentParser) -> str:
    """Markdown for one sub-command: its description, its usage line and one table row per argument."""
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=USAGE_WIDTH)
    rows = [_argument_row(a) for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    return "\n".join(
        [
            parser.description or "",
            "",
            "```text",
            parser.format_usage().strip(),
            "```",
            "",
            "| argument | default | description |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )


def _argument_row(action: argparse.Action) -> str:
    name = ", ".join(action.option_strings) or action.dest
    if action.option_strings and action.nargs != 0:
        name += f" {action.metavar or action.dest.upper()}"
    required = action.required or not action.option_strings
    unset = action.default is None or action.default is False or action.default == []
    default = "required" if required else ("" if unset else f"`{action.default}`")
    text = action.help or ""
    if action.choices is not None:
        text += (": " if text else "one of ") + ", ".join(f"`{c}`" for c in action.choices)
    return f"| `{name}` | {default} | {_cell(text)} |"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (a ``|`` would end the cell)."""
    return " ".join(text.split()).replace("|", "\\|")


def cli_overview(parser: argparse.ArgumentParser) -> str:
    """A table of the sub-commands with their one-line help, each linked to its section."""
    rows = [
        f"| [`advreg {a.dest}`](#advreg-{a.dest}) | {_cell(a.help or '')} |"
        for a in _subparsers(parser)._choices_actions
    ]
    return "\n".join(["| sub-command | what it does |", "|---|---|", *rows, ""])


def expand_cli_markers(markdown: str) -> str:
    """Replace each ``<!-- cli: NAME -->`` line by the reference of ``advreg NAME`` (``overview``: the table of
    sub-commands); an unknown NAME is an error."""
    if not CLI_MARKER.search(markdown):
        return markdown
    from advreg.cli import build_parser

    parser = build_parser()
    commands = subcommands(parser)

    def render(match: re.Match) -> str:
        name = match.group(1)
        if name == "overview":
            return cli_overview(parser)
        if name not in commands:
            raise ValueError(
                f"docs: <!-- cli: {name} --> names no sub-command of advreg; use one of: {', '.join(commands)}"
            )
        return cli_markdown(commands[name])

    return CLI_MARKER.sub(render, markdown)


def readme_for_site(readme: str) -> str:
    """README.md as a page of the site (whose root is docs/): ``docs/x`` links become ``x``, web links stay, and
    a link to another file of the repository keeps only its text."""

    def relink(match: re.Match) -> str:
        bang, text, target = match.groups()
        if target.startswith("docs/"):
            return f"{bang}[{text}]({target[len('docs/') :]})"
        return match.group(0) if target.startswith(("http://", "https://", "#")) else text

    return LINK.sub(relink, readme)


# --- the docstring check ------------------------------------------------------------------------------------------


def resolve(path: str) -> Any:
    """The object at dotted ``path`` (``advreg.attacks.pgd``): the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ValueError(f"docs: {path} is not importable; fix the ::: line")


def has_docstring(obj: Any) -> bool:
    """Whether ``obj`` carries its own docstring (not a dataclass's or NamedTuple's generated signature)."""
    doc = getattr(obj, "fget", obj).__doc__  # a property's docstring is its getter's
    if not doc or not doc.strip():
        return False
    generated = inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")
    return not (generated and (dataclasses.is_dataclass(obj) or issubclass(obj, tuple)))


def public_members(obj: Any) -> dict[str, Any]:
    """The members mkdocstrings renders with ``obj``: for a module its ``__all__`` (else the functions and classes
    it defines), for a class the public functions and properties of its own body (inherited ones are not shown)."""
    if inspect.ismodule(obj):
        names = getattr(obj, "__all__", None) or [
            n for n, v in vars(obj).items() if getattr(v, "__module__", None) == obj.__name__
        ]
        members = {n: getattr(obj, n) for n in names if not n.startswith("_")}
        return {n: v for n, v in members.items() if inspect.isroutine(v) or inspect.isclass(v)}
    if inspect.isclass(obj):
        return {
            n: v
            for n, v in vars(obj).items()
            if not n.startswith("_") and (inspect.isroutine(v) or isinstance(v, (property, classmethod, staticmethod)))
        }
    return {}


def missing_docstrings(paths: list[str]) -> list[str]:
    """The dotted names, among ``paths`` and their public members (recursively), that have no docstring."""
    missing, seen = [], set()

    def visit(path: str, obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if not has_docstring(getattr(obj, "__func__", obj)):
            missing.append(path)
        for name, member in public_members(obj).items():
            visit(f"{path}.{name}", member)

    for path in paths:
        visit(path, resolve(path))
    return missing


def api_objects(markdown: str) -> list[str]:
    """The dotted paths of the ``::: path`` lines of a page."""
    return API_OBJECT.findall(markdown)


# --- MkDocs events ------------------------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page: Any, config: Any, **_: Any) -> str:
    from mkdocs.exceptions import PluginError

    missing = missing_docstrings(api_objects(markdown))
    if missing:
        raise PluginError(
            f"{page.file.src_path}: these public objects have no docstring, so the API reference "
            f"would omit them; write one for each: {', '.join(missing)}"
        )
    if README_MARKER in markdown:
        readme = (Path(config["config_file_path"]).parent / "README.md").read_text(encoding="utf-8")
        markdown = markdown.replace(README_MARKER, readme_for_site(readme))
    return expand_cli_markers(markdown)


def on_page_content(html: str, **_: Any) -> str:
    """The docstrings use Sphinx roles (``:class:`~advreg.perturb.AMP```); show their code span without the role,
    and with ``~`` only the last name, as Sphinx does."""
    return SPHINX_ROLE.sub(lambda m: f"<code>{m.group(2).split('.')[-1] if m.group(1) else m.group(2)}</code>", html)
