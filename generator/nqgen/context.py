"""The template context: the profile facts a template may use, flattened for Jinja.

Templates see ``cookiecutter.target``; every key they may read is built here, so a template that reads
anything else fails the render (cookiecutter renders with StrictUndefined).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from . import headers
from .errors import InputError
from .profile import HOOK_NAMES, KernelProfile

_PF = {"ipv4": "NFPROTO_IPV4", "ipv6": "NFPROTO_IPV6"}


def module_name(strategy: str) -> str:
    """The kernel module name for a strategy: ``nq_`` plus the strategy with underscores."""
    return "nq_" + strategy.replace("-", "_")


def resolve_method(profile: KernelProfile) -> str:
    """How a generated module finds a non-exported confirm function: kallsyms_lookup_name where the kernel
    exports it (robust to section layout), else an exported anchor in the same section plus the delta."""
    return "kallsyms" if profile.features.kallsyms_lookup_name_exported else "anchor"


def patch_nf_confirm(profile: KernelProfile) -> bool:
    """G2: nf_confirm() is exported and not itself the hook, so callers outside the hooks (the bridge's
    conntrack) reach the unfixed confirm through it; ftrace and livepatch replace it too."""
    f = profile.features
    return (
        f.confirm_generation == "G2"
        and f.nf_confirm_exported
        and all(t.function != "nf_confirm" for t in profile.confirm.values())
    )


def optional_target(profile: KernelProfile, module: str, exported: bool, ipv4_module: str) -> bool:
    """A confirm function outside the module of the IPv4 one (RHEL 7's nf_conntrack_ipv6) is optional: the
    generated module attaches to it when its module loads (module notifier) instead of refusing to load. Only
    where it is found by kallsyms_lookup_name: an exported function or an anchor is a symbol reference, which
    makes its module a load-time dependency."""
    return module != ipv4_module and not exported and resolve_method(profile) == "kallsyms"


def kernel_read_form(profile: KernelProfile, kdir: str) -> str:
    """``kernel_read()``'s form in the target: "offset" for ``(file, offset, buf, count)`` (until 4.14, RHEL 7),
    "pos" for ``(file, buf, count, &pos)``. Read from the target's include/linux/fs.h; where the tree has no
    fs.h (the offline fixture trees), the registration API decides: global hook lists are 3.10 (RHEL 7)."""
    return _kernel_read_decl(kdir) or ("offset" if profile.features.registration == "global" else "pos")


@functools.lru_cache(maxsize=64)
def _kernel_read_decl(kdir: str) -> str | None:
    """The form fs.h declares, or None (no fs.h, or no declaration). Kept per tree for the process: every strategy
    of a kernel asks, and cleaning fs.h cost a fifth of a warm fleet target's time."""
    try:
        fs_h = headers.locate(Path(kdir)).read("include/linux/fs.h")
    except InputError:
        fs_h = None
    if fs_h:
        if re.search(r"\bkernel_read\s*\(\s*struct\s+file\s*\*\s*\w*\s*,\s*loff_t\b", fs_h):
            return "offset"
        if re.search(r"\bkernel_read\s*\(", fs_h):
            return "pos"
    return None


def template_target(profile: KernelProfile, kdir: str) -> dict[str, Any]:
    """The ``target`` dict of the cookiecutter context for one kernel profile."""
    f = profile.features
    ipv4_module = profile.confirm["ipv4"].module if "ipv4" in profile.confirm else profile.module.name
    families: list[dict[str, Any]] = []
    for fam in ("ipv4", "ipv6"):
        t = profile.confirm.get(fam)
        if t is None:
            continue
        families.append(
            {
                "family": fam,
                "pf": _PF[fam],
                "function": t.function,
                "module": t.module,
                "exported": t.exported,
                "anchor": t.anchor or "",
                "delta": str(t.delta if t.delta is not None else 0),
                "optional": optional_target(profile, t.module, t.exported, ipv4_module),
                "hooks": [
                    {"hooknum": "NF_INET_" + HOOK_NAMES.get(h.hooknum, str(h.hooknum)), "priority": str(h.priority)}
                    for h in t.hooks
                    if h.hook == t.function
                ],
            }
        )
    ipv4 = profile.confirm.get("ipv4")
    return {
        "patch_nf_confirm": patch_nf_confirm(profile),
        "release": profile.release,
        "kdir": kdir,
        "generation": f.confirm_generation,
        "hookfn_form": f.hookfn_form,
        "registration": f.registration,
        "ops_has_owner": f.ops_has_owner,
        "skb_nfct_accessor": f.skb_nfct_accessor,
        "skb_nfct_field": f.skb_nfct_field,
        "has_nf_ct_is_untracked": f.has_nf_ct_is_untracked,
        "hook_storage": f.hook_storage,
        "nf_stop_honoured": f.nf_stop_honoured,
        "ftrace_regs_form": f.ftrace_regs_form,
        "ftrace_set_ip": f.ftrace_set_ip,
        "ftrace_recursion_flag": f.ftrace_recursion_flag,
        "ftrace_permanent": f.ftrace_permanent,
        "livepatch_api": f.livepatch_api,
        "has_ecache_exist": f.has_ecache_exist,
        "confirm_has_vrf_check": f.confirm_has_vrf_check,
        "fix_present": f.fix_present,
        "kallsyms_lookup_name_exported": f.kallsyms_lookup_name_exported,
        "nf_confirm_exported": f.nf_confirm_exported,
        "nat_on_confirmed": f.nat_on_confirmed,
        "resolve": resolve_method(profile),
        "confirm_module": ipv4.module if ipv4 else profile.module.name,
        "families": families,
        # the builds the module checks (kmod/nq_target_id.c): build IDs of the module files nqgen read
        "id_checks": build_id_checks(profile, families),
        "id_kernel_read": kernel_read_form(profile, kdir),
    }


def build_id_checks(profile: KernelProfile, families: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every module the generated module attaches to, with the GNU build ID nqgen read from its file: the
    module of each confirm target (an optional one, RHEL 7's nf_conntrack_ipv6, is checked when it is loaded:
    at load if it is there, else before attaching to it) and nf_conntrack, whose exported confirm and struct
    layouts every strategy relies on. Modules without a known build ID are left out (nothing to compare)."""
    mod = profile.module
    if mod.name == "vmlinux":  # conntrack built in: the kernel's own notes
        return [{"module": "vmlinux", "build_id": mod.build_id, "optional": False, "path": "/sys/kernel/notes"}] \
            if mod.build_id else []
    ids = dict(profile.build_ids)
    if mod.build_id:
        ids.setdefault(mod.name, mod.build_id)
    optional = {f["module"]: bool(f["optional"]) for f in families}
    order = [mod.name, *(f["module"] for f in families), "nf_conntrack"]
    checks = []
    for name in dict.fromkeys(order):
        if name in ids:
            checks.append({
                "module": name,
                "build_id": ids[name],
                "optional": optional.get(name, False),
                "path": f"/sys/module/{name}/notes/.note.gnu.build-id",
            })  # fmt: skip
    return checks


def cookiecutter_context(profile: KernelProfile, strategy: str, kdir: str) -> dict[str, Any]:
    """The extra_context passed to cookiecutter for one strategy."""
    return {
        "module_name": module_name(strategy),
        "strategy": strategy,
        "target": template_target(profile, kdir),
    }
