"""The tests are laid out as src/advreg is: a folder of tests/ holds the tests of the subpackage of that name."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "src" / "advreg"


def test_every_folder_of_tests_is_a_subpackage_of_advreg():
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders and folders <= packages, f"tests/ folders without a package of the same name: {folders - packages}"
