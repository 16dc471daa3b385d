"""``python -m advreg`` is the ``advreg`` command."""

from advreg.cli import main

main()
