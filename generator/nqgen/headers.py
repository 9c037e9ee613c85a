"""Kernel API generation facts, read from the target's own headers and combined with its symbols.

Each feature is decided by a precise parse of one declaration (comments stripped, the
``__GENKSYMS__`` branches of RHEL 7 resolved to the real one), never from a version number; the
few things headers cannot show (NF_STOP in ``nf_hook_slow``, the VRF check in ``ipv4_confirm``)
come from the conntrack module's code where given (the VRF test, disassembled), else the kernel
source when the tree has it, else from the hook storage generation or the release, and their
evidence line says so. The confirm generation from the headers must agree with the module's ops
array (G1 exactly when it has a helper hook at NF_IP_PRI_CONNTRACK_HELPER), else nqgen refuses.

Debian splits its headers: ``/lib/modules/<rel>/build`` holds ``.config``, ``Module.symvers`` and
generated files, and its ``Makefile`` includes the common tree that holds ``include/``; both are
searched. Results of the header scan are cached per tree in ``$XDG_CACHE_HOME/nqgen/``
(``NQGEN_NO_CACHE=1`` bypasses the cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nqgen import errors
from nqgen.profile import (
    ConfigFlags,
    ConfirmCodeFacts,
    ConfirmGeneration,
    FtraceRecursion,
    FtraceRegsForm,
    FtraceSetIp,
    HookFnForm,
    HookStorage,
    KernelFeatures,
    LivepatchApi,
    NatOnConfirmed,
    Registration,
)

CACHE_VERSION = 4

NETFILTER_H = "include/linux/netfilter.h"
SKBUFF_H = "include/linux/skbuff.h"
FTRACE_H = "include/linux/ftrace.h"
LIVEPATCH_H = "include/linux/livepatch.h"
CT_CORE_H = "include/net/netfilter/nf_conntrack_core.h"
CT_H = "include/net/netfilter/nf_conntrack.h"
CT_ECACHE_H = "include/net/netfilter/nf_conntrack_ecache.h"
NETNS_NF_H = "include/net/netns/netfilter.h"  # struct netns_nf: hooks_ipv4[] since 4.16
HOOKS_PER_FAMILY_SINCE = (4, 16, 0)  # before: net->nf.hooks[NFPROTO_NUMPROTO][NF_MAX_HOOKS]
NETDEVICE_H = "include/linux/netdevice.h"  # IFF_L3MDEV_MASTER, to read the VRF test in the module's code
NF_CORE_C = "net/netfilter/core.c"  # only in full source trees
CT_PROTO_C = "net/netfilter/nf_conntrack_proto.c"  # only in full source trees
CT_L3IPV4_C = "net/ipv4/netfilter/nf_conntrack_l3proto_ipv4.c"  # only in full source trees
MAKEFILE = "Makefile"
DOT_CONFIG = ".config"  # the headers tree's own configuration (CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS)
NF_IP_PRI_CONNTRACK_HELPER = 300  # include/uapi/linux/netfilter_ipv4.h, never changed
VRF_SINCE = (5, 16, 0)  # 8e0538d8ee06 "netfilter: conntrack: skip confirmation and nat hooks in postrouting for vrf"

# Searched in every root, in this order; the arch header is added per architecture.
HEADER_FILES = (
    NETFILTER_H,
    SKBUFF_H,
    FTRACE_H,
    LIVEPATCH_H,
    CT_CORE_H,
    CT_H,
    CT_ECACHE_H,
    NETNS_NF_H,
    NETDEVICE_H,
    NF_CORE_C,
    CT_PROTO_C,
    CT_L3IPV4_C,
    MAKEFILE,
    DOT_CONFIG,
)


# --------------------------------------------------------------------------------------------------
# C text helpers


_COMMENT_OR_LITERAL = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S)
_DIRECTIVE = re.compile(r"^\s*#\s*(ifdef|ifndef|if|elif|else|endif)\b(.*)$")
_GENKSYMS_IF = re.compile(r"^\s*(!?)\s*defined\s*\(?\s*__GENKSYMS__\s*\)?\s*$")


def strip_comments(text: str) -> str:
    """Remove C comments (keeping line structure) and join backslash-continued lines."""

    def repl(match: re.Match[str]) -> str:
        token = match.group(0)
        if token.startswith("//"):
            return ""
        if token.startswith("/*"):
            return " " + "\n" * token.count("\n")
        return token

    return _COMMENT_OR_LITERAL.sub(repl, text).replace("\\\n", " ")


def resolve_genksyms(text: str) -> str:
    """Keep only the real (non-``__GENKSYMS__``) branch of every conditional on ``__GENKSYMS__``.

    RHEL 7 writes new declarations as ``#ifndef __GENKSYMS__ <new> #else <old, for the kABI
    checksum> #endif``; the compiler sees the first branch. Other conditionals are left as they are.
    """
    out: list[str] = []
    # Stack entries: None for an ordinary conditional, else True/False = "this branch is kept".
    stack: list[bool | None] = []
    for line in text.split("\n"):
        m = _DIRECTIVE.match(line)
        if m:
            kind, arg = m.group(1), m.group(2).strip()
            if kind in ("ifdef", "ifndef", "if"):
                keep: bool | None = None
                if kind in ("ifdef", "ifndef") and arg == "__GENKSYMS__":
                    keep = kind == "ifndef"
                elif kind == "if":
                    gm = _GENKSYMS_IF.match(arg)
                    if gm:
                        keep = gm.group(1) == "!"
                stack.append(keep)
                if keep is not None:
                    continue
            elif kind in ("else", "elif") and stack and stack[-1] is not None:
                stack[-1] = not stack[-1]
                continue
            elif kind == "endif" and stack and stack.pop() is not None:
                continue
        if all(frame is not False for frame in stack):
            out.append(line)
    return "\n".join(out)


def clean_source(text: str) -> str:
    return resolve_genksyms(strip_comments(text))


def balanced(text: str, open_index: int) -> str | None:
    """The text between the bracket at ``open_index`` and its matching close bracket."""
    opener = text[open_index]
    closer = {"(": ")", "{": "}", "[": "]"}[opener]
    depth = 0
    for i in range(open_index, len(text)):
        c = text[i]
        if c == opener:
            depth += 1
        elif c == closer:
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
    return None


def split_params(params: str) -> list[str]:
    """Split a parameter list at top-level commas, normalising whitespace."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for c in params:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return [" ".join(p.split()) for p in parts if p.strip()]


def find_params(text: str, pattern: str) -> list[str] | None:
    """Parameters of the first declaration whose name part matches ``pattern`` followed by ``(``."""
    m = re.search(pattern + r"\s*\(", text)
    if not m:
        return None
    body = balanced(text, m.end() - 1)
    return None if body is None else split_params(body)


def find_body(text: str, pattern: str) -> str | None:
    """Body of the first struct or function whose head matches ``pattern`` followed by ``{``."""
    m = re.search(pattern + r"\s*\{", text)
    if not m:
        return None
    return balanced(text, m.end() - 1)


def function_body(text: str, head: str) -> str | None:
    """Body of the first function definition whose head (up to the name) matches ``head``.

    The parameter list is matched with balanced parentheses, so parameters that are function
    pointers (``int (*okfn)(struct sk_buff *)``) do not end it early; prototypes are skipped.
    """
    for m in re.finditer(head + r"\s*\(", text):
        params_end = m.end() - 1
        params = balanced(text, params_end)
        if params is None:
            return None
        after = params_end + len(params) + 2
        brace = re.match(r"\s*\{", text[after:])
        if brace:
            return balanced(text, after + brace.end() - 1)
    return None


def compact(params: list[str]) -> str:
    return ", ".join(params)


# --------------------------------------------------------------------------------------------------
# Locating the headers


# The largest file read here (net/netfilter/nf_conntrack_core.c, netdevice.h, a distribution .config) is well under
# 1 MiB; a larger one is refused before it is read, so a hostile tree (a sparse 100 GiB "netfilter.h") costs nothing.
MAX_SOURCE = 16 * 1024 * 1024


def read_source(path: Path) -> str:
    """A header, C source, Makefile or .config of the tree as text (undecodable bytes replaced), at most MAX_SOURCE."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size  # refused before a byte is read; 0: a pseudo file
            data = b"" if size > MAX_SOURCE else fh.read((size or MAX_SOURCE) + 1)
    except OSError as exc:
        raise errors.InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size > MAX_SOURCE or len(data) > MAX_SOURCE:
        raise errors.InputError(f"{path}: larger than {MAX_SOURCE >> 20} MiB: not a kernel source file")
    return data.decode("utf-8", "replace")


@dataclass(frozen=True)
class HeaderTree:
    """A headers/build tree: ``kdir`` plus the source trees it points to (Debian's ``-common``)."""

    kdir: Path
    roots: tuple[Path, ...]  # kdir first, then source trees found through Makefile / source link
    arch: str  # "x86", "arm64", ...

    def find(self, rel: str) -> Path | None:
        for root in self.roots:
            path = root / rel
            if path.is_file():
                return path
        return None

    def read(self, rel: str) -> str | None:
        path = self.find(rel)
        if path is None:
            return None
        return clean_source(read_source(path))

    def relpath(self, rel: str) -> str:
        """``rel`` as found, for evidence lines (the root is named when it is not kdir)."""
        path = self.find(rel)
        if path is None or path.parent == self.kdir or self.roots[0] in path.parents:
            return rel
        return str(path)

    def files(self) -> list[str]:
        return [*HEADER_FILES, self.arch_ftrace_h]

    @property
    def arch_ftrace_h(self) -> str:
        return f"arch/{self.arch}/include/asm/ftrace.h"


_MAKEFILE_INCLUDE = re.compile(r"^\s*-?include\s+(\S+)/Makefile\s*$", re.M)
_ARCH_BY_CONFIG = (
    ("CONFIG_X86", "x86"),
    ("CONFIG_ARM64", "arm64"),
    ("CONFIG_S390", "s390"),
    ("CONFIG_PPC", "powerpc"),
    ("CONFIG_RISCV", "riscv"),
)


def _source_roots(kdir: Path) -> list[Path]:
    roots = [kdir]
    candidates: list[Path] = []
    makefile = kdir / MAKEFILE
    if makefile.is_file():
        text = read_source(makefile)
        if not re.search(r"^VERSION\s*=", text, re.M):
            candidates += [Path(m.group(1)) for m in _MAKEFILE_INCLUDE.finditer(text)]
    candidates += [kdir / "source", kdir.parent / "source"]
    for cand in candidates:
        if not cand.is_absolute():
            cand = kdir / cand
        if cand.is_dir() and all(cand.resolve() != r.resolve() for r in roots):
            roots.append(cand)
    return roots


def _arch(kdir: Path) -> str:
    config = kdir / ".config"
    text = read_source(config) if config.is_file() else ""
    for option, arch in _ARCH_BY_CONFIG:
        if re.search(rf"^{option}=y$", text, re.M):
            return arch
    return "x86"


def locate(kdir: Path) -> HeaderTree:
    """Find the tree holding ``include/linux/netfilter.h`` for ``kdir``; InputError when there is none."""
    if not kdir.exists():
        raise errors.InputError(f"headers directory {kdir} does not exist")
    if not kdir.is_dir():
        raise errors.InputError(f"headers directory {kdir} is not a directory")
    tree = HeaderTree(kdir=kdir, roots=tuple(_source_roots(kdir)), arch=_arch(kdir))
    if tree.find(NETFILTER_H) is None:
        raise errors.InputError(f"no {NETFILTER_H} in headers directory {kdir} (nor in its source tree)")
    return tree


# --------------------------------------------------------------------------------------------------
# What the headers say (cached per tree)


@dataclass(frozen=True)
class HeaderFacts:
    """Raw facts parsed from one headers tree, each with the evidence line that justifies it."""

    hookfn_form: str
    hookfn_evidence: str
    has_register_hook: bool  # global nf_register_hook() declared
    has_register_net_hook: bool
    ops_has_owner: bool
    skb_nfct_accessor: bool
    skb_nfct_field: str
    has_nf_ct_is_untracked: bool
    has_hook_entries: bool  # struct nf_hook_entries
    has_hook_entry_list: bool  # struct nf_hook_entry (4.9-4.13 singly linked copies)
    nf_stop_in_hook_slow: bool | None  # None: net/netfilter/core.c not in the tree
    ftrace_regs_form: str
    ftrace_func_evidence: str
    set_ip_defs: dict[str, str]  # setter name -> "arch", "generic" or "noop" (where and how it is defined)
    recursion_flag: str | None
    has_ops_permanent: bool  # enum defines FTRACE_OPS_FL_PERMANENT
    livepatch_header: bool
    has_klp_register: bool
    has_klp_enable: bool
    has_ecache_exist: bool
    nf_confirm_params: str | None  # None: not declared
    confirm_inline_found: bool
    fix_present: bool
    fix_evidence: str
    nat_bysource_in_conn: bool  # struct nf_conn has nat_bysource (NAT's by-source node left the extension)
    vrf_in_source: bool | None  # None: confirm source not in the tree
    vrf_source: str
    l3mdev_bit: int | None  # IFF_L3MDEV_MASTER = 1 << bit in netdevice.h; None: not in the tree
    have_ftrace_with_args: bool | None  # CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS in the tree's .config; None: no .config
    version: tuple[int, int, int] | None  # from the top Makefile
    files: tuple[str, ...]  # relative paths actually read
    netns_hooks_ipv4: bool | None = None  # struct netns_nf has hooks_ipv4[]; None: header not in the tree


def _short(text: str, limit: int = 160) -> str:
    """Header text quoted in a message: a damaged header can make a 'parameter list' of kilobytes."""
    return text if len(text) <= limit else text[:limit] + "..."


def _hookfn(text: str) -> tuple[str, str]:
    params = find_params(text, r"typedef\s+unsigned\s+int\s+nf_hookfn")
    if params is None:
        raise errors.InputError(f"no nf_hookfn typedef in {NETFILTER_H}")
    first, last = params[0], params[-1]
    if "okfn" in last and "nf_hook_ops" in first:
        form = "okfn"
    elif "okfn" in last:
        # upstream 3.10-3.12: (unsigned int hooknum, skb, in, out, okfn); nqgen's okfn hooks take the ops
        raise errors.NotApplicableError(
            f"{NETFILTER_H}: typedef nf_hookfn({_short(compact(params))}) starts with '{_short(compact([first]))}', "
            "not 'const struct nf_hook_ops *ops' (upstream 3.10-3.12 form): nqgen emits no hook of that form"
        )
    elif "nf_hook_state" in last and first.startswith("void"):
        form = "priv_state"
    elif "nf_hook_state" in last and "nf_hook_ops" in first:
        form = "ops_state"
    else:
        raise errors.InputError(f"unrecognised nf_hookfn typedef in {NETFILTER_H}: ({_short(compact(params))})")
    return form, f"typedef nf_hookfn({compact(params)})"


def _skb_field(text: str) -> str:
    body = find_body(text, r"\bstruct\s+sk_buff") or ""
    m = re.search(r"\b(_nfct|nfct)\s*;", body)
    if m:
        return m.group(1)
    raise errors.InputError(f"no nfct field in struct sk_buff of {SKBUFF_H}")


def _fix(core: str) -> tuple[bool, bool, str]:
    """(inline found, fix present, evidence) from the inline nf_conntrack_confirm()."""
    body = function_body(core, r"\bint\s+nf_conntrack_confirm")
    if body is None:
        return False, False, f"no inline nf_conntrack_confirm() in {CT_CORE_H}"
    call = re.search(r"__nf_conntrack_confirm\s*\(", body)
    if call is None:
        return True, False, f"inline nf_conntrack_confirm() in {CT_CORE_H} does not call __nf_conntrack_confirm"
    after = body[call.end() :]
    refetch = re.search(
        r"\bct\s*=\s*(?:\([^)]*\)\s*)?(?:skb_nfct\s*\(\s*\w+\s*\)|\w+\s*->\s*_?nfct\b|nf_ct_get\s*\()", after
    )
    if refetch:
        stmt = " ".join(refetch.group(0).split())
        return True, True, f"inline nf_conntrack_confirm() re-reads '{stmt}' after __nf_conntrack_confirm()"
    return True, False, "inline nf_conntrack_confirm() keeps its ct after __nf_conntrack_confirm() (no re-read)"


def _version(makefile: str | None) -> tuple[int, int, int] | None:
    if makefile is None:
        return None
    parts = []
    for key in ("VERSION", "PATCHLEVEL", "SUBLEVEL"):
        m = re.search(rf"^{key}\s*=\s*(\d+)", makefile, re.M)
        if not m:
            return None
        parts.append(int(m.group(1)))
    return parts[0], parts[1], parts[2]


def _tree_version(tree: HeaderTree) -> tuple[int, int, int] | None:
    """Upstream base version from the first top Makefile that sets VERSION (Debian's build dir only includes)."""
    for root in tree.roots:
        path = root / MAKEFILE
        if path.is_file():
            version = _version(read_source(path))
            if version is not None:
                return version
    return None


# newest first (6.2 renamed ftrace_instruction_pointer_set)
SET_IP_NAMES: tuple[FtraceSetIp, ...] = ("ftrace_regs_set_instruction_pointer", "ftrace_instruction_pointer_set")
_NOOP = re.compile(r"do\s*\{\s*\}\s*while\s*\(\s*0\s*\)")


def _setter_def(name: str, generic: str, arch: str) -> str | None:
    """How ``name`` is defined: "arch" (by the arch header), "generic" (a real generic one), "noop" (only
    the do-nothing fallback linux/ftrace.h keeps for arches without DYNAMIC_FTRACE_WITH_ARGS), or None."""
    macro = rf"#\s*define\s+{name}\s*\([^)]*\)\s*(.*)"
    function = rf"\b{name}\s*\(\s*struct\s+ftrace_regs\s*\*\s*\w+\s*,[^)]*\)\s*\{{"
    if re.search(macro, arch) or re.search(function, arch):
        return "arch"
    bodies = [m.group(1).strip() for m in re.finditer(macro, generic)]
    if any(not _NOOP.fullmatch(b) for b in bodies) or re.search(function, generic):
        return "generic"
    return "noop" if bodies else None


def _config_option(tree: HeaderTree, option: str) -> bool | None:
    """Whether ``option`` is =y/=m in the tree's own .config (None when the tree has none)."""
    path = tree.kdir / DOT_CONFIG
    if not path.is_file():
        return None
    text = read_source(path)
    return re.search(rf"^{option}=[ym]$", text, re.M) is not None


def _vrf(tree: HeaderTree) -> tuple[bool | None, str]:
    for rel in (CT_PROTO_C, CT_L3IPV4_C):
        text = tree.read(rel)
        if text is None:
            continue
        for name in ("ipv4_confirm", "nf_confirm"):
            body = function_body(text, rf"\bunsigned\s+int\s+{name}")
            if body is not None:
                vrf = bool(re.search(r"\b(netif_is_l3_master|in_vrf_postrouting)\s*\(", body))
                return vrf, f"{rel} {name}()"
    return None, ""


_L3MDEV = re.compile(r"\bIFF_L3MDEV_MASTER\s*=\s*(?:1U?L*\s*<<\s*(\d+)|BIT(?:_ULL)?\s*\(\s*(\d+)\s*\))")


def _l3mdev_bit(netdevice: str | None) -> int | None:
    m = _L3MDEV.search(netdevice or "")
    return None if m is None else int(m.group(1) or m.group(2))


def scan(tree: HeaderTree) -> HeaderFacts:
    """Parse every declaration that matters from ``tree``."""
    netfilter = tree.read(NETFILTER_H) or ""
    skbuff = tree.read(SKBUFF_H)
    if skbuff is None:
        raise errors.InputError(f"no {SKBUFF_H} in headers directory {tree.kdir}")
    core = tree.read(CT_CORE_H)
    if core is None:
        raise errors.InputError(f"no {CT_CORE_H} in headers directory {tree.kdir}")
    ct = tree.read(CT_H) or ""
    ecache = tree.read(CT_ECACHE_H) or ""
    ftrace = tree.read(FTRACE_H) or ""
    arch_ftrace = tree.read(tree.arch_ftrace_h) or ""
    livepatch = tree.read(LIVEPATCH_H)
    nf_core_c = tree.read(NF_CORE_C)
    netns_nf = tree.read(NETNS_NF_H)

    form, hook_ev = _hookfn(netfilter)
    ops_body = find_body(netfilter, r"\bstruct\s+nf_hook_ops")
    if ops_body is None:
        raise errors.InputError(f"no struct nf_hook_ops in {NETFILTER_H}")

    ftrace_params = find_params(ftrace, r"typedef\s+void\s*\(\s*\*\s*ftrace_func_t\s*\)")
    regs_form = "ftrace_regs" if ftrace_params and "struct ftrace_regs" in ftrace_params[-1] else "pt_regs"
    ftrace_ev = f"typedef ftrace_func_t({compact(ftrace_params)})" if ftrace_params else "no ftrace_func_t"

    set_ip_defs: dict[str, str] = {}
    for name in SET_IP_NAMES:
        if how := _setter_def(name, ftrace, arch_ftrace):
            set_ip_defs[name] = how

    if re.search(r"\bFTRACE_OPS_FL_RECURSION_SAFE\s*=", ftrace):
        recursion: str | None = "RECURSION_SAFE"
    elif re.search(r"\bFTRACE_OPS_FL_RECURSION\s*=", ftrace):
        recursion = "RECURSION"
    else:
        recursion = None

    nf_confirm = find_params(core, r"\bunsigned\s+int\s+nf_confirm")
    inline_found, fix, fix_ev = _fix(core)

    stop: bool | None = None
    if nf_core_c is not None:
        slow = function_body(nf_core_c, r"\bint\s+nf_hook_slow")
        stop = None if slow is None else bool(re.search(r"\bNF_STOP\b", slow))
    vrf, vrf_src = _vrf(tree)

    files = tuple(rel for rel in tree.files() if tree.find(rel) is not None)
    return HeaderFacts(
        hookfn_form=form,
        hookfn_evidence=hook_ev,
        has_register_hook=bool(re.search(r"\bint\s+nf_register_hook\s*\(", netfilter)),
        has_register_net_hook=bool(re.search(r"\bint\s+nf_register_net_hook\s*\(", netfilter)),
        ops_has_owner=bool(re.search(r"\bstruct\s+module\s*\*\s*owner\s*;", ops_body)),
        skb_nfct_accessor=bool(re.search(r"\bskb_nfct\s*\(\s*const\s+struct\s+sk_buff\s*\*\s*\w+\s*\)\s*\{", skbuff)),
        skb_nfct_field=_skb_field(skbuff),
        has_nf_ct_is_untracked=bool(re.search(r"\bnf_ct_is_untracked\s*\([^)]*\)\s*\{", ct + core)),
        has_hook_entries=find_body(netfilter, r"\bstruct\s+nf_hook_entries") is not None,
        has_hook_entry_list=find_body(netfilter, r"\bstruct\s+nf_hook_entry") is not None,
        nf_stop_in_hook_slow=stop,
        ftrace_regs_form=regs_form,
        ftrace_func_evidence=ftrace_ev,
        set_ip_defs=set_ip_defs,
        have_ftrace_with_args=_config_option(tree, "CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS"),
        recursion_flag=recursion,
        has_ops_permanent=bool(re.search(r"\bFTRACE_OPS_FL_PERMANENT\s*=", ftrace)),
        livepatch_header=livepatch is not None,
        has_klp_register=livepatch is not None and bool(re.search(r"\bklp_register_patch\s*\(", livepatch)),
        has_klp_enable=livepatch is not None and bool(re.search(r"\bklp_enable_patch\s*\(", livepatch)),
        has_ecache_exist=bool(re.search(r"\bnf_ct_ecache_exist\s*\([^)]*\)\s*\{", ecache + ct)),
        nf_confirm_params=None if nf_confirm is None else compact(nf_confirm),
        confirm_inline_found=inline_found,
        fix_present=fix,
        fix_evidence=fix_ev,
        nat_bysource_in_conn=bool(re.search(r"\bnat_bysource\s*;", find_body(ct, r"\bstruct\s+nf_conn") or "")),
        vrf_in_source=vrf,
        vrf_source=vrf_src,
        l3mdev_bit=_l3mdev_bit(tree.read(NETDEVICE_H)),
        version=_tree_version(tree),
        files=files,
        netns_hooks_ipv4=None if netns_nf is None else bool(re.search(r"\bhooks_ipv4\s*\[", netns_nf)),
    )


# --------------------------------------------------------------------------------------------------
# Cache


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nqgen"


def _cache_key(tree: HeaderTree) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}\0{tree.kdir.resolve()}".encode())
    for rel in tree.files():
        path = tree.find(rel)
        if path is None:
            h.update(f"\0{rel}:-".encode())
            continue
        st = path.stat()
        h.update(f"\0{rel}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _from_json(data: dict[str, Any]) -> HeaderFacts:
    data = dict(data)
    if data.get("version") is not None:
        data["version"] = tuple(data["version"])
    data["files"] = tuple(data["files"])
    return HeaderFacts(**data)


def scan_cached(tree: HeaderTree) -> HeaderFacts:
    """``scan(tree)``, served from the per-tree cache when the headers read have not changed."""
    if os.environ.get("NQGEN_NO_CACHE") == "1":
        return scan(tree)
    path = _cache_dir() / f"headers-{_cache_key(tree)}.json"
    try:
        return _from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError):
        pass
    facts = scan(tree)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(facts)), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a cache that cannot be written is only slower
    return facts


# --------------------------------------------------------------------------------------------------
# Decisions


class _Evidence:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, name: str, value: object, why: str) -> None:
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        self.lines.append(f"{name}={shown}: {why}")


def _decide_from_headers(
    facts: HeaderFacts,
    tree: HeaderTree,
    exports: frozenset[str],
    module_symbols: frozenset[str],
    config: ConfigFlags,
    code: ConfirmCodeFacts | None = None,
) -> KernelFeatures:
    ev = _Evidence()
    nf = tree.relpath(NETFILTER_H)

    hookfn: HookFnForm = facts.hookfn_form  # type: ignore[assignment]
    ev.add("hookfn_form", hookfn, f"{nf} {facts.hookfn_evidence}")

    registration: Registration
    if facts.has_register_hook:
        registration = "global"
        why = f"{nf} declares nf_register_hook(ops)"
        if facts.has_register_net_hook:
            why += " (nf_register_net_hook(net, ops) also declared)"
    elif facts.has_register_net_hook:
        registration = "pernet"
        why = f"{nf} declares only nf_register_net_hook(net, ops)"
    else:
        raise errors.InputError(f"neither nf_register_hook nor nf_register_net_hook declared in {nf}")
    if exports:
        wanted = "nf_register_hook" if registration == "global" else "nf_register_net_hook"
        why += f"; {wanted} {'exported' if wanted in exports else 'NOT exported'}"
    ev.add("registration", registration, why)

    ev.add(
        "ops_has_owner",
        facts.ops_has_owner,
        f"{nf} struct nf_hook_ops {'has' if facts.ops_has_owner else 'has no'} 'struct module *owner'",
    )
    skb = tree.relpath(SKBUFF_H)
    ev.add(
        "skb_nfct_accessor",
        facts.skb_nfct_accessor,
        f"{skb} {'defines' if facts.skb_nfct_accessor else 'has no'} skb_nfct(const struct sk_buff *)",
    )
    ev.add("skb_nfct_field", facts.skb_nfct_field, f"{skb} struct sk_buff field '{facts.skb_nfct_field}'")
    ev.add(
        "has_nf_ct_is_untracked",
        facts.has_nf_ct_is_untracked,
        f"{tree.relpath(CT_H)} {'defines' if facts.has_nf_ct_is_untracked else 'has no'} nf_ct_is_untracked()",
    )

    storage: HookStorage
    if facts.has_hook_entries:
        storage = "entries"
        why = f"{nf} defines struct nf_hook_entries (per-netns arrays of copied hook/priv pairs)"
    elif facts.has_hook_entry_list:
        storage = "entries"
        why = (
            f"{nf} defines struct nf_hook_entry but not nf_hook_entries (4.9-4.13 linked copies): "
            "registered ops are copied, so treated as entries"
        )
    else:
        storage = "list"
        why = f"{nf} has no struct nf_hook_entries: hooks are the registered nf_hook_ops on a list"
    if storage == "entries":
        storage, why = _hook_heads(tree, facts, why)
    ev.add("hook_storage", storage, why)

    if facts.nf_stop_in_hook_slow is not None:
        stop = facts.nf_stop_in_hook_slow
        why = f"{tree.relpath(NF_CORE_C)} nf_hook_slow() {'handles' if stop else 'does not handle'} NF_STOP"
    else:
        stop = storage == "list"
        why = f"inferred from hook_storage={storage} (headers show only the uapi constant; kernel-compat.md: " + (
            "list kernels treat ACCEPT||STOP alike in nf_hook_slow)"
            if stop
            else "nf_hook_entries kernels end nf_hook_slow in default: return 0 / WARN)"
        )
    ev.add("nf_stop_honoured", stop, why)

    ft = tree.relpath(FTRACE_H)
    regs_form: FtraceRegsForm = facts.ftrace_regs_form  # type: ignore[assignment]
    ev.add("ftrace_regs_form", regs_form, f"{ft} {facts.ftrace_func_evidence}")
    set_ip: FtraceSetIp
    arch_h = tree.relpath(tree.arch_ftrace_h)
    if regs_form == "pt_regs":
        set_ip, why = "regs_ip", "pt_regs callback: set regs->ip"
    else:
        set_ip, why = (
            "regs_ip",
            (
                "no usable ftrace_regs setter (only the generic no-op without CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS): "
                "set ftrace_get_regs(fregs)->ip"
            ),
        )
        for name in SET_IP_NAMES:
            how = facts.set_ip_defs.get(name)
            if how == "generic" or (how == "arch" and facts.have_ftrace_with_args is not False):
                set_ip = name
                where = arch_h if how == "arch" else ft
                why = f"{where} defines {name}(fregs, ip)"
                if how == "arch":
                    why += (
                        " (CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS=y in the tree's .config)"
                        if facts.have_ftrace_with_args
                        else " (tree has no .config: assumed CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS)"
                    )
                break
    ev.add("ftrace_set_ip", set_ip, why)
    recursion: FtraceRecursion
    if facts.recursion_flag == "RECURSION_SAFE":
        recursion, why = "RECURSION_SAFE", f"{ft} enum defines FTRACE_OPS_FL_RECURSION_SAFE"
    elif facts.recursion_flag == "RECURSION":
        recursion, why = "RECURSION", f"{ft} enum defines FTRACE_OPS_FL_RECURSION"
    else:
        recursion = "RECURSION" if regs_form == "ftrace_regs" else "RECURSION_SAFE"
        why = f"guessed from ftrace_regs_form={regs_form}: no FTRACE_OPS_FL_RECURSION(_SAFE) in {ft}"
    ev.add("ftrace_recursion_flag", recursion, why)
    permanent = facts.has_ops_permanent
    ev.add(
        "ftrace_permanent",
        permanent,
        f"{ft} enum {'defines' if permanent else 'has no'} FTRACE_OPS_FL_PERMANENT"
        + (" (sysctl kernel.ftrace_enabled=0 is refused while such an ops is registered)" if permanent else ""),
    )

    lp = tree.relpath(LIVEPATCH_H)
    livepatch: LivepatchApi
    if config.known and not config.livepatch:
        livepatch, why = "none", "CONFIG_LIVEPATCH is not set"
    elif not facts.livepatch_header:
        livepatch, why = "none", f"no {LIVEPATCH_H}"
    elif facts.has_klp_register:
        livepatch, why = "register_enable", f"{lp} declares klp_register_patch() and klp_enable_patch()"
    elif facts.has_klp_enable:
        livepatch, why = "enable", f"{lp} declares klp_enable_patch() only"
    else:
        livepatch, why = "none", f"{lp} declares neither klp_register_patch nor klp_enable_patch"
    if livepatch != "none" and not config.known:
        why += " (CONFIG_LIVEPATCH unknown: no .config)"
    ev.add("livepatch_api", livepatch, why)

    ev.add(
        "has_ecache_exist",
        facts.has_ecache_exist,
        f"{tree.relpath(CT_ECACHE_H)} {'defines' if facts.has_ecache_exist else 'has no'} nf_ct_ecache_exist()",
    )

    core = tree.relpath(CT_CORE_H)
    generation: ConfirmGeneration
    params = facts.nf_confirm_params
    if params is not None and params.startswith("void"):
        generation, why = "G3", f"{core} declares nf_confirm({params}) (the hook itself)"
    elif params is not None:
        generation, why = "G2", f"{core} declares nf_confirm({params})"
    else:
        generation, why = "G1", f"{core} declares no nf_confirm()"
    if module_symbols:
        has_ipv4 = "ipv4_confirm" in module_symbols
        why += f"; module {'has' if has_ipv4 else 'has no'} ipv4_confirm"
        if (generation == "G3") == has_ipv4:
            why += " (DISAGREES with the headers: check --kdir matches --module)"
    why += _helper_check(generation, why, code)
    ev.add("confirm_generation", generation, why)

    vrf_code = _vrf_from_code(code, facts.l3mdev_bit, tree.relpath(NETDEVICE_H))
    if vrf_code is not None:
        vrf, why = vrf_code
    elif facts.vrf_in_source is not None:
        vrf = facts.vrf_in_source
        why = f"{facts.vrf_source} {'tests' if vrf else 'does not test'} netif_is_l3_master (VRF)"
    elif facts.version is not None:
        vrf = facts.version >= VRF_SINCE
        why = (
            f"not visible in headers: inferred from Makefile version {'.'.join(map(str, facts.version))} "
            f"({'>=' if vrf else '<'} 5.16, where 8e0538d8ee06 added the l3mdev check; backports unseen)"
        )
    else:
        vrf, why = False, "guessed: not visible in headers and no Makefile version"
    ev.add("confirm_has_vrf_check", vrf, why)

    if not facts.confirm_inline_found:
        raise errors.InputError(f"no inline nf_conntrack_confirm() in {core}")
    ev.add("fix_present", facts.fix_present, f"{core} {facts.fix_evidence}")

    nat: NatOnConfirmed = "skipped" if facts.nat_bysource_in_conn else "rewrites_reply"
    why = (
        "struct nf_conn has nat_bysource: nf_nat_setup_info() tests nf_ct_is_confirmed()"
        " (as read in RHEL 8.1 and 6.1 nf_nat_core.c)"
        if facts.nat_bysource_in_conn
        else "struct nf_conn has no nat_bysource: the by-source node is in the NAT extension, and"
        " nf_nat_setup_info() guards confirmed entries only through nf_ct_nat_ext_add()"
    )
    ev.add("nat_on_confirmed", nat, f"{tree.relpath(CT_H)} {why}")

    kallsyms, nf_confirm_exp = _export_facts(ev, exports)
    return KernelFeatures(
        hookfn_form=hookfn,
        registration=registration,
        ops_has_owner=facts.ops_has_owner,
        skb_nfct_accessor=facts.skb_nfct_accessor,
        skb_nfct_field=facts.skb_nfct_field,
        has_nf_ct_is_untracked=facts.has_nf_ct_is_untracked,
        hook_storage=storage,
        nf_stop_honoured=stop,
        ftrace_regs_form=regs_form,
        ftrace_set_ip=set_ip,
        ftrace_recursion_flag=recursion,
        ftrace_permanent=permanent,
        livepatch_api=livepatch,
        has_ecache_exist=facts.has_ecache_exist,
        confirm_generation=generation,
        confirm_has_vrf_check=vrf,
        fix_present=facts.fix_present,
        kallsyms_lookup_name_exported=kallsyms,
        nf_confirm_exported=nf_confirm_exp,
        nat_on_confirmed=nat,
        evidence=tuple(ev.lines),
    )


def _hook_heads(tree: HeaderTree, facts: HeaderFacts, why: str) -> tuple[HookStorage, str]:
    """Per-family heads (net->nf.hooks_ipv4[], 4.16+) or one array per netns (hooks[pf][hooknum], 4.9-4.15)."""
    netns = tree.relpath(NETNS_NF_H)
    if facts.netns_hooks_ipv4 is not None:
        if facts.netns_hooks_ipv4:
            return "entries", f"{why}; {netns} has hooks_ipv4[]"
        return "pf_entries", f"{why}; {netns} has no hooks_ipv4[] (hooks[pf][hooknum], before 4.16)"
    if facts.version is not None:
        per_family = facts.version >= HOOKS_PER_FAMILY_SINCE
        v = ".".join(map(str, facts.version))
        return (
            "entries" if per_family else "pf_entries",
            f"{why}; no {NETNS_NF_H} in the tree: heads inferred from Makefile version {v} "
            f"({'>=' if per_family else '<'} 4.16, where hooks_ipv4[] replaced hooks[pf][hooknum])",
        )
    if not facts.has_hook_entries:
        return "pf_entries", f"{why}; nf_hook_entry lists are 4.9-4.13: hooks[pf][hooknum]"
    return "entries", f"{why}; guessed hooks_ipv4[] (no {NETNS_NF_H}, no Makefile version)"


def _helper_check(generation: ConfirmGeneration, why: str, code: ConfirmCodeFacts | None) -> str:
    """The ops array must agree with the generation: G1 <=> a helper hook at NF_IP_PRI_CONNTRACK_HELPER.

    G1's corrected confirm leaves helpers to that hook; G2/G3's runs the helper itself. A tree whose
    declarations say one and whose ops array says the other (a static nf_confirm that runs helpers beside no
    helper hook, as upstream 5.1-5.2 after 827318feb69c, or a backport) would skip or repeat the helper.
    """
    if code is None:
        return ""
    if code.helper_hooks is None:
        return f"; helper hook not checked: no ops array decoded in {code.where}"
    has_helper = bool(code.helper_hooks)
    if (generation == "G1") == has_helper:
        shown = ", ".join(code.helper_hooks) if has_helper else "none"
        return f"; ops array helper hooks at {NF_IP_PRI_CONNTRACK_HELPER}: {shown} (agrees)"
    if has_helper:
        conflict = (
            f"its ops array still has helper hooks at NF_IP_PRI_CONNTRACK_HELPER ({', '.join(code.helper_hooks)}), "
            "so a corrected confirm that runs the helper itself would run it twice"
        )
    else:
        conflict = (
            f"its ops array has no helper hook at NF_IP_PRI_CONNTRACK_HELPER ({NF_IP_PRI_CONNTRACK_HELPER}), "
            "so the helpers run inside the confirm and a G1 corrected confirm would silently skip them"
        )
    raise errors.NotApplicableError(
        f"confirm generation undecidable: the headers say {generation} ({why}) but {code.where}: {conflict}; refusing"
    )


def _vrf_from_code(code: ConfirmCodeFacts | None, bit: int | None, netdevice: str) -> tuple[bool, str] | None:
    """The VRF check as the module's code shows it (a backport of 8e0538d8ee06 included); None: no code read."""
    if code is None:
        return None
    if code.vrf_symbol:
        return True, f"{code.where}: the module defines in_vrf_postrouting()"
    if bit is not None:
        vrf = any(bit in bits for bits in code.l3mdev_bits)
        test = f"a test of IFF_L3MDEV_MASTER (1 << {bit}, {netdevice})"
    else:
        vrf = bool(code.l3mdev_bits)
        test = f"a single-bit device flag test (IFF_L3MDEV_MASTER's bit unknown: no {netdevice})"
    verb = "has" if vrf else "has no"
    return vrf, f"{code.where} {verb} {test} after a state->hook == NF_INET_POST_ROUTING compare (disassembled)"


def _export_facts(ev: _Evidence, exports: frozenset[str]) -> tuple[bool, bool]:
    source = "exports (Module.symvers + module __ksymtab)" if exports else "no export list given"
    kallsyms = "kallsyms_lookup_name" in exports
    nf_confirm = "nf_confirm" in exports
    ev.add("kallsyms_lookup_name_exported", kallsyms, f"{'in' if kallsyms else 'not in'} {source}")
    ev.add("nf_confirm_exported", nf_confirm, f"{'in' if nf_confirm else 'not in'} {source}")
    return kallsyms, nf_confirm


def _decide_guessed(
    exports: frozenset[str], module_symbols: frozenset[str], config: ConfigFlags, code: ConfirmCodeFacts | None = None
) -> KernelFeatures:
    """No headers: decide what symbols can tell, and mark every line "guessed"."""
    ev = _Evidence()
    g = "guessed (no headers):"
    legacy = "nf_register_hook" in exports or "need_ipv4_conntrack" in exports
    registration: Registration = "global" if legacy else "pernet"
    legacy_why = "RHEL 7-style exports (nf_register_hook/need_ipv4_conntrack)"
    if not legacy:
        legacy_why = "no nf_register_hook export"
    ev.add("hookfn_form", "ops_state" if legacy else "priv_state", f"{g} {legacy_why}")
    ev.add("registration", registration, f"{g} nf_register_hook {'exported' if legacy else 'not exported'}")
    ev.add("ops_has_owner", legacy, f"{g} follows registration")
    ev.add("skb_nfct_accessor", True, f"{g} skb_nfct() exists on every generation in kernel-compat.md")
    ev.add("skb_nfct_field", "nfct" if legacy else "_nfct", f"{g} follows registration")
    ev.add("has_nf_ct_is_untracked", legacy, f"{g} follows registration")
    storage: HookStorage = "list" if legacy else "entries"
    ev.add("hook_storage", storage, f"{g} follows registration")
    ev.add("nf_stop_honoured", legacy, f"{g} follows hook_storage={storage}")
    old_ftrace = "kallsyms_lookup_name" in exports  # exported until 5.6; ftrace_regs came in 5.11
    regs_form: FtraceRegsForm = "pt_regs" if old_ftrace else "ftrace_regs"
    set_ip: FtraceSetIp = "regs_ip" if old_ftrace else "ftrace_instruction_pointer_set"
    recursion: FtraceRecursion = "RECURSION_SAFE" if old_ftrace else "RECURSION"
    why = f"{g} kallsyms_lookup_name {'exported (<5.7)' if old_ftrace else 'not exported (>=5.7; assumed >=5.11)'}"
    ev.add("ftrace_regs_form", regs_form, why)
    ev.add("ftrace_set_ip", set_ip, why)
    ev.add("ftrace_recursion_flag", recursion, why)
    ev.add("ftrace_permanent", False, f"{g} not visible without ftrace.h: the ops is not made permanent")
    livepatch: LivepatchApi
    if config.known and not config.livepatch:
        livepatch = "none"
    elif "klp_register_patch" in exports:
        livepatch = "register_enable"
    elif "klp_enable_patch" in exports:
        livepatch = "enable"
    else:
        livepatch = "none"
    ev.add("livepatch_api", livepatch, f"{g} from klp_* exports and CONFIG_LIVEPATCH")
    generation: ConfirmGeneration
    if "ipv4_confirm" not in module_symbols and "nf_confirm" in module_symbols | exports:
        generation = "G3"
    elif "nf_confirm" in module_symbols | exports:
        generation = "G2"
    else:
        generation = "G1"
    why = f"{g} from ipv4_confirm/nf_confirm in the module symbols and exports"
    ev.add("confirm_generation", generation, why + _helper_check(generation, why, code))
    ev.add("has_ecache_exist", generation == "G3", f"{g} true only for G3 (6.2+)")
    vrf_code = _vrf_from_code(code, None, NETDEVICE_H)
    vrf, why = vrf_code if vrf_code is not None else (generation == "G3", f"{g} true only for G3 (6.2+)")
    ev.add("confirm_has_vrf_check", vrf, why)
    ev.add("fix_present", generation == "G3", f"{g} every G3 (6.2+) kernel is fixed; older ones assumed not")
    nat: NatOnConfirmed = "rewrites_reply" if legacy else "skipped"
    ev.add("nat_on_confirmed", nat, f"{g} follows registration (3.10 keeps the NAT by-source node in the extension)")
    kallsyms, nf_confirm_exp = _export_facts(ev, exports)
    return KernelFeatures(
        hookfn_form="ops_state" if legacy else "priv_state",
        registration=registration,
        ops_has_owner=legacy,
        skb_nfct_accessor=True,
        skb_nfct_field="nfct" if legacy else "_nfct",
        has_nf_ct_is_untracked=legacy,
        hook_storage=storage,
        nf_stop_honoured=legacy,
        ftrace_regs_form=regs_form,
        ftrace_set_ip=set_ip,
        ftrace_recursion_flag=recursion,
        ftrace_permanent=False,
        livepatch_api=livepatch,
        has_ecache_exist=generation == "G3",
        confirm_generation=generation,
        confirm_has_vrf_check=vrf,
        fix_present=generation == "G3",
        kallsyms_lookup_name_exported=kallsyms,
        nf_confirm_exported=nf_confirm_exp,
        nat_on_confirmed=nat,
        evidence=tuple(ev.lines),
    )


def probe_features(
    kdir: Path | None,
    *,
    exports: frozenset[str],
    module_symbols: frozenset[str],
    config: ConfigFlags,
    code: ConfirmCodeFacts | None = None,
) -> KernelFeatures:
    """Decide every API generation fact for the target from its headers (``kdir``), symbols and, where given,
    the conntrack module's code (``code``: the ops array's helper hooks and the VRF test in the confirm).

    Raises ``errors.InputError`` when ``kdir`` does not exist or holds no usable headers.
    """
    if kdir is None:
        return _decide_guessed(exports, module_symbols, config, code)
    tree = locate(kdir)
    facts = scan_cached(tree)
    return _decide_from_headers(facts, tree, exports, module_symbols, config, code)
