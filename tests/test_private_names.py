"""No test reaches into a private name of advreg: the suite tests the public API (``from advreg.x import _y``,
``advreg.x._y``, ``module._y`` on an advreg module, ``monkeypatch.setattr(module, "_y", ...)`` all count)."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CODE_IMPORT = re.compile(r"from (advreg[\w.]*) import ([\w, ]+)")  # in code a test runs in a subprocess
ALLOWED: set[tuple[str, str]] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _advreg_modules(tree: ast.AST) -> dict[str, str]:
    """Local name -> the advreg module it is bound to, by the file's imports."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "advreg":
                    bound[alias.asname or "advreg"] = alias.name if alias.asname else "advreg"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "advreg":
            for alias in node.names:
                if _is_module(f"{node.module}.{alias.name}"):
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything but a chain of names."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def private_uses(source: str) -> list[str]:
    """The private advreg names that ``source`` (a test module) imports or reads, as dotted names."""
    tree = ast.parse(source)
    modules, found = _advreg_modules(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "advreg":
            found += [f"{node.module}.{a.name}" for a in node.names if _private(a.name)]
            found += [node.module] if any(_private(part) for part in node.module.split(".")) else []
        elif isinstance(node, (ast.Attribute, ast.Call)):
            found += _private_chain(node, modules)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [
                f"{m}.{n.strip()}"
                for m, names in CODE_IMPORT.findall(node.value)
                for n in names.split(",")
                if _private(n.strip())
            ]
    return sorted(set(found))


def _private_chain(node: ast.AST, modules: dict[str, str]) -> list[str]:
    if isinstance(node, ast.Call):  # monkeypatch.setattr(module, "_name", ...)
        func = _dotted(node.func)
        if func and func[-1] in ("setattr", "getattr", "delattr") and len(node.args) >= 2:
            target, name = _dotted(node.args[0]), node.args[1]
            if (
                target
                and target[0] in modules
                and isinstance(name, ast.Constant)
                and isinstance(name.value, str)
                and _private(name.value)
            ):
                return [".".join([modules[target[0]], *target[1:], name.value])]
        return []
    chain = _dotted(node)  # each attribute is its own node: look at its last name only
    if chain and chain[0] in modules and _private(chain[-1]):
        return [".".join([modules[chain[0]], *chain[1:]])]
    return []


def test_the_checker_finds_each_form():
    source = "\n".join(
        [
            "import advreg.train as training",
            "import advreg",
            "from advreg import bench",
            "from advreg.x import ok, _y",
            "import torch",
            "training._restore(1)",
            "advreg.perturb.engine._checked",
            "bench._finite(None)",
            "monkeypatch.setattr(training, '_z', 1)",
            "torch._foreach_add_",
            "self._delta",
            "training.train",
            "code = 'import os; from advreg.io import read_json, _w; _w()'",
        ]
    )
    assert private_uses(source) == [
        "advreg.bench._finite",
        "advreg.io._w",
        "advreg.perturb.engine._checked",
        "advreg.train._restore",
        "advreg.train._z",
        "advreg.x._y",
    ]


def test_no_test_uses_a_private_name_of_advreg():
    files = [path for path in sorted(TESTS.rglob("*.py")) if path.name != Path(__file__).name]  # this one: examples
    found = [(path.name, name) for path in files for name in private_uses(path.read_text())]
    assert [use for use in found if use not in ALLOWED] == []
