"""NAT in the packet path: which strategies break it, whether the target has it, and the generator's gate.

Measured in the lab's node scenario (``nqgen lab --scenario node``, README "A real node"): a strategy that
confirms a UDP entry at ``NF_IP_PRI_FIRST`` in POST_ROUTING confirms it before SNAT/MASQUERADE (priority
100) runs; on 6.1 and RHEL 8 NAT is then skipped for that flow (``nf_nat_setup_info`` refuses confirmed
entries), so the query leaves untranslated and its answer never comes back; on RHEL 7 NAT rewrites the reply
tuple of the already-hashed entry (issue 8 item 2). When the target has NAT in the path, such a strategy is
refused unless ``--allow-nat-breakage`` says the user accepts it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from .strategies import Feasibility

# strategy -> how it breaks translated UDP flows (keep in step with the node scenario's measurements). Empty since
# advance-confirm stopped confirming early what NAT has seen (issue 8 item 2): on Debian 6.1 the node scenario
# measured every masqueraded lookup answered with advance-confirm loaded (before that change: none).
NAT_BREAKING: dict[str, str] = {}
_UNPROTECTED = (
    "leaves every entry NAT has seen (a NAT binding or extension) unconfirmed instead of confirming it early, so "
    "translated flows keep their NAT but get no protection: the kernel's unfixed confirm still runs for them"
)
# strategy -> what it does not do for translated flows (they pass, unprotected)
NAT_UNPROTECTED: dict[str, str] = {"advance-confirm": _UNPROTECTED, "advance-confirm-corrected": _UNPROTECTED}
NAT_TABLE_MODULES = ("nf_nat", "iptable_nat", "ip6table_nat", "nft_chain_nat", "nf_nat_ipv4", "nf_nat_ipv6")
NAT_CHOICES = ("auto", "yes", "no")


@dataclass(frozen=True)
class NatPath:
    """Whether the target has NAT in the packet path: True, False or None (unknown), and why we think so."""

    present: bool | None
    evidence: str


def detect_running(proc: Path = Path("/proc")) -> NatPath:
    """Look at the running system: a ``nat`` x_tables table, or a loaded NAT module (nftables NAT chains)."""
    found: list[str] = []
    for name in ("ip_tables_names", "ip6_tables_names"):
        path = proc / "net" / name
        try:
            if "nat" in path.read_text().split():
                found.append(f"{path} lists nat")
        except OSError:
            continue
    try:
        loaded = {line.split()[0] for line in (proc / "modules").read_text().splitlines() if line.strip()}
    except OSError:
        loaded = set()
    found += [f"module {m} is loaded" for m in NAT_TABLE_MODULES if m in loaded]
    if found:
        return NatPath(True, "; ".join(found))
    return NatPath(False, f"no nat table in {proc}/net/ip*_tables_names and no NAT module in {proc}/modules")


def decide_nat(choice: str, target_release: str, running_release: str | None = None,
               proc: Path = Path("/proc")) -> NatPath:
    """``--nat``: yes/no as told; auto inspects the running system when it runs the target kernel."""
    if choice == "yes":
        return NatPath(True, "--nat yes")
    if choice == "no":
        return NatPath(False, "--nat no")
    running = running_release if running_release is not None else os.uname().release
    if running != target_release:
        return NatPath(None, f"the target ({target_release}) is not the running kernel ({running}): "
                             "pass --nat yes|no to say whether NAT is in the path")
    return detect_running(proc)


def gate(
    decisions: dict[str, Feasibility],
    nat: NatPath,
    allow: bool,
    breaking: Mapping[str, str] = NAT_BREAKING,
    unprotected: Mapping[str, str] = NAT_UNPROTECTED,
) -> dict[str, Feasibility]:
    """Refuse the NAT-breaking strategies when NAT is in the path, unless allowed; note the risk otherwise. Note
    what the strategies that leave translated flows unprotected do not do, where NAT is or may be in the path."""
    out = dict(decisions)
    for name, why in unprotected.items():
        d = out.get(name)
        if d is None or not d.feasible or nat.present is False:
            continue
        where = "NAT is in the packet path" if nat.present else "NAT in the path unknown"
        where += f" ({nat.evidence})"
        out[name] = replace(d, notes=(*d.notes, f"{where}: this strategy {why}"))
    for name, why in breaking.items():
        d = out.get(name)
        if d is None or not d.feasible:
            continue
        if nat.present is True and not allow:
            out[name] = Feasibility(False, f"NAT is in the packet path ({nat.evidence}) and this strategy {why}; "
                                           "pass --allow-nat-breakage to generate it anyway")
        elif nat.present is True:
            out[name] = replace(d, notes=(*d.notes, f"generated with --allow-nat-breakage although NAT is in the "
                                                    f"path ({nat.evidence}): it {why}"))
        elif nat.present is None:
            out[name] = replace(d, notes=(*d.notes, f"NAT in the path unknown ({nat.evidence}); if there is, it {why}"))
    return out
