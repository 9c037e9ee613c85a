"""Fleet mode: ``nqgen --strategy all --targets DIR|LIST`` generates for many kernels at once.

``targets`` reads the target list (a directory of per-kernel input directories, or a list file of ``NAME
OPTIONS``), ``run`` generates every target in a pool of worker processes (one bad target never stops the others;
each target's output appears whole or not at all) and ``summary`` prints and writes the per-target results.
Header facts are cached per tree by ``nqgen.headers.scan_cached``, so kernels that share a tree scan it once.
"""
