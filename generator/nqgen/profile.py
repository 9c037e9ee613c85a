"""The kernel profile: everything nqgen learned about the target kernel, as plain dataclasses.

The profile is the only thing strategies and templates look at. It is built by
``nqgen.build_profile`` from the symbol sources (``nqgen.elfread``, ``nqgen.symsources``) and
the target's headers (``nqgen.headers``), and dumped as JSON by ``nqgen --profile-only``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

HookFnForm = Literal["okfn", "ops_state", "priv_state"]
Registration = Literal["global", "pernet"]
HookStorage = Literal["list", "entries", "pf_entries"]  # pf_entries: net->nf.hooks[pf][hooknum], 4.9-4.15
FtraceRegsForm = Literal["pt_regs", "ftrace_regs"]
FtraceSetIp = Literal["regs_ip", "ftrace_instruction_pointer_set", "ftrace_regs_set_instruction_pointer"]
FtraceRecursion = Literal["RECURSION_SAFE", "RECURSION"]
LivepatchApi = Literal["register_enable", "enable", "none"]
ConfirmGeneration = Literal["G1", "G2", "G3"]
# What nf_nat_setup_info() does to an entry confirmed before the NAT hook saw it: "rewrites_reply" (3.10: no
# confirmed check, only nf_ct_nat_ext_add(), which returns an existing NAT extension of a confirmed entry, so the
# reply tuple of a hashed entry is altered) or "skipped" (4.9+: "Can't setup nat info for confirmed ct").
NatOnConfirmed = Literal["rewrites_reply", "skipped"]

# Netfilter constants that never changed (include/uapi/linux/netfilter.h, netfilter_ipv4.h).
NFPROTO_NAMES = {2: "ipv4", 10: "ipv6"}
HOOK_NAMES = {0: "PRE_ROUTING", 1: "LOCAL_IN", 2: "FORWARD", 3: "LOCAL_OUT", 4: "POST_ROUTING"}


@dataclass(frozen=True)
class Symbol:
    """One symbol of an ELF symbol table (or of a text symbol list, where section is unknown)."""

    name: str
    section: str  # section name in the module ("" when only an address is known)
    value: int  # offset within its section for a relocatable .ko; address for vmlinux/System.map
    size: int
    binding: str  # "LOCAL", "GLOBAL", "WEAK"
    kind: str  # "FUNC", "OBJECT", "NOTYPE"


@dataclass(frozen=True)
class HookEntry:
    """One ``struct nf_hook_ops`` element of an ops array, decoded from data plus relocations."""

    index: int
    hook: str  # name of the function the .hook field points to
    pf: int  # NFPROTO_*
    hooknum: int  # NF_INET_*
    priority: int

    @property
    def family(self) -> str:
        return NFPROTO_NAMES.get(self.pf, str(self.pf))

    @property
    def hook_name(self) -> str:
        return HOOK_NAMES.get(self.hooknum, str(self.hooknum))


@dataclass(frozen=True)
class ConfirmTarget:
    """The function that confirms conntrack entries for one family, and how to reach it."""

    family: str  # "ipv4" or "ipv6"
    function: str  # "ipv4_confirm", "ipv6_confirm" or (6.2+) "nf_confirm"
    module: str  # module that holds it: "nf_conntrack", "nf_conntrack_ipv4", "nf_conntrack_ipv6"
    section: str
    offset: int  # offset within section
    size: int
    exported: bool
    traceable: bool  # has an __mcount_loc / __patchable_function_entries record (ftrace can attach)
    anchor: str | None = None  # exported function in the same section
    anchor_offset: int | None = None
    ops_array: str | None = None  # "ipv4_conntrack_ops"
    hooks: tuple[HookEntry, ...] = ()

    @property
    def delta(self) -> int | None:
        """Address of the function minus address of the anchor, valid at run time in the same section."""
        if self.anchor_offset is None:
            return None
        return self.offset - self.anchor_offset


@dataclass(frozen=True)
class ModuleInfo:
    """Facts about the module file that holds the confirm function."""

    path: str
    name: str
    vermagic: str
    srcversion: str | None
    build_id: str | None
    depends: tuple[str, ...]
    compression: str | None  # None, "xz", "zst", "gz"


@dataclass(frozen=True)
class ConfigFlags:
    """Kernel configuration options relevant to the strategies (from .config)."""

    ftrace_with_regs: bool
    ftrace_with_args: bool
    kprobes: bool
    livepatch: bool
    ct_events: bool
    ct_procfs: bool
    modules: bool
    module_sig_force: bool
    x86_ibt: bool
    cfi_clang: bool
    kasan: bool
    known: bool  # False when no .config was given: every flag is then a guess and says so


@dataclass(frozen=True)
class KernelFeatures:
    """API generation facts, each decided from the target's headers and symbols (not a version number)."""

    hookfn_form: HookFnForm
    registration: Registration
    ops_has_owner: bool
    skb_nfct_accessor: bool  # skb_nfct() exists
    skb_nfct_field: str  # "nfct" (<= 4.10, RHEL 7) or "_nfct"
    has_nf_ct_is_untracked: bool
    hook_storage: HookStorage
    nf_stop_honoured: bool
    ftrace_regs_form: FtraceRegsForm
    ftrace_set_ip: FtraceSetIp
    ftrace_recursion_flag: FtraceRecursion
    ftrace_permanent: bool  # FTRACE_OPS_FL_PERMANENT exists: kernel.ftrace_enabled=0 is refused while the ops lives
    livepatch_api: LivepatchApi
    has_ecache_exist: bool  # nf_ct_ecache_exist()
    confirm_generation: ConfirmGeneration
    confirm_has_vrf_check: bool  # ipv4_confirm skips l3mdev masters at POST_ROUTING (5.16+, 8e0538d8ee06)
    fix_present: bool  # the inline nf_conntrack_confirm re-reads ct after __nf_conntrack_confirm
    kallsyms_lookup_name_exported: bool
    nf_confirm_exported: bool
    nat_on_confirmed: NatOnConfirmed  # struct nf_conn has nat_bysource (4.9+) or not (3.10)
    evidence: tuple[str, ...] = ()  # one line per decision: where it came from


@dataclass(frozen=True)
class ConfirmCodeFacts:
    """What the conntrack module's own code shows, for the decisions one header declaration cannot carry."""

    where: str  # "nf_conntrack.ko ipv4_confirm()": the module and function the facts come from
    helper_hooks: tuple[str, ...] | None  # hooks at NF_IP_PRI_CONNTRACK_HELPER in the ops array; None: no array
    vrf_symbol: bool  # the module defines in_vrf_postrouting()
    l3mdev_bits: tuple[frozenset[int], ...]  # per single-bit test after state->hook == POST_ROUTING: its bits


@dataclass(frozen=True)
class KernelProfile:
    """Everything the strategies need to know about one target kernel."""

    release: str  # e.g. "6.1.0-56-amd64" (from vermagic, or the headers)
    version: tuple[int, int, int]  # from the release string; informative only, never used to decide
    kdir: str | None  # headers/build tree used for compiling
    module: ModuleInfo
    confirm: dict[str, ConfirmTarget]  # family -> target; "ipv6" may be missing
    exports: frozenset[str]  # every symbol exported by the target (Module.symvers + module __ksymtab)
    config: ConfigFlags
    features: KernelFeatures
    sources: dict[str, str] = field(default_factory=dict)  # kind -> path of every input used
    warnings: tuple[str, ...] = ()
    # module name -> GNU build ID (hex) of every conntrack module file read (RHEL 7: nf_conntrack,
    # nf_conntrack_ipv4, nf_conntrack_ipv6): the builds the generated module checks at load and at attach
    build_ids: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(profile_to_dict(self), indent=2, sort_keys=True)


def profile_to_dict(profile: KernelProfile) -> dict[str, Any]:
    """A JSON-ready dict; the export list is summarised (it has thousands of names)."""
    data = dataclasses.asdict(profile)
    data["exports"] = {"count": len(profile.exports)}
    data["version"] = list(profile.version)
    for fam, target in profile.confirm.items():
        data["confirm"][fam]["delta"] = target.delta
        data["confirm"][fam]["hooks"] = [
            {**dataclasses.asdict(h), "family": h.family, "hook_name": h.hook_name} for h in target.hooks
        ]
    return data
