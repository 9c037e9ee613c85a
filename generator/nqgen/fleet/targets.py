"""The targets of a fleet run: a directory of per-kernel input directories, or a list file.

Directory: every subdirectory ``DIR/NAME`` is one kernel, laid out as any of
- ``/lib/modules/<release>``: ``build/`` (the headers tree) and ``kernel/net/netfilter/nf_conntrack*.ko*``;
- a kernel build tree (``Makefile`` and ``include/``), modules beside their sources;
- flat: ``build`` (a tree or a link to one) and ``nf_conntrack*.ko*`` files beside it;
each optionally with ``vmlinux``, ``System.map``, ``kallsyms``, ``config`` and ``Module.symvers``; what is not there
is found as ``nqgen --kdir <tree>`` finds it (the tree's own files, ``/boot/*-<release>``).

List file: one kernel per line, ``NAME --kdir PATH [--module PATH]... [--vmlinux|--system-map|--kallsyms|--config|
--symvers PATH]`` or ``NAME DIR`` (a directory as above); ``#`` starts a comment; relative paths are relative to
the list file.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from nqgen import probe, symsources
from nqgen.errors import InputError, UsageError
from nqgen.probe import ProfileInputs

NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")
_FILE_OPTIONS = {"--vmlinux": "vmlinux", "--system-map": "system_map", "--kallsyms": "kallsyms",
                 "--config": "config", "--symvers": "symvers"}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """One kernel of the fleet: its name (the output subdirectory) and its inputs."""

    name: str
    inputs: ProfileInputs
    origin: str  # where the target was declared (a directory, or list file:line)
    problem: str | None = None  # why its inputs could not even be assembled (reported as that target's failure)
    argv: tuple[str, ...] = field(default=())  # the equivalent single-target nqgen options


def _argv(inputs: ProfileInputs) -> tuple[str, ...]:
    out: list[str] = []
    if inputs.kdir is not None:
        out += ["--kdir", str(inputs.kdir)]
    for m in inputs.modules:
        out += ["--module", str(m)]
    for opt, attr in _FILE_OPTIONS.items():
        value = getattr(inputs, attr)
        if value is not None:
            out += [opt, str(value)]
    return tuple(out)


def _file(*candidates: Path) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def _base(kdir: Path | None) -> tuple[ProfileInputs, str | None]:
    """What the single-target command starts from for ``--kdir kdir`` (its release's /boot files, the tree's own
    .config, Module.symvers, System.map, vmlinux): a fleet target must profile exactly as that command would."""
    if kdir is None or not kdir.is_dir():
        return ProfileInputs(kdir=kdir), None
    try:
        return probe.default_inputs(kdir=kdir), None
    except InputError as exc:
        return ProfileInputs(kdir=kdir), str(exc)


def from_directory(name: str, d: Path, origin: str) -> Target:
    """A target read from one per-kernel directory (layouts in the module docstring)."""
    if (d / "build").is_dir():
        kdir: Path | None = d / "build"
    elif (d / "Makefile").is_file() and (d / "include").is_dir():
        kdir = d
    else:
        kdir = None
    modules = probe.find_conntrack_modules(d) or probe.find_conntrack_modules(d, subdir="")
    if not modules:
        modules = sorted(p for p in d.glob("nf_conntrack*.ko*") if p.is_file())
    if not modules and kdir is not None and kdir != d:
        modules = probe.find_conntrack_modules(kdir, subdir="")
    base, problem = _base(kdir)
    system_map = _file(d / "System.map")
    if system_map is not None and symsources.is_placeholder_system_map(system_map):
        system_map = None
    inputs = dataclasses.replace(
        base,
        modules=modules,
        vmlinux=_file(d / "vmlinux") or base.vmlinux,
        system_map=system_map or base.system_map,
        kallsyms=_file(d / "kallsyms"),
        config=_file(d / "config") or base.config,
        symvers=_file(d / "Module.symvers") or base.symvers,
    )
    if kdir is None:
        problem = f"{d}: no headers tree (no build/ and not a kernel tree)"
    elif not modules:
        problem = f"{d}: no nf_conntrack*.ko* (nor nf_conntrack_ipv4.ko) found"
    return Target(name, inputs, origin, problem, _argv(inputs))


def _check_name(name: str, where: str) -> None:
    if not NAME_RE.match(name):
        raise UsageError(f"{where}: target name {name!r} is not a plain file name ([A-Za-z0-9._+-])")


def _line_target(tokens: list[str], base: Path, where: str) -> Target:
    name, rest = tokens[0], tokens[1:]
    _check_name(name, where)
    if len(rest) == 1 and not rest[0].startswith("-"):
        d = base / rest[0]
        if not d.is_dir():
            return Target(name, ProfileInputs(), where, f"{d}: no such directory")
        return from_directory(name, d, where)
    values: dict[str, Path] = {}
    kdir: Path | None = None
    modules: list[Path] = []
    it = iter(rest)
    for opt in it:
        value = next(it, None)
        if value is None:
            raise UsageError(f"{where}: {opt} needs a path")
        path = base / value
        if opt == "--kdir":
            kdir = path
        elif opt == "--module":
            modules.append(path)
        elif opt in _FILE_OPTIONS:
            values[_FILE_OPTIONS[opt]] = path
        else:
            known = ", ".join(["--kdir", "--module", *_FILE_OPTIONS])
            raise UsageError(f"{where}: unknown option {opt!r} (a target line takes {known})")
    start, problem = _base(kdir)
    inputs = dataclasses.replace(
        start, modules=modules, vmlinux=values.get("vmlinux", start.vmlinux),
        system_map=values.get("system_map", start.system_map), kallsyms=values.get("kallsyms", start.kallsyms),
        config=values.get("config", start.config), symvers=values.get("symvers", start.symvers))  # fmt: skip
    missing = [str(p) for p in (kdir, *modules, *values.values()) if p is not None and not p.exists()]
    if problem is not None:
        pass
    elif kdir is None:
        problem = "no --kdir"
    elif missing:
        problem = f"no such file or directory: {', '.join(missing)}"
    elif not kdir.is_dir():
        problem = f"--kdir {kdir}: not a directory"
    elif not modules:
        problem = "no --module (nf_conntrack.ko or nf_conntrack_ipv4.ko)"
    return Target(name, inputs, where, problem, _argv(inputs))


def from_list(path: Path) -> list[Target]:
    try:
        text = symsources.read_text(path)
    except InputError as exc:
        raise UsageError(f"--targets: {exc}") from None
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{path}:{number}"
        try:
            tokens = shlex.split(raw, comments=True)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if tokens:
            out.append(_line_target(tokens, path.parent, where))
    return out


def load(spec: Path) -> list[Target]:
    """Every target named by ``--targets`` (a directory or a list file), in a stable order; names are unique."""
    if spec.is_dir():
        subdirs = sorted(p for p in spec.iterdir() if p.is_dir() and not p.name.startswith("."))
        for d in subdirs:
            _check_name(d.name, str(spec))
        targets = [from_directory(d.name, d, str(d)) for d in subdirs]
    elif spec.is_file():
        targets = from_list(spec)
    else:
        raise UsageError(f"--targets {spec}: no such directory or list file")
    if not targets:
        raise UsageError(f"--targets {spec}: no targets in it")
    seen: dict[str, str] = {}
    for t in targets:
        if t.name in seen:
            raise UsageError(f"--targets: target name {t.name!r} given twice ({seen[t.name]} and {t.origin})")
        seen[t.name] = t.origin
    return targets
