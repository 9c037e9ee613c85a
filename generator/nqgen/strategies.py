"""The mitigation strategies: what each one needs from the kernel, and what it does to it.

A strategy first decides from the profile whether it can work on the target; the answer carries the reason
in one line. The descriptive fields feed ``out/COMPARISON.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .context import optional_target, patch_nf_confirm, resolve_method
from .profile import KernelProfile


@dataclass(frozen=True)
class Feasibility:
    feasible: bool
    reason: str  # one line: why not, or what it will use
    covers: tuple[str, ...] = ()  # families ("ipv4", "ipv6") whose confirm path is protected
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    touches: str  # what it changes in the running kernel
    needs: str  # config and exports it relies on
    undo: str  # how unloading restores the kernel
    risks: tuple[str, ...]
    check: Callable[[KernelProfile], Feasibility] = field(repr=False, compare=False)


CONFIRM_EXPORTS = ("__nf_conntrack_confirm", "nf_ct_deliver_cached_events")
# The corrected confirm re-implements the kernel's sequence adjustment with nf_ct_seq_adjust(); kernels without
# it (early RHEL 7, still on the nf_ct_nat_offset API) cannot get a faithful copy.
CORRECTED_EXPORTS = (*CONFIRM_EXPORTS, "nf_ct_seq_adjust")


def _missing_exports(profile: KernelProfile, names: tuple[str, ...]) -> list[str]:
    """Names not exported by the target; empty when the export list is unknown (no Module.symvers)."""
    if "symvers" not in profile.sources:
        return []
    return [n for n in names if n not in profile.exports]


def _resolvable(profile: KernelProfile, family: str) -> str | None:
    """How a module finds the family's confirm function, or None when it cannot."""
    target = profile.confirm.get(family)
    if target is None:
        return None
    if target.exported:
        return "exported"
    method = resolve_method(profile)  # what the generated module will do
    if method == "anchor" and target.anchor is None:
        return None
    return method


def _families(profile: KernelProfile) -> tuple[str, ...]:
    return tuple(f for f in ("ipv4", "ipv6") if _resolvable(profile, f) is not None)


def _base_check(profile: KernelProfile, extra_exports: tuple[str, ...] = ()) -> Feasibility | None:
    """Checks shared by every strategy; a Feasibility when something blocks, else None."""
    if profile.config.known and not profile.config.modules:
        return Feasibility(False, "the kernel is built without loadable module support (CONFIG_MODULES)")
    if "ipv4" not in profile.confirm:
        return Feasibility(False, f"no IPv4 confirm function found in {profile.module.name}")
    missing = _missing_exports(profile, CONFIRM_EXPORTS + extra_exports)
    if missing:
        return Feasibility(False, "the kernel does not export " + ", ".join(missing))
    return None


def _where(profile: KernelProfile, families: tuple[str, ...]) -> str:
    parts = []
    for fam in families:
        t = profile.confirm[fam]
        how = _resolvable(profile, fam)
        if how == "anchor" and t.delta is not None:
            parts.append(f"{t.function} = {t.anchor} {t.delta:+#x} (checked with sprint_symbol at load)")
        else:
            parts.append(f"{t.function} ({how})")
    return "; ".join(parts)


def _optional_notes(profile: KernelProfile, families: tuple[str, ...]) -> tuple[str, ...]:
    """One note per confirm function the module attaches to only when its module loads (RHEL 7's IPv6)."""
    ipv4_module = profile.confirm["ipv4"].module
    notes = []
    for fam in families:
        t = profile.confirm[fam]
        if optional_target(profile, t.module, t.exported, ipv4_module):
            notes.append(
                f"{fam}: {t.function} lives in [{t.module}], which need not be loaded: the module loads without it "
                f"and attaches to it (module notifier) once [{t.module}] has loaded; until then {fam} is not covered "
                "(run in the lab on RHEL 7.7 for advance-confirm, ftrace and hook-swap)"
            )
    return tuple(notes)


def _nat_note(profile: KernelProfile) -> str:
    """What confirming a NATed entry early would do on this kernel, decided from its headers."""
    if profile.features.nat_on_confirmed == "rewrites_reply":
        return (
            "this kernel's nf_nat_setup_info() has no confirmed check (struct nf_conn has no nat_bysource): "
            "an entry confirmed before SNAT/MASQUERADE would get the reply tuple of a hashed entry rewritten "
            "(replies stop matching, the entry is unlinked from the wrong bucket); hence entries NAT has seen "
            "are never confirmed early (measured in the lab on RHEL 7.7 under MASQUERADE: the code that confirmed "
            "them lost every DNS lookup while nf_conntrack_alter_reply() ran on hashed entries; today's keeps every "
            "lookup and NATs no hashed entry)"
        )
    return (
        "this kernel's nf_nat_setup_info() leaves confirmed entries alone: an entry confirmed before "
        "SNAT/MASQUERADE would silently not be NATed; hence entries NAT has seen are never confirmed early"
    )


def _queue_note(profile: KernelProfile) -> str:
    """What unloading does to packets held in NFQUEUE, which follows the hook registration."""
    if profile.features.registration == "pernet":
        return (
            "unload: unregistering the hooks makes the kernel drop every packet held in ANY NFQUEUE queue of "
            "each netns (nf_queue_nf_hook_drop flushes all instances), not only the packets this module queued"
        )
    return (
        "unload: this kernel does not flush the queues on hook removal; each queued packet holds a reference "
        "on the module (.owner), so rmmod is refused while packets it queued are held"
    )


def _check_advance(profile: KernelProfile) -> Feasibility:
    blocked = _base_check(profile)
    if blocked:
        return blocked
    if _resolvable(profile, "ipv4") is None:
        return Feasibility(
            False, "ipv4 confirm is not exported, has no exported anchor, and kallsyms_lookup_name is unexported"
        )
    families = _families(profile)
    return Feasibility(
        True,
        "calls the kernel's own " + _where(profile, families),
        covers=(),
        notes=(_nat_note(profile), _queue_note(profile), *_optional_notes(profile, families)),
    )


def _check_advance_corrected(profile: KernelProfile) -> Feasibility:
    blocked = _base_check(profile, CORRECTED_EXPORTS)
    if blocked:
        return blocked
    return Feasibility(
        True,
        "uses only exported symbols (" + ", ".join(CORRECTED_EXPORTS) + ")",
        covers=tuple(f for f in ("ipv4", "ipv6") if f in profile.confirm),
        notes=(
            "only queued UDP entries without a helper, sequence adjustment or NAT take the corrected path",
            _nat_note(profile),
            _queue_note(profile),
        ),
    )


def _check_ftrace(profile: KernelProfile) -> Feasibility:
    blocked = _base_check(
        profile, (*CORRECTED_EXPORTS, "register_ftrace_function", "ftrace_set_filter_ip", "unregister_ftrace_function")
    )
    if blocked:
        return blocked
    cfg = profile.config
    if cfg.known and not cfg.ftrace_with_regs:
        return Feasibility(False, "CONFIG_DYNAMIC_FTRACE_WITH_REGS is not set: ftrace cannot change the return path")
    families = _families(profile)
    if "ipv4" not in families:
        return Feasibility(False, "cannot find the address of the ipv4 confirm function without kallsyms")
    untraceable = [profile.confirm[f].function for f in families if not profile.confirm[f].traceable]
    if untraceable:
        return Feasibility(False, "not traceable (no mcount record): " + ", ".join(untraceable))
    also = " and the exported nf_confirm (the bridge's conntrack calls it)" if patch_nf_confirm(profile) else ""
    notes = _patched_notes(profile)
    if profile.features.ftrace_permanent:
        notes += ("FTRACE_OPS_FL_PERMANENT: sysctl kernel.ftrace_enabled=0 is refused while it is loaded",)
    else:
        notes += ("no FTRACE_OPS_FL_PERMANENT in this kernel: sysctl kernel.ftrace_enabled=0 turns it off silently",)
    notes += _optional_notes(profile, families)
    return Feasibility(True, "redirects " + _where(profile, families) + also, covers=families, notes=notes)


def _patched_notes(profile: KernelProfile) -> tuple[str, ...]:
    """What ftrace and livepatch leave to the unfixed inline confirm on this kernel, exactly."""
    if patch_nf_confirm(profile):
        bridge = (
            "the bridge's conntrack (nf_conntrack_bridge) is covered where it calls nf_confirm, not on its "
            "inline fallbacks (no entry or RELATED_REPLY; IPv6 with unwalkable extension headers or a "
            "non-first fragment)"
        )
    else:
        bridge = "bridge conntrack (nf_conntrack_bridge, 5.3+) runs the inline confirm: not covered"
    return (
        "not covered: the inline nf_conntrack_confirm() compiled into openvswitch (ovs_ct_commit), tc act_ct and "
        "IPVS (ip_vs_confirm_conntrack in ip_vs_nfct.c), read in Debian's 6.1 source",
        bridge,
    )


def _check_hook_swap(profile: KernelProfile) -> Feasibility:
    if profile.features.hook_storage == "pf_entries":
        return Feasibility(
            False,
            "hook tables are net->nf.hooks[pf][hooknum] (4.9-4.15): the generated C reads net->nf.hooks_ipv4[] "
            "(4.16+) and copied nf_hook_entry lists are not handled",
        )
    extra: tuple[str, ...] = ("nf_hooks",) if profile.features.hook_storage == "list" else ()
    blocked = _base_check(profile, (*CORRECTED_EXPORTS, *extra))
    if blocked:
        return blocked
    families = _families(profile)
    if "ipv4" not in families:
        return Feasibility(False, "cannot find the address of the ipv4 confirm function to recognise its hook entry")
    if not profile.confirm["ipv4"].hooks:
        return Feasibility(False, "no hook entry registering the ipv4 confirm function was found in the ops array")
    return Feasibility(
        True,
        "swaps the hook entries of " + _where(profile, families),
        covers=families,
        notes=_optional_notes(profile, families),
    )


def _check_stop_hook(profile: KernelProfile) -> Feasibility:
    reg = "nf_register_net_hooks" if profile.features.registration == "pernet" else "nf_register_hooks"
    blocked = _base_check(profile, (*CORRECTED_EXPORTS, reg))
    if blocked:
        return blocked
    notes: tuple[str, ...] = ()
    if profile.features.nf_stop_honoured:
        reason = "NF_STOP is honoured: the original confirm never runs"
    elif profile.features.confirm_generation == "G1":
        reason = "NF_STOP is not honoured here: pre-confirms every entry and returns NF_ACCEPT"
        notes = (
            "helpers run in their own hook (300) before it and the kernel's confirm hook applies the sequence "
            "adjustment to confirmed entries too, so every entry is pre-confirmed",
        )
    else:
        reason = "NF_STOP is not honoured here: pre-confirms and returns NF_ACCEPT"
        notes = ("entries with a helper or sequence adjustment are left to the original confirm",)
    return Feasibility(True, reason, covers=("ipv4", "ipv6") if "ipv6" in profile.confirm else ("ipv4",), notes=notes)


def _check_livepatch(profile: KernelProfile) -> Feasibility:
    f = profile.features
    cfg = profile.config
    if cfg.known and not cfg.livepatch:
        return Feasibility(False, "CONFIG_LIVEPATCH is not set")
    if f.livepatch_api == "none":
        return Feasibility(False, "the kernel has no livepatch API (include/linux/livepatch.h)")
    needed: tuple[str, ...] = (*CORRECTED_EXPORTS, "klp_enable_patch")
    if f.livepatch_api == "register_enable":
        needed += ("klp_register_patch", "klp_unregister_patch", "klp_disable_patch")
    blocked = _base_check(profile, needed)
    if blocked:
        return blocked
    families = tuple(f for f in ("ipv4", "ipv6") if f in profile.confirm)
    untraceable = [profile.confirm[x].function for x in families if not profile.confirm[x].traceable]
    if untraceable:
        return Feasibility(False, "not traceable (no mcount record): " + ", ".join(untraceable))
    # 3.10/4.18 keep ipv4_confirm and ipv6_confirm in two modules: one klp object each
    objects: dict[str, list[str]] = {}
    for x in families:
        objects.setdefault(profile.confirm[x].module, []).append(profile.confirm[x].function)
    if patch_nf_confirm(profile):
        objects.setdefault(profile.confirm["ipv4"].module, []).append("nf_confirm")
    where = "; ".join(f"{', '.join(fns)} in object {obj}" for obj, fns in objects.items())
    notes = (
        *_patched_notes(profile),
        "protection starts when the enable transition has finished (transition reads 0), not at insmod",
        f"hard dependency on {profile.confirm['ipv4'].module} (it calls its exports): the module must be loaded "
        "first, so the klp object is never deferred to a later load of that module",
    )
    return Feasibility(True, f"replaces {where}", covers=families, notes=notes)


def on_target(text: str, profile: KernelProfile) -> str:
    """A strategy's description as it applies to the target: where hooks sit in one global table (3.10's
    nf_register_hooks), they are not registered per netns (and hook-swap has neither kretprobe nor barrier).
    An empty string: the line does not apply to the target."""
    if profile.features.registration != "global":
        return text
    if text in _ON_GLOBAL_LISTS:
        return _ON_GLOBAL_LISTS[text]
    return text.replace(" in every netns", " in the global hook table (one for every netns)").replace(
        "(pernet)", "(global)"
    )


def _check_hold_ref(profile: KernelProfile) -> Feasibility:
    blocked = _base_check(profile, ("register_ftrace_function", "ftrace_set_filter_ip", "unregister_ftrace_function"))
    if blocked:
        return blocked
    cfg = profile.config
    if cfg.known and not cfg.ftrace_with_regs:
        return Feasibility(False, "CONFIG_DYNAMIC_FTRACE_WITH_REGS is not set: the ftrace callback cannot read the skb")
    families = tuple(f for f in ("ipv4", "ipv6") if f in profile.confirm)
    return Feasibility(
        True,
        "holds the entry of every __nf_conntrack_confirm() call (exported) for one RCU grace period",
        covers=families,
        notes=(
            "every caller of the unfixed inline is covered, not only the netfilter hooks: bridge conntrack, "
            "openvswitch, tc act_ct, IPVS",
        ),
    )


HOOK_SWAP_TOUCHES = (
    "writes (cmpxchg) the .hook of conntrack's registered hook entries in every netns; 4.16+: a kretprobe "
    "on nf_hook_entries_grow swaps each new table before it is published"
)
HOOK_SWAP_NEEDS = "the confirm functions' addresses to recognise the entries; CONFIG_KRETPROBES for new registrations"
HOOK_SWAP_UNDO = (
    "stops the kretprobe and rescans, writes the original pointers back, then takes nf_hook_mutex "
    "(registers and unregisters a no-op hook) so a registration that copied our pointer publishes, and "
    "repeats until a pass after that barrier finds none; synchronize_net()"
)
HOOK_SWAP_WINDOW_RISK = (
    "4.16+: a conntrack hook registered while loaded (a new container's first conntrack rule, or conntrack's "
    "hooks registered again on demand after its last user let go) is swapped before publication: window 0; "
    "measured in the lab (Debian 6.1 under qemu, `nqgen.lab.hookswap` window scenario: 8 fresh namespaces per "
    "family, each enabling conntrack twice): already swapped when nf_ct_netns_get() returned in 32 of 32 "
    "(IPv4 and IPv6, new and re-registered), where the rescan-only module left each new confirm "
    "slot on the original for 831-1015 ms (mean 911 ms, default interval_ms=1000). Without kretprobes "
    "(or on a missed one) the rescan takes about interval_ms: 983-1021 ms in 32 of 32 with every kprobe "
    "disarmed (the rescan queued when a namespace is created runs before conntrack registers there); RHEL 7 "
    "(global lists) has no kretprobe path: an nf_conntrack_ipv6 loaded later runs the original until the rescan"
)
HOOK_SWAP_BARRIER_RISK = "the unload barrier flushes the NFQUEUE instances of init_net (any hook unregistration does)"
# What those say on a kernel with one global hook table (3.10's nf_hooks[pf][hooknum] lists of the registered
# nf_hook_ops, nf_register_hooks): no per-netns tables, no kretprobe, no nf_hook_mutex barrier. "" drops a line.
_ON_GLOBAL_LISTS = {
    HOOK_SWAP_TOUCHES: (
        "writes (cmpxchg) ops->hook of conntrack's registered confirm nf_hook_ops in the global hook table "
        "(the nf_hooks[pf][hooknum] lists, one for every netns); a delayed work rescans the lists every interval_ms"
    ),
    HOOK_SWAP_NEEDS: "the confirm functions' addresses to recognise the registered ops; the exported nf_hooks lists",
    HOOK_SWAP_UNDO: (
        "writes the original pointers back into every ops holding ours, synchronize_net(), and re-checks the lists "
        "until none remains (registration links the ops and never copies ->hook)"
    ),
    HOOK_SWAP_WINDOW_RISK: (
        "global lists: conntrack registers its confirm ops once per family, at module load, for every netns; an "
        "ops registered while loaded (nf_conntrack_ipv6 loaded later) runs the original until the next rescan "
        "(up to interval_ms: nothing reacts to the registration itself on this kernel)"
    ),
    HOOK_SWAP_BARRIER_RISK: "",
}


NAT_RISK = (
    "confirming at NF_IP_PRI_FIRST precedes SNAT/MASQUERADE (100) and helpers (300): entries the NAT hooks have "
    "seen (a NAT binding or extension: a nat table or chain is active in the netns) are queued unconfirmed "
    "instead (counter nat_unconfirmed), so they are not protected; what early confirmation would do to NAT on "
    "this kernel is stated below"
)
IPMODIFY_RISK = (
    "ftrace and livepatch both need exclusive IPMODIFY on the function: they cannot patch it at once "
    "(nor can a kpatch already there); the second gets -EBUSY"
)

STRATEGIES: tuple[Strategy, ...] = (
    Strategy(
        name="advance-confirm",
        summary="POST_ROUTING hook at NF_IP_PRI_FIRST: for UDP, call the kernel's own confirm function, then NFQUEUE",
        touches="adds a netfilter hook in every netns; queues UDP to NFQUEUE",
        needs="the address of ipv4_confirm/ipv6_confirm (anchor+offset or kallsyms); NFQUEUE",
        undo="unregisters its hooks (pernet) and waits for packets in flight (packets held in NFQUEUE: see its notes)",
        risks=(
            "still calls the unfixed confirm: racing CPUs still resolve clashes in the buggy inline (measured)",
            NAT_RISK,
            "does not narrow anything for IPVS, openvswitch, act_ct or bridge callers of the inline",
        ),
        check=_check_advance,
    ),
    Strategy(
        name="advance-confirm-corrected",
        summary="advance-confirm calling nqgen's corrected confirm: no private symbol at all",
        touches="adds a netfilter hook in every netns; queues UDP to NFQUEUE",
        needs="exported __nf_conntrack_confirm, nf_ct_deliver_cached_events and nf_ct_seq_adjust; NFQUEUE",
        undo="unregisters its hooks (pernet) and waits for packets in flight (packets held in NFQUEUE: see its notes)",
        risks=(
            NAT_RISK,
            "entries with a helper or sequence adjustment are left to the kernel's confirm (still vulnerable)",
            "only queued UDP is covered; other traffic still uses the unfixed confirm",
        ),
        check=_check_advance_corrected,
    ),
    Strategy(
        name="ftrace",
        summary="redirect ipv4_confirm/ipv6_confirm (on G2 also nf_confirm) to a corrected copy through ftrace",
        touches="an ftrace_ops with IPMODIFY on the confirm functions",
        needs="CONFIG_DYNAMIC_FTRACE_WITH_REGS; register_ftrace_function, ftrace_set_filter_ip; the addresses",
        undo="unregister_ftrace_function, remove the filters; the original functions run again",
        risks=(IPMODIFY_RISK, "the corrected copy re-implements the kernel's confirm: it must match that kernel"),
        check=_check_ftrace,
    ),
    Strategy(
        name="hook-swap",
        summary="replace the hook function pointer registered for ipv4_confirm/ipv6_confirm, restore it on unload",
        touches=HOOK_SWAP_TOUCHES,
        needs=HOOK_SWAP_NEEDS,
        undo=HOOK_SWAP_UNDO,
        risks=(
            HOOK_SWAP_WINDOW_RISK,
            HOOK_SWAP_BARRIER_RISK,
            "CFI kernels call through jump-table addresses no slot matches: it then swaps nothing, warns and counts "
            "`unmatched`",
        ),
        check=_check_hook_swap,
    ),
    Strategy(
        name="stop-hook",
        summary="corrected confirm registered at NF_IP_PRI_CONNTRACK_CONFIRM - 1",
        touches="adds netfilter hooks just before conntrack's confirm in every netns",
        needs="nf_register_net_hooks (or nf_register_hooks), exported confirm pieces",
        undo="unregisters its hooks and waits for packets in flight",
        risks=(
            "where NF_STOP is not honoured the original confirm still runs after ours (on a confirmed entry)",
            "where NF_STOP is not honoured and the confirm itself runs helpers (G2, G3), entries with helpers or "
            "sequence adjustment are left to the original",
        ),
        check=_check_stop_hook,
    ),
    Strategy(
        name="livepatch",
        summary="replace the confirm functions (on G2 also nf_confirm) through the kernel's livepatch API",
        touches="a livepatch on the confirm functions (ftrace IPMODIFY underneath)",
        needs="CONFIG_LIVEPATCH, klp_enable_patch, traceable functions",
        undo="disable through /sys/kernel/livepatch/<module>/enabled, wait for the transition, then rmmod",
        risks=(
            IPMODIFY_RISK,
            "rmmod without disabling first is refused; the patch stays active until disabled",
            "disabling while the enable transition is still pending reverses it mid-way: wait for transition 0 first",
        ),
        check=_check_livepatch,
    ),
    Strategy(
        name="hold-ref",
        summary="keep the entry of every __nf_conntrack_confirm() call alive for one RCU grace period",
        touches="an ftrace_ops without IPMODIFY on the exported __nf_conntrack_confirm (no code replaced)",
        needs="CONFIG_DYNAMIC_FTRACE_WITH_REGS; register_ftrace_function, ftrace_set_filter_ip; no private symbol",
        undo="unregister_ftrace_function, remove the filter, rcu_barrier() until every held reference is dropped",
        risks=(
            "a GFP_ATOMIC allocation per new connection: when it fails that call is unprotected (counted)",
            "relies on every caller of the inline confirm using the entry inside an RCU read-side section "
            "(true of the netfilter hooks, NFQUEUE reinjection, bridge, openvswitch, act_ct and IPVS)",
        ),
        check=_check_hold_ref,
    ),
)

NAMES: tuple[str, ...] = tuple(s.name for s in STRATEGIES)
DEFAULT = "advance-confirm"


def by_name(name: str) -> Strategy:
    for s in STRATEGIES:
        if s.name == name:
            return s
    raise KeyError(name)
