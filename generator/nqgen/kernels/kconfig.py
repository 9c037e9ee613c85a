"""Kconfig files: read assignments, merge a fragment into a .config, find the lines Kconfig did not honour."""

from __future__ import annotations

import re

_CONFIG_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_CONFIG_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str | None]:
    """Kconfig assignments of a .config or fragment: name -> value, None for "is not set"."""
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _CONFIG_SET.match(line):
            out[m.group(1)] = m.group(2)
        elif m := _CONFIG_UNSET.match(line):
            out[m.group(1)] = None
    return out


def merge_config(base: str, fragment: str) -> str:
    """``base`` with every symbol the fragment names replaced by the fragment's line (appended at the end)."""
    wanted = parse_config(fragment)
    kept = []
    for line in base.splitlines():
        m = _CONFIG_SET.match(line.strip()) or _CONFIG_UNSET.match(line.strip())
        if m is None or m.group(1) not in wanted:
            kept.append(line)
    for name, value in wanted.items():
        kept.append(f"{name}={value}" if value is not None else f"# {name} is not set")
    return "\n".join(kept) + "\n"


def without_modules(config: str) -> str:
    """``config`` with every ``=m`` option turned off (a distribution config made into a small monolithic one)."""
    out = []
    for line in config.splitlines():
        m = _CONFIG_SET.match(line.strip())
        out.append(f"# {m.group(1)} is not set" if m is not None and m.group(2) == "m" else line)
    return "\n".join(out) + "\n"


def missing_options(config: str, fragment: str) -> list[str]:
    """Fragment lines the final .config does not honour, as "CONFIG_X=want (got ...)"."""
    have = parse_config(config)
    bad = []
    for name, want in parse_config(fragment).items():
        got = have.get(name)
        if want is None or want == "n":
            if got not in (None, "n"):
                bad.append(f"{name} not set (got {got})")
        elif got != want:
            bad.append(f"{name}={want} (got {got if got is not None else 'unset'})")
    return bad
