"""Exports declared in a kernel source tree, for targets without a full Module.symvers.

A tree prepared with ``modules_prepare`` only (what a distribution config gives before ``make modules``) has no
Module.symvers and no vmlinux, so the kernel's export list is unknown. Its sources still declare every export:
``EXPORT_SYMBOL*(name)`` lines, found here with grep. Exports whose name is pasted by a macro
(``EXPORT_SYMBOL(param_ops_##name)``, ``EXPORT_SYMBOL(__asan_report_load##size##_noabort)``,
``__EXPORT_THUNK(__x86_indirect_thunk_ ## reg)``) are kept as prefixes. The
list is a superset of what a build exports (a declaration in code the config leaves out still counts), so a
check against it says "declared exported in the source", not "exported by the build".
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

# EXPORT_SYMBOL*(), EXPORT_PER_CPU_SYMBOL*(), and arch macros wrapping them (__EXPORT_THUNK(...))
_PATTERN = r"(EXPORT_SYMBOL|EXPORT_PER_CPU_SYMBOL|__EXPORT_[A-Z]+)[A-Z_]*[[:space:]]*\([^)]*\)"
_NAME = re.compile(r"^([A-Z_]+)[^(]*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*(##|[,)])")
_SKIP = ("Documentation", "tools", "scripts", "samples", "usr", ".git")


@dataclass(frozen=True)
class SourceExports:
    tree: Path
    names: frozenset[str]
    prefixes: tuple[str, ...]  # from token-pasted names, e.g. "param_ops_"

    def declares(self, symbol: str) -> bool:
        return symbol in self.names or any(symbol.startswith(p) for p in self.prefixes)


def is_source_tree(kdir: Path) -> bool:
    """A full kernel source tree (not a headers-only package): it has kernel/ and net/ C sources."""
    return (kdir / "kernel/module.c").is_file() and (kdir / "net/core/dev.c").is_file()


_remembered: dict[Path, SourceExports] | None = None


@contextlib.contextmanager
def remembered() -> Iterator[None]:
    """Within this block each tree is scanned once (a fleet repeats trees, and nothing edits them during the run).

    A grep over a whole source tree costs 1-2 s; a fleet with a source tree repeated under many targets paid it for
    every target. Outside such a block every call scans again: a tree may change between calls.
    """
    global _remembered
    saved = _remembered
    _remembered = {} if saved is None else saved
    try:
        yield
    finally:
        _remembered = saved


def scan(tree: Path) -> SourceExports:
    """Every ``EXPORT_SYMBOL*()`` declaration under ``tree`` (C, assembler and headers)."""
    if not is_source_tree(tree):
        raise InputError(f"{tree} is not a kernel source tree (no kernel/module.c, net/core/dev.c)")
    if _remembered is None:
        return _scan(tree)
    resolved = tree.resolve()
    if resolved not in _remembered:
        _remembered[resolved] = _scan(resolved)
    found = _remembered[resolved]
    return SourceExports(tree=tree, names=found.names, prefixes=found.prefixes)


def _scan(tree: Path) -> SourceExports:
    grep = shutil.which("grep")
    if grep is None:
        raise InputError("grep is missing")
    cmd = [grep, "-rhoE", "--include=*.c", "--include=*.S", "--include=*.h",
           *(f"--exclude-dir={d}" for d in _SKIP), _PATTERN, "."]
    # bytes as bytes (LC_ALL=C), decoded without failing: a source file in Latin-1 is not an error (grep's output
    # was decoded strictly in the caller's locale: UnicodeDecodeError under LC_ALL=C)
    env = {**os.environ, "LC_ALL": "C"}
    res = subprocess.run(cmd, cwd=tree, capture_output=True, encoding="utf-8", errors="replace", env=env,
                         check=False)  # fmt: skip
    if res.returncode not in (0, 1):
        raise InputError(f"cannot scan {tree} for exports: {res.stderr.strip()}")
    names: set[str] = set()
    prefixes: set[str] = set()
    for line in res.stdout.splitlines():
        m = _NAME.search(line)
        if m is None:
            continue
        name = m.group(2)
        if m.group(3) == "##":
            if len(name) >= 4:  # a pasted name: keep its fixed part as a prefix
                prefixes.add(name)
        else:
            names.add(name)
    return SourceExports(tree=tree, names=frozenset(names), prefixes=tuple(sorted(prefixes)))
