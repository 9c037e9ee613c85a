"""The kernel modules the node's ruleset needs, and the in-tree ones a kernel's config left out.

Roots are named, never their dependencies: those come from ``modules.dep`` (:mod:`nqgen.lab.modtree`).
A root that is neither a module of the tree nor built in is built from the kernel's own source in the
build tree (``kdir``) as an out-of-tree module -- the vulnerable reference kernel's config
(``repro/config.fragment``) has no veth, no IPv6 NAT, no raw table, no CT target and no TFTP helper. The
source is the kernel's own file, compiled with the kernel's own flags (KASAN included); a kernel whose
build tree holds only headers cannot do that and the scenario says which module is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ....errors import BuildError, InputError
from ...build import _first_error
from ...modtree import ModuleTree, modinfo_depends

# Loaded in this order after their dependencies; every one is needed by the ruleset or the topology. A root is a
# module name or an alias of one: MASQUERADE is ipt_/ip6t_MASQUERADE on 3.10 and xt_MASQUERADE (aliased) on 6.1.
NODE_ROOTS = (
    "nf_conntrack", "nf_conntrack_netlink", "nfnetlink_queue", "nf_nat", "veth",
    "ip_tables", "iptable_filter", "iptable_nat", "iptable_raw",
    "ip6_tables", "ip6table_filter", "ip6table_nat", "ip6table_raw",
    "xt_tcpudp", "ipt_MASQUERADE", "ip6t_MASQUERADE", "xt_NFQUEUE", "xt_CT", "nf_conntrack_tftp", "nf_nat_tftp",
)
# 3.10 and 4.18 keep each family's conntrack in a module of its own, which nf_nat_ipv4/ipv6 need loaded (they ask for
# it through request_module, not modules.dep: without it their init fails with EPROTOTYPE): loaded right after
# nf_conntrack where the tree has them
NODE_ROOTS_IF_PRESENT = ("nf_conntrack_ipv4", "nf_conntrack_ipv6")
# the module that provides an aliased root when the kernel must build it from source
ALIAS_MODULE = {"ipt_MASQUERADE": "xt_MASQUERADE", "ip6t_MASQUERADE": "xt_MASQUERADE"}
# Where each root lives in the kernel source (single-file modules), for kernels that did not build it.
IN_TREE_SOURCE = {
    "veth": "drivers/net/veth.c",
    "ip6table_nat": "net/ipv6/netfilter/ip6table_nat.c",
    "iptable_raw": "net/ipv4/netfilter/iptable_raw.c",
    "ip6table_raw": "net/ipv6/netfilter/ip6table_raw.c",
    "iptable_nat": "net/ipv4/netfilter/iptable_nat.c",
    "xt_CT": "net/netfilter/xt_CT.c",
    "xt_MASQUERADE": "net/netfilter/xt_MASQUERADE.c",
    "xt_NFQUEUE": "net/netfilter/xt_NFQUEUE.c",
    "nf_conntrack_tftp": "net/netfilter/nf_conntrack_tftp.c",
    "nf_nat_tftp": "net/netfilter/nf_nat_tftp.c",
}


@dataclass(frozen=True)
class NodeModules:
    """What the guest loads: tree modules in dependency order, then the modules built from source."""

    extras: dict[str, Path]  # module name -> .ko built from the kernel's source (load order kept)

    @property
    def extra_names(self) -> list[str]:
        return list(self.extras)


def _provider(tree: ModuleTree, root: str) -> str | None:
    """The tree's module for a root (its name or an alias), None when missing or built in."""
    if root in tree.paths:
        return root
    for name in tree.aliases.get(root, []):
        if name in tree.paths:
            return name
    return None


def missing_roots(tree: ModuleTree) -> list[str]:
    """Modules to build: roots the tree neither ships (by name or alias) nor has built in, by module name."""
    out: list[str] = []
    for root in NODE_ROOTS:
        module = ALIAS_MODULE.get(root, root)
        present = _provider(tree, root) is not None or root in tree.builtin or module in tree.builtin
        if not present and module not in out:
            out.append(module)
    return out


def build_extras(tree: ModuleTree, kdir: Path, dest: Path, source: Path | None = None) -> NodeModules:
    """Build every missing root from the kernel's own source (``source``, default the build tree ``kdir``)
    in one external-module build against ``kdir``."""
    import subprocess

    src = source or kdir
    missing = missing_roots(tree)
    if not missing:
        return NodeModules({})
    unknown = [m for m in missing if m not in IN_TREE_SOURCE]
    absent = [m for m in missing if m in IN_TREE_SOURCE and not (src / IN_TREE_SOURCE[m]).is_file()]
    if unknown or absent:
        raise InputError(
            f"the node scenario needs module(s) {', '.join(unknown + absent)} that kernel {tree.root.name} neither "
            f"ships nor has built in, and {src} holds no source to build them from"
        )
    dest.mkdir(parents=True, exist_ok=True)
    objs = []
    for name in missing:
        (dest / f"{name}.c").write_text((src / IN_TREE_SOURCE[name]).read_text())
        objs.append(f"{name}.o")
    # sources include private headers of their own directory (xt_CT.c: "nf_internals.h")
    incdirs = sorted({str((src / IN_TREE_SOURCE[name]).parent.resolve()) for name in missing})
    (dest / "Kbuild").write_text(f"obj-m := {' '.join(objs)}\nccflags-y := {' '.join('-I' + d for d in incdirs)}\n")
    proc = subprocess.run(["make", "-C", str(kdir), f"M={dest}", "modules"], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise BuildError(f"building {', '.join(missing)} from {kdir} failed: {_first_error(proc.stdout + proc.stderr)}")
    return NodeModules({name: dest / f"{name}.ko" for name in missing})


def tree_roots(tree: ModuleTree, extras: NodeModules) -> list[str]:
    """Module names to resolve in the tree: the shipped roots plus what the built extras depend on."""
    roots: list[str] = []
    for root in NODE_ROOTS:
        if ALIAS_MODULE.get(root, root) in extras.extras:
            continue
        module = _provider(tree, root)
        if module is not None and module not in roots:
            roots.append(module)
        if root == "nf_conntrack":
            roots += [m for m in NODE_ROOTS_IF_PRESENT if m in tree.paths]
    for ko in extras.extras.values():
        roots += [d for d in modinfo_depends(ko) if d not in extras.extras]
    return roots
