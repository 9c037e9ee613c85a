"""What the lab's own guest modules need to know about the target: decided from its headers and .config.

The helper (``nqlab_ct``) and the stale-use detector (``nqlab_detect``) are single C files that take the
kernel generation's API as ``-D`` flags, the way the generated modules take it from ``nqgen.headers``:
the ``nf_hookfn`` form and hook registration come from the same header facts, the rest (``nf_ct_netns_get``,
the type of the conntrack refcount, whether ``nf_ct_deliver_cached_events`` is out of line, kprobes) from a
few more declarations read here.  Every decision keeps its evidence line for ``lab.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import headers
from ..errors import InputError

CT_H = "include/net/netfilter/nf_conntrack.h"
CT_COMMON_H = "include/linux/netfilter/nf_conntrack_common.h"  # struct nf_conntrack from 4.x
SKBUFF_H = "include/linux/skbuff.h"  # struct nf_conntrack in 3.10
ECACHE_H = "include/net/netfilter/nf_conntrack_ecache.h"
DOT_CONFIG = ".config"

_HOOK_FLAGS = {"priv_state": "NQLAB_HOOK_PRIV_STATE", "ops_state": "NQLAB_HOOK_OPS_STATE", "okfn": "NQLAB_HOOK_OKFN"}
_DELIVER_DECL = r"^\s*(?:extern\s+)?void\s+nf_ct_deliver_cached_events\s*\(\s*struct\s+nf_conn\s*\*\s*\w*\s*\)\s*;"
_DETECTOR_OPTIONS = ("CONFIG_KPROBES", "CONFIG_KRETPROBES", "CONFIG_NF_CONNTRACK_EVENTS")


@dataclass(frozen=True)
class GuestApi:
    """The target's API as the lab's guest modules use it."""

    hookfn_form: str  # "priv_state", "ops_state" or "okfn" (as nqgen.headers names them)
    global_hooks: bool  # nf_register_hook(s): one hook table (3.10)
    ops_owner: bool
    ct_netns_get: bool  # conntrack registers its hooks only when asked (4.10+)
    ct_refcount_t: bool  # struct nf_conntrack's use is a refcount_t (else atomic_t)
    detector_reason: str | None  # None: the stale-use detector can be built; else why not
    evidence: dict[str, str] = field(default_factory=dict)

    @property
    def detector(self) -> bool:
        return self.detector_reason is None

    def cflags(self) -> list[str]:
        """The ``-D`` flags the guest modules are built with."""
        flags = [f"-D{_HOOK_FLAGS[self.hookfn_form]}"]
        if self.global_hooks:
            flags.append("-DNQLAB_GLOBAL_HOOKS")
        if self.ops_owner:
            flags.append("-DNQLAB_OPS_OWNER")
        if self.ct_netns_get:
            flags.append("-DNQLAB_CT_NETNS_GET")
        if self.ct_refcount_t:
            flags.append("-DNQLAB_CT_REFCOUNT_T")
        return flags

    def to_json(self) -> dict[str, object]:
        return {
            "hookfn_form": self.hookfn_form,
            "global_hooks": self.global_hooks,
            "ops_owner": self.ops_owner,
            "ct_netns_get": self.ct_netns_get,
            "ct_refcount_t": self.ct_refcount_t,
            "detector": self.detector,
            "detector_reason": self.detector_reason,
            "cflags": self.cflags(),
            "evidence": dict(self.evidence),
        }


def _config(kdir: Path) -> dict[str, str] | None:
    path = kdir / DOT_CONFIG
    if not path.is_file():
        return None
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def _refcount_type(tree: headers.HeaderTree) -> tuple[bool, str]:
    for rel in (CT_COMMON_H, SKBUFF_H):
        body = headers.find_body(tree.read(rel) or "", r"\bstruct\s+nf_conntrack")
        if body is None:
            continue
        m = re.search(r"\b(refcount_t|atomic_t)\s+use\s*;", body)
        if m:
            return m.group(1) == "refcount_t", f"{rel}: struct nf_conntrack {{ {m.group(1)} use; }}"
    raise InputError(
        f"no struct nf_conntrack with a use count in {CT_COMMON_H} or {SKBUFF_H} of {tree.kdir}"
    )


def _deliver_out_of_line(tree: headers.HeaderTree) -> tuple[bool, str]:
    ecache = tree.read(ECACHE_H) or ""
    decl = re.search(_DELIVER_DECL, ecache, re.M)
    if decl:
        return True, f"{ECACHE_H} declares 'void nf_ct_deliver_cached_events(struct nf_conn *ct);' (out of line)"
    return False, f"{ECACHE_H} has no out-of-line nf_ct_deliver_cached_events() declaration"


def decide(kdir: Path) -> GuestApi:
    """Read the target's headers under ``kdir`` and decide how the guest modules are built."""
    tree = headers.locate(kdir)
    facts = headers.scan_cached(tree)
    ev: dict[str, str] = {"hookfn_form": f"{headers.NETFILTER_H} {facts.hookfn_evidence}"}
    global_hooks = facts.has_register_hook
    ev["global_hooks"] = (
        f"{headers.NETFILTER_H} declares nf_register_hook(ops)" if global_hooks
        else f"{headers.NETFILTER_H} declares only nf_register_net_hook(net, ops)"
    )
    ev["ops_owner"] = f"struct nf_hook_ops {'has' if facts.ops_has_owner else 'has no'} .owner"
    ct_h = tree.read(CT_H) or ""
    netns_get = re.search(r"\bint\s+nf_ct_netns_get\s*\(", ct_h) is not None
    ev["ct_netns_get"] = f"{CT_H} {'declares' if netns_get else 'does not declare'} nf_ct_netns_get()"
    refcount_t, ev["ct_refcount_t"] = _refcount_type(tree)

    reason: str | None = None
    out_of_line, ev["detector"] = _deliver_out_of_line(tree)
    config = _config(kdir)
    if not out_of_line:
        reason = ev["detector"]
    elif tree.arch != "x86":
        reason = f"the detector reads arguments from x86_64 registers; this tree is {tree.arch}"
    elif config is not None:
        missing = [o for o in _DETECTOR_OPTIONS if config.get(o) not in ("y", "m")]
        if missing:
            reason = f"{kdir / DOT_CONFIG} lacks {', '.join(missing)}"
    if reason is None:
        ev["detector"] += "; " + ("kprobes, kretprobes and conntrack events configured" if config is not None
                                  else f"no {DOT_CONFIG}: kprobes assumed")
    return GuestApi(
        hookfn_form=facts.hookfn_form,
        global_hooks=global_hooks,
        ops_owner=facts.ops_has_owner,
        ct_netns_get=netns_get,
        ct_refcount_t=refcount_t,
        detector_reason=reason,
        evidence=ev,
    )
