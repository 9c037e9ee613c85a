"""What nqgen writes about hook-swap and stop-hook on 3.10 (RHEL 7), where hooks live in one global table.

3.10 registers every hook with nf_register_hooks() into the global nf_hooks[pf][hooknum] lists: there is no per-netns
table, no nf_hook_entries_grow (so no kretprobe), and the generated hook-swap takes no nf_hook_mutex barrier. The
manifests and COMPARISON.md must say that for a RHEL 7.7 target, and keep the per-netns text for 4.16+ (RHEL 8.3).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from elffixtures import build_module
from test_generations import CASES, nqgen
from test_headers import FIXTURES as HEADER_TREES

PER_NETNS = re.compile(r"in every netns(?! \w*\s*runs)|per[- ]netns|nf_hook_entries|kretprobe|nf_hook_mutex|4\.16\+")


def _generate(generation: str, tmp_path: Path) -> Path:
    case = CASES[generation]
    ko = build_module(tmp_path, case.source, case.ko, case.cflags)
    out = tmp_path / "out"
    rc, _, stderr = nqgen(["--strategy", "all", "--kdir", str(HEADER_TREES / generation), "--module", str(ko),
                           "--out", str(out)], tmp_path)
    assert rc == 0, stderr
    return out


def _section(text: str, strategy: str) -> str:
    m = re.search(rf"^## {re.escape(strategy)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m is not None, strategy
    return m.group(1)


def _row(text: str, strategy: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {strategy} |"))


@pytest.mark.parametrize("strategy", ["hook-swap", "stop-hook"])
def test_rhel77_texts_say_global_hooks_not_per_netns(strategy: str, tmp_path: Path) -> None:
    out = _generate("rhel7.7", tmp_path)
    text = (out / "COMPARISON.md").read_text()
    notes = json.loads((out / strategy / "nqgen-module.json").read_text())["notes"]
    for where, what in (("manifest notes", notes), ("COMPARISON section", _section(text, strategy)),
                        ("COMPARISON row", _row(text, strategy))):
        found = PER_NETNS.findall(what)
        assert not found, f"{strategy} {where} on RHEL 7.7 says {found}: 3.10 has one global hook table"
    assert "global" in _row(text, strategy)
    if strategy == "hook-swap":
        assert "nf_hooks[pf][hooknum]" in notes and "synchronize_net()" in _row(text, strategy)
        assert "nf_conntrack_ipv6 loaded later" in _section(text, strategy)


def test_rhel83_keeps_the_per_netns_hook_swap_text(tmp_path: Path) -> None:
    out = _generate("rhel8.3", tmp_path)
    text = (out / "COMPARISON.md").read_text()
    section = _section(text, "hook-swap")
    assert "in every netns" in _row(text, "hook-swap") and "nf_hook_mutex" in section
    assert "kretprobe on nf_hook_entries_grow" in _row(text, "hook-swap")
    assert "unload barrier flushes the NFQUEUE instances of init_net" in section
