"""The manifest each generated module ships (``out/<strategy>/nqgen-module.json``) and where to find them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

MANIFEST = "nqgen-module.json"
STRATEGY_ORDER = ("advance-confirm", "advance-confirm-corrected", "ftrace", "hook-swap", "stop-hook", "livepatch")


@dataclass(frozen=True)
class Manifest:
    """How the lab loads, observes and unloads one generated module."""

    strategy: str
    module: str
    ko: Path
    params: dict[str, str]
    stats_dir: str | None
    counters: tuple[str, ...]
    corrected_counter: str | None
    unload: str  # "rmmod" or "livepatch"
    livepatch_sysfs: str | None
    queue_base: int | None
    queue_count: int
    families: tuple[str, ...]
    notes: str
    ftrace_permanent: bool | None = None  # ftrace-based module: does it claim FTRACE_OPS_FL_PERMANENT? None: not one
    patched: tuple[str, ...] = ()  # functions an ftrace/livepatch module redirects (checked in the guest)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def load_manifest(path: Path) -> Manifest:
    """Read and check one manifest; the module's .ko path is relative to the manifest's directory."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    for key in ("strategy", "module", "ko"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise InputError(f"{path}: missing or empty '{key}'")
    unload = data.get("unload", "rmmod")
    if unload not in ("rmmod", "livepatch"):
        raise InputError(f"{path}: unload must be 'rmmod' or 'livepatch', not {unload!r}")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise InputError(f"{path}: 'params' must be an object")
    counters = data.get("counters") or []
    if not isinstance(counters, list) or not all(isinstance(c, str) and c.isidentifier() for c in counters):
        raise InputError(f"{path}: 'counters' must be a list of plain names")
    queues = data.get("queues")
    base: int | None = None
    count = 0
    if isinstance(queues, dict):
        base, count = int(queues.get("base", 0)), int(queues.get("count", 1))
        if not (0 <= base <= 65535 and 0 < count <= 64):
            raise InputError(f"{path}: bad queues {queues}")
    module = data["module"]
    if not module.replace("_", "").isalnum():
        raise InputError(f"{path}: bad module name {module!r}")
    return Manifest(
        strategy=data["strategy"],
        module=module,
        ko=(path.parent / data["ko"]).resolve(),
        params={str(k): _param(v) for k, v in params.items()},
        stats_dir=_str_or_none(data.get("stats_dir")),
        counters=tuple(counters),
        corrected_counter=_str_or_none(data.get("corrected_counter")),
        unload=unload,
        livepatch_sysfs=_str_or_none(data.get("livepatch_sysfs")),
        queue_base=base,
        queue_count=count,
        families=tuple(str(f) for f in data.get("families") or ()),
        notes=str(data.get("notes") or ""),
        ftrace_permanent=_bool_or_none(data.get("ftrace_permanent")),
        patched=_names(path, data.get("patched")),
    )


def _bool_or_none(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _names(path: Path, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.isidentifier() for v in value):
        raise InputError(f"{path}: 'patched' must be a list of function names")
    return tuple(value)


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _order_key(strategy: str) -> tuple[int, str]:
    if strategy in STRATEGY_ORDER:
        return (STRATEGY_ORDER.index(strategy), strategy)
    return (len(STRATEGY_ORDER), strategy)


def discover(out_dir: Path, wanted: tuple[str, ...] = ()) -> list[Manifest]:
    """The manifests under ``out_dir`` whose module is built, in the canonical strategy order.

    With ``wanted``, exactly those strategies (an unknown or unbuilt one is an error).
    """
    found: dict[str, Manifest] = {}
    for path in sorted(out_dir.glob(f"*/{MANIFEST}")):
        m = load_manifest(path)
        found[m.strategy] = m
    if wanted:
        missing = [s for s in wanted if s not in found]
        if missing:
            have = ", ".join(sorted(found)) or "none"
            raise InputError(f"no manifest for strategy {', '.join(missing)} in {out_dir} (have: {have})")
        chosen = [found[s] for s in wanted]
        unbuilt = [m.strategy for m in chosen if not m.ko.is_file()]
        if unbuilt:
            raise InputError(f"module not built for {', '.join(unbuilt)} (run make -C {out_dir})")
        return chosen
    return sorted((m for m in found.values() if m.ko.is_file()), key=lambda m: _order_key(m.strategy))
