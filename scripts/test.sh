#!/usr/bin/env bash
# The README's test command: from a bare machine, make a virtual environment, install advreg with its
# test, docs, integrations and slurm extras (the CPU build of torch first, so that pip does not fetch a CUDA
# build), build the docs site with every warning an error (a broken link, a missing docstring), run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# tests/test_slurm.py runs a one-node Slurm here (as root): Debian's slurm-wlm and munge, when missing
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v slurmctld >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || { apt-get update -q >/dev/null
        apt-get install -y -q slurm-wlm munge >/dev/null; } \
        || echo "test.sh: could not install slurm-wlm and munge; tests/test_slurm.py will skip, saying why" >&2
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test,docs,integrations,slurm]"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$site"
ruff check --quiet .  # the lint rules in pyproject.toml
ruff format --check --quiet .  # the formatting of pyproject.toml's [tool.ruff.format]
# two workers for two cores; pytest's exit 5 ("no tests ran") is a failure here, as it should be
python -m pytest -n 2 -q "$@"
