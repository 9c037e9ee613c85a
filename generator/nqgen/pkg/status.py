"""``nqgen status``: the same report as the shipped ``nqgen-status`` shell script, for hosts with Python.

Both read only the running system: /sys/module/nq_*, /sys/kernel/<module>/ (counters),
/sys/kernel/livepatch/<module>/, and the ``<module>.env`` files the packages install in /usr/share/nqgen.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

FIX_COMMIT = "56b14ecec97f"
EXIT_OK, EXIT_WARNED, EXIT_NONE = 0, 1, 3


@dataclass
class ModuleStatus:
    module: str
    state: str
    meta: dict[str, str]
    params: list[tuple[str, str]]
    counters: list[tuple[str, str]]
    livepatch: str | None
    warnings: list[str] = field(default_factory=list)


def _read(path: Path) -> str | None:
    try:
        return " ".join(path.read_text(errors="replace").split())
    except OSError:
        return None


def _values(d: Path) -> list[tuple[str, str]]:
    if not d.is_dir():
        return []
    out = []
    for f in sorted(d.iterdir(), key=lambda p: p.name.encode()):
        if f.is_file() and os.access(f, os.R_OK):
            value = _read(f)
            if value is not None:
                out.append((f.name, value))
    return out


def read_env(path: Path) -> dict[str, str]:
    """A ``KEY='value'`` file as written by nqgen (the shell script sources the same file)."""
    meta: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return meta
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isidentifier():
            words = shlex.split(value)
            meta[key] = words[0] if words else ""
    return meta


def collect(sys_root: Path, share: Path, running: str) -> list[ModuleStatus]:
    found = []
    for d in sorted(sys_root.glob("module/nq_*"), key=lambda p: p.name.encode()):
        if not d.is_dir():
            continue
        m = d.name
        meta = read_env(share / f"{m}.env")
        lp_dir = sys_root / "kernel" / "livepatch" / m
        livepatch = None
        if lp_dir.is_dir():
            livepatch = f"enabled={_read(lp_dir / 'enabled')} transition={_read(lp_dir / 'transition')}"
        elif meta.get("UNLOAD") == "livepatch":
            livepatch = "not registered (disabled; the module can be removed)"
        st = ModuleStatus(
            module=m,
            state=_read(d / "initstate") or "loaded",
            meta=meta,
            params=_values(d / "parameters"),
            counters=_values(sys_root / "kernel" / m),
            livepatch=livepatch,
        )
        release = meta.get("RELEASE", "")
        if release and release != running:
            st.warnings.append(f"{m} was generated for {release}, the running kernel is {running}")
        loaded_src = _read(d / "srcversion") or ""
        if meta.get("SRCVERSION") and loaded_src and loaded_src != meta["SRCVERSION"]:
            st.warnings.append(
                f"the loaded {m} (srcversion {loaded_src}) is not the one nqgen installed ({meta['SRCVERSION']})"
            )
        if meta.get("FIX_PRESENT") == "1" and release == running:
            st.warnings.append(
                f"{running} already carries the upstream fix ({FIX_COMMIT}): this mitigation is not needed"
            )
        found.append(st)
    return found


def render(statuses: list[ModuleStatus], running: str, share: Path) -> tuple[str, int]:
    """The report text (identical to nqgen-status's) and its exit status."""
    lines = [f"running kernel: {running}"]
    for st in statuses:
        meta = st.meta
        strategy = meta.get("STRATEGY") or f"unknown (no {share}/{st.module}.env)"
        version = f" (nqgen {meta['NQGEN_VERSION']})" if meta.get("NQGEN_VERSION") else ""
        lines.append(f"{st.module}: {st.state}")
        lines.append(f"  strategy: {strategy}{version}")
        lines.append(f"  target kernel: {meta.get('RELEASE') or 'unknown'}")
        lines.append(f"  parameters: {' '.join(f'{k}={v}' for k, v in st.params) or 'none'}")
        lines.append(f"  counters: {' '.join(f'{k}={v}' for k, v in st.counters) or 'none'}")
        if st.livepatch is not None:
            lines.append(f"  livepatch: {st.livepatch}")
        lines += [f"  WARNING: {w}" for w in st.warnings]
    if not statuses:
        lines.append("no nqgen module is loaded")
        return "\n".join(lines) + "\n", EXIT_NONE
    return "\n".join(lines) + "\n", EXIT_WARNED if any(st.warnings for st in statuses) else EXIT_OK


def status(
    sys_root: Path = Path("/sys"), share: Path = Path("/usr/share/nqgen"), running: str | None = None
) -> tuple[str, int]:
    running = running or os.uname().release
    return render(collect(sys_root, share, running), running, share)
