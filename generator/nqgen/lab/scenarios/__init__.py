"""Lab scenarios beyond the seed workload of :mod:`nqgen.lab.runner` (``nqgen lab --scenario NAME``).

``node``: a Kubernetes-like node built from real Debian software inside the guest (see :mod:`.node`).
"""
