"""``python -m nqgen.lab.scenarios.node``: see :mod:`.full`."""

from .full import main

main()
