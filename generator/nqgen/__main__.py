"""``python -m nqgen``: the same as the ``nqgen`` command."""

from .cli import main

main()
