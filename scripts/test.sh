#!/usr/bin/env bash
# The README's test command: from a bare machine, make a virtual environment, install advreg with its
# test, docs and integrations extras (the CPU build of torch first, so that pip does not fetch a CUDA build), build the docs
# site with every warning an error (a broken link, a missing docstring), run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test,docs,integrations]"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$site"
# two workers for two cores; pytest's exit 5 ("no tests ran") is a failure here, as it should be
python -m pytest -n 2 -q "$@"
