"""``make bench``: nqgen's costs measured side by side with a reference in the same run, reported as ratios.

Absolute times on a shared 2-core machine mean little, so every subject is timed in alternating rounds with its
reference (``nm | grep``, ``grep -E``, one ``make`` of a trivial module) and reported as the median ratio with its
spread over the rounds, in wall-clock and in CPU time. Nothing here asserts a time.

Modules: ``timing`` (alternating rounds, ratios), ``symbols`` (symbol lookup against binutils), ``whole`` (a whole
``nqgen --strategy all`` and where its time goes), ``report`` (tables, JSON), ``command`` (``python -m nqgen.bench``).
"""
