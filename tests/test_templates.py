"""Offline checks of the generated C for generations that cannot be compiled here (RHEL 7, RHEL 8, 4.19-6.12).

Nothing here runs a preprocessor or a compiler; each check is one an honest text reading can make:

- every netfilter hook function nqgen defines has exactly the parameter types of that generation's ``nf_hookfn``
  typedef, and the ftrace callback those of ``ftrace_func_t``, both parsed from the generation's fixture header
  (tests/fixtures/headers/<generation>/, see its README for where each header was read);
- every identifier the generated C calls is defined by the generated C itself, declared in the fixture headers,
  listed in the fixture Module.symvers, or listed below in KERNEL_API with the generations it exists in and where
  that was read. Names the module must import from conntrack, netfilter, ftrace, livepatch or kallsyms must be in the
  generation's Module.symvers (EXPORTS_CHECKED), whatever else says so;
- the counters of nq_counters.h are the manifest's "counters", in order, for every strategy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_nqgen
from elffixtures import build_module
from nqgen.headers import clean_source, find_params, split_params
from nqgen.strategies import NAMES
from test_generations import CASES
from test_headers import FIXTURES as HEADER_TREES

GENERATIONS = sorted(CASES)
NO_HOOKS = frozenset({"hold-ref"})  # strategies that register no netfilter hook and define no hook function
# (strategy, source file, callback) of every ftrace callback nqgen generates
FTRACE_CALLBACKS = [("ftrace", "ftrace_main.c", "nq_ftrace_thunk"), ("hold-ref", "hold_ref.c", "nq_hold_thunk")]
ALL = frozenset(CASES)
RHEL7 = frozenset({"rhel7-early", "rhel7.7", "rhel7.9"})  # 3.10: global hook lists
PERNET = ALL - RHEL7  # 4.18+: per-netns nf_hook_entries

# Kernel API the generated C uses beyond the fixture headers (which hold only what nqgen's probe reads) and the
# fixture Module.symvers. name -> (generations where it exists, why we believe so). "upstream X.Y" means present in
# every upstream release since, so in all the upstream generations here; RHEL trees are named where they were read.
_CORE = "core kernel API since 2.6 (macro, inline or vmlinux export), unchanged in use through 6.12"
_NF = "netfilter/conntrack inline or macro present since 3.x in every tree here (the confirm bodies use it)"
KERNEL_API: dict[str, tuple[frozenset[str], str]] = {
    **{
        n: (ALL, _CORE)
        for n in [
            "ARRAY_SIZE",
            "container_of",
            "max",
            "pr_err",
            "pr_info",
            "snprintf",
            "scnprintf",
            "strcmp",
            "strlen",
            "strncmp",
            "test_bit",
            "htons",
            "WARN_ON",
            "rcu_read_lock",
            "rcu_read_unlock",
            "rcu_dereference",
            "rcu_access_pointer",
            "synchronize_net",
            "INIT_DELAYED_WORK",
            "schedule_delayed_work",
            "cancel_delayed_work_sync",
            "mod_delayed_work",
            "msecs_to_jiffies",
            "kobject_create_and_add",
            "kobject_put",
            "sysfs_create_group",
            "sysfs_remove_group",
            "sysfs_attr_init",
            "for_each_possible_cpu",
            "per_cpu",
            "this_cpu_inc",
            "this_cpu_add",
            "DEFINE_PER_CPU",
            "DECLARE_PER_CPU",
            "module_init",
            "module_exit",
            "module_param",
            "MODULE_LICENSE",
            "MODULE_AUTHOR",
            "MODULE_DESCRIPTION",
            "MODULE_PARM_DESC",
            "MODULE_INFO",
            "try_module_get",
            "module_put",
            "preempt_disable",
            "preempt_enable",
            "list_for_each_entry_rcu",
            "register_pernet_subsys",
            "unregister_pernet_subsys",
            "for_each_net",
            "ip_hdr",
            "ip_hdrlen",
            "ipv6_hdr",
            "skb_network_offset",
            "kmalloc",
            "kfree",
            "call_rcu",
            "rcu_barrier",
        ]
    },
    **{
        n: (ALL, _NF)
        for n in [
            "nf_ct_get",
            "nf_ct_is_confirmed",
            "nf_ct_net",
            "nfct_help",
            "NF_CT_STAT_INC_ATOMIC",
            "NF_QUEUE_NR",
            "nf_ct_l3num",
            "nf_ct_put",
            "nf_conntrack_get",
        ]
    },
    "nf_is_loopback_packet": (
        ALL,
        "called by ipv4_confirm in the okfn-form RHEL 7 halfline/rhel7@90bf3f93 "
        "net/ipv4/netfilter/nf_conntrack_l3proto_ipv4.c and by every later confirm body",
    ),
    "ipv6_skip_exthdr": (
        ALL,
        "net/ipv6/exthdrs_core.c (built in), (skb, start, &nexthdr, &frag_off) since 3.3; called by ipv6_confirm",
    ),
    "READ_ONCE": (
        ALL,
        "upstream 3.19; RHEL 7: halfline/rhel7@0a7c2d46 include/linux/compiler.h; the okfn (early RHEL 7) "
        "branch of nq_compat.h falls back to ACCESS_ONCE when it is not defined",
    ),
    "WRITE_ONCE": (ALL, "as READ_ONCE"),
    "within_module": (
        PERNET,
        "upstream 3.17 (9b20a352d78a); RHEL 7 halfline/rhel7@48f1a4d9 include/linux/module.h has only "
        "within_module_core/within_module_init",
    ),
    "within_module_core": (ALL, "include/linux/module.h: RHEL 7 halfline/rhel7@48f1a4d9, upstream to 6.12"),
    "within_module_init": (ALL, "as within_module_core"),
    "__module_address": (
        RHEL7,
        "declared in RHEL 7 halfline/rhel7@48f1a4d9 include/linux/module.h and EXPORT_SYMBOL_GPL in 3.x "
        "kernel/module.c; unexported upstream in 5.12 (34e64705ad41) and by that commit's stable backports "
        "(4.19.y, 5.4.y stable-review mails), so only the RHEL 7 branch (targets in nf_conntrack_ipv4) uses it",
    ),
    "down_read": (PERNET, "rwsem API since 2.6; used on net_rwsem, which came with upstream 4.17 (4.18 in RHEL 8)"),
    "up_read": (PERNET, "as down_read"),
    "netif_is_l3_master": (PERNET, "include/linux/netdevice.h since upstream 4.4 (VRF)"),
    "skb_get_hash": (
        ALL - {"rhel7-early"},
        "upstream 3.14 (rename of skb_get_rxhash); RHEL 7.9 not read (index), assumed backported",
    ),
    "WARN_ON_ONCE": (ALL, _CORE),
    "mutex_lock": (ALL, _CORE),
    "mutex_unlock": (ALL, _CORE),
    "nfct_nat": (
        ALL,
        "static inline in include/net/netfilter/nf_nat.h (nf_ct_ext_find, no nf_nat symbol): read in RHEL 7.7 "
        "dcui/RHEL77, RHEL 8.1 cai-fuqiang/linux-4.18.0-147@17d780554 and Debian 6.1.192",
    ),
    "register_module_notifier": (
        ALL,
        "kernel/module.c EXPORT_SYMBOL since 2.6, read in RHEL 7.7 dcui/RHEL77 and Debian 6.1.192",
    ),
    "unregister_module_notifier": (ALL, "as register_module_notifier"),
    "IS_ERR_OR_NULL": (ALL, "include/linux/err.h since upstream 2.6.33"),
    "cmpxchg": (ALL, _CORE),
    "pr_warn": (ALL, "include/linux/printk.h since upstream 2.6.37 (3.10 has it)"),
    "pr_warn_ratelimited": (PERNET, "include/linux/printk.h since upstream 3.0"),
    "msleep": (ALL, _CORE),
    "nf_hook_entries_get_hook_ops": (
        PERNET,
        "include/linux/netfilter.h inline since upstream 4.14 (with nf_hook_entries); RHEL 8.3 "
        "dongzhiyan-stack/linux-4.18.0-240.el8 include/linux/netfilter.h line 105",
    ),
    "register_kretprobe": (PERNET, "kernel/kprobes.c EXPORT_SYMBOL_GPL since upstream 2.6.12"),
    "unregister_kretprobe": (PERNET, "as register_kretprobe"),
    "regs_return_value": (PERNET, "arch/x86/include/asm/ptrace.h inline since upstream 2.6.25"),
    **{n: (ALL, _CORE) for n in ["ALIGN", "IS_ERR", "PTR_ERR", "kmalloc", "kfree", "memcmp", "memcpy", "min_t"]},
    "filp_open": (ALL, "include/linux/fs.h, exported since 2.6: RHEL 7 (dcui/RHEL77), RHEL 8.1, Debian 6.1"),
    "filp_close": (ALL, "as filp_open"),
    "kernel_read": (
        ALL,
        "exported since 2.6; (file, offset, buf, count) in RHEL 7.7 include/linux/fs.h, (file, buf, count, &pos) "
        "since 4.14 (RHEL 8.1, Debian 6.1): nqgen picks the form from the target's fs.h (context.kernel_read_form)",
    ),
    "ACCESS_ONCE": (
        RHEL7,
        "the okfn-branch fallback for READ_ONCE/WRITE_ONCE; defined in every 3.10 include/linux/compiler.h "
        "(halfline/rhel7@0a7c2d46)",
    ),
}

# Kernel functions the generated C may only call when the generation's Module.symvers exports them: the ones
# that decide whether a module loads at all on that kernel.
EXPORTS_CHECKED = frozenset(
    [
        "__nf_conntrack_confirm",
        "nf_ct_deliver_cached_events",
        "nf_ct_seq_adjust",
        "nf_register_hooks",
        "nf_unregister_hooks",
        "nf_register_net_hooks",
        "nf_unregister_net_hooks",
        "kallsyms_lookup_name",
        "register_ftrace_function",
        "unregister_ftrace_function",
        "ftrace_set_filter_ip",
        "klp_enable_patch",
        "klp_register_patch",
        "klp_unregister_patch",
        "sprint_symbol",
        "nf_confirm",
    ]
)

# Known gaps, each with the reason; a (generation, strategy, name) listed here is expected to fail the checks.
KNOWN_GAPS: dict[tuple[str, str, str], str] = {
    ("rhel7-early", "advance-confirm", "skb_get_hash"): (
        "skb_get_hash (upstream 3.14) not confirmed in an okfn-form RHEL 7 tree"
    ),
}

_C_KEYWORDS = frozenset(
    ["if", "for", "while", "switch", "return", "sizeof", "typeof", "__attribute__", "defined", "do", "else", "case"]
)
_STRING_OR_CHAR = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'')


def code_of(text: str) -> str:
    """The C without comments, string or character literals, and preprocessor lines' own names."""
    return _STRING_OR_CHAR.sub('""', clean_source(text))


def called(text: str) -> set[str]:
    """Identifiers used as ``name(`` that are not member calls (``->f(``, ``.f(``) or keywords."""
    names = set()
    for m in re.finditer(r"(->|\.)?\s*\b([A-Za-z_]\w*)\s*\(", code_of(text)):
        if m[1] or m[2] in _C_KEYWORDS:
            continue
        names.add(m[2])
    return names


def defined_here(text: str) -> set[str]:
    """Functions, macros and variables the generated C defines or declares itself."""
    code = code_of(text)
    names = set(re.findall(r"^\s*#\s*define\s+(\w+)", code, re.M))
    # a definition or prototype: a type, then the name and its parameters, at the start of a line
    names |= set(
        re.findall(
            r"^(?:static\s+|extern\s+|inline\s+|const\s+|__init\s+|__exit\s+|notrace\s+|"
            r"__net_init\s+|__net_exit\s+)*(?:unsigned\s+|struct\s+)?\w+[\s*]+(?:notrace\s+|"
            r"__net_init\s+|__net_exit\s+|__init\s+|__exit\s+)*\**(\w+)\s*\(",
            code,
            re.M,
        )
    )
    # local variables holding function pointers (called as name(...))
    names |= set(re.findall(r"\b\w+\s*\*\s*(\w+)\s*=\s*\(\s*\w+\s*\*\s*\)", code))
    return names | set(functions(text))


def header_declared(kdir: Path) -> set[str]:
    names: set[str] = set()
    for h in kdir.rglob("*.[ch]"):
        code = code_of(h.read_text(errors="replace"))
        names |= set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", code))
        names |= set(re.findall(r"^\s*#\s*define\s+(\w+)", code, re.M))
    return names


def symvers(kdir: Path) -> set[str]:
    return {line.split()[1] for line in (kdir / "Module.symvers").read_text().splitlines() if line.strip()}


# --- rendering every strategy for every generation --------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for generation, case in CASES.items():
        tmp = tmp_path_factory.mktemp("tpl_" + generation.replace(".", "_"))
        ko = build_module(tmp, case.source, case.ko, case.cflags)
        dest = tmp / "out"
        proc = run_nqgen(
            ["--strategy", "all", "--kdir", str(HEADER_TREES / generation), "--module", str(ko), "--out", str(dest)],
            tmp,
            env={"XDG_CACHE_HOME": str(tmp / "cache")},
        )
        assert proc.returncode == 0, proc.stderr
        out[generation] = dest
    return out


def strategies(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and p.name in NAMES)


def linked_sources(strategy_dir: Path) -> str:
    """The C of the objects Kbuild links into the module (the other nq_*.c files are not built)."""
    kbuild = (strategy_dir / "Kbuild").read_text()
    m = re.search(r"-y\s*:=\s*(.+)", kbuild)
    assert m, kbuild
    files = [strategy_dir / o.replace(".o", ".c") for o in m[1].split()]
    files += sorted(strategy_dir.glob("*.h"))
    return "\n".join(f.read_text() for f in files)


# --- prototypes ---------------------------------------------------------------------------------------------------

_TYPE_WORDS = frozenset(
    [
        "void",
        "char",
        "short",
        "int",
        "long",
        "unsigned",
        "signed",
        "bool",
        "u8",
        "u16",
        "u32",
        "u64",
        "__be16",
        "__u32",
        "size_t",
    ]
)


def param_type(param: str) -> str:
    """A parameter's type without its name (``const struct nf_hook_state *state`` -> ``... nf_hook_state *``)."""
    p = " ".join(param.split())
    if "(*" in p.replace("( *", "(*"):
        p = re.sub(r"\(\s*\*\s*\w*\s*\)", "(*)", p)
    else:
        words = p.replace("*", " * ").split()
        if len(words) > 1 and words[-1] != "*" and words[-1] not in _TYPE_WORDS:
            words = words[:-1]
        p = " ".join(words)
    return re.sub(r"\s*\*\s*", " *", p).replace("( *", "(*").strip()


def typedef_types(kdir: Path, rel: str, pattern: str) -> list[str]:
    params = find_params(clean_source((kdir / rel).read_text()), pattern)
    assert params is not None, f"{kdir}/{rel}: no {pattern}"
    return [param_type(p) for p in params]


def functions(text: str) -> dict[str, list[str]]:
    """Every function defined (with a body) in ``text``: name -> parameter types."""
    code = code_of(text)
    out = {}
    for m in re.finditer(r"^[\w \t*]*?\b(\w+)\s*\(([^;{]*?)\)\s*\{", code, re.M | re.S):
        out[m[1]] = [param_type(p) for p in split_params(m[2])]
    return out


def hook_functions(text: str) -> dict[str, list[str]]:
    """Functions shaped like netfilter hooks in any generation's form: ``unsigned int f(...)`` taking an skb and
    ending with the hook state or an okfn pointer."""
    code = code_of(text)
    hooks = {}
    for name, types in functions(text).items():
        head = re.search(rf"^([\w \t*]*?)\b{name}\s*\(", code, re.M)
        if not (head and re.search(r"\bunsigned\s+int\b", head[1]) and "struct sk_buff *" in types):
            continue
        if "nf_hook_state" in types[-1] or "(*)" in types[-1]:
            hooks[name] = types
    return hooks


@pytest.mark.parametrize("generation", GENERATIONS)
def test_hook_functions_have_the_generations_nf_hookfn_prototype(generation: str, rendered: dict[str, Path]) -> None:
    want = typedef_types(
        HEADER_TREES / generation, "include/linux/netfilter.h", r"typedef\s+unsigned\s+int\s+nf_hookfn"
    )
    for sdir in strategies(rendered[generation]):
        hooks = hook_functions(linked_sources(sdir))
        if sdir.name in NO_HOOKS:
            assert not hooks, f"{sdir.name} registers no netfilter hook, yet defines {sorted(hooks)}"
            continue
        assert hooks, f"{sdir.name}: no hook function found"
        for name, types in hooks.items():
            assert types == want, f"{generation} {sdir.name} {name}{tuple(types)} != nf_hookfn{tuple(want)}"


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize(("strategy", "source", "callback"), FTRACE_CALLBACKS)
def test_ftrace_callback_has_the_generations_ftrace_func_t_prototype(
    generation: str, strategy: str, source: str, callback: str, rendered: dict[str, Path]
) -> None:
    sdir = rendered[generation] / strategy
    if not sdir.is_dir():
        pytest.skip(f"no {strategy} strategy for this generation")
    want = typedef_types(
        HEADER_TREES / generation, "include/linux/ftrace.h", r"typedef\s+void\s*\(\s*\*\s*ftrace_func_t\s*\)"
    )
    got = functions((sdir / source).read_text())[callback]
    assert got == want, f"{callback}{tuple(got)} != ftrace_func_t{tuple(want)}"


def test_param_type_drops_only_names() -> None:
    assert param_type("const struct nf_hook_state *state") == "const struct nf_hook_state *"
    assert param_type("int (*okfn)(struct sk_buff *)") == "int (*)(struct sk_buff *)"
    assert param_type("unsigned long ip") == "unsigned long"
    assert param_type("unsigned int") == "unsigned int"
    assert param_type("void *priv") == "void *"


# --- called identifiers -------------------------------------------------------------------------------------------


def unexplained_calls(generation: str, sdir: Path) -> dict[str, str]:
    """Called names that nothing accounts for on this generation -> why."""
    kdir = HEADER_TREES / generation
    text = linked_sources(sdir)
    exports = symvers(kdir)
    declared = header_declared(kdir)
    own = defined_here(text)
    bad = {}
    # an anchor's address is taken, not called: it must be exported (and so declared) by this generation
    for name in sorted(set(re.findall(r"\(unsigned long\)&(\w+)\b(?!\s*\[)", code_of(text))) - own):
        if name not in exports:
            bad[name] = "address taken, but not exported by this generation's Module.symvers"
    for name in sorted(called(text) - own):
        if name in EXPORTS_CHECKED:
            if name not in exports:
                bad[name] = "not exported by this generation's Module.symvers"
            continue
        if name in exports or name in declared:
            continue
        gens, _why = KERNEL_API.get(name, (frozenset(), ""))
        if generation not in gens:
            bad[name] = "not declared in the fixture headers and not in KERNEL_API for this generation"
    return bad


@pytest.mark.parametrize("generation", GENERATIONS)
def test_every_called_kernel_function_exists_in_that_generation(generation: str, rendered: dict[str, Path]) -> None:
    problems = []
    for sdir in strategies(rendered[generation]):
        for name, why in unexplained_calls(generation, sdir).items():
            if (generation, sdir.name, name) in KNOWN_GAPS:
                continue
            problems.append(f"{sdir.name}: {name}: {why}")
    assert not problems, "\n".join(problems)


def test_known_gaps_are_still_gaps(rendered: dict[str, Path]) -> None:
    """Each KNOWN_GAPS entry still fails the check (remove it once fixed, so the check guards it again)."""
    for (generation, strategy, name), why in KNOWN_GAPS.items():
        sdir = rendered[generation] / strategy
        if not sdir.is_dir():
            continue  # the strategy is no longer emitted there: the gap is gone
        assert name in unexplained_calls(generation, sdir), f"{generation} {strategy} {name} is fixed: {why}"


def test_called_extracts_calls_not_members_or_strings() -> None:
    text = 'x = helper->help(skb); pr_info("foo(bar)"); /* baz(1) */ if (a) y = nf_ct_get(skb, &c);'
    assert called(text) == {"pr_info", "nf_ct_get"}


def test_kernel_api_names_generations_that_exist() -> None:
    for name, (gens, why) in KERNEL_API.items():
        assert gens <= ALL and why, name


# --- counters ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", GENERATIONS)
def test_counters_header_matches_the_manifest(generation: str, rendered: dict[str, Path]) -> None:
    for sdir in strategies(rendered[generation]):
        manifest = json.loads((sdir / "nqgen-module.json").read_text())
        header = (sdir / "nq_counters.h").read_text()
        enum = re.findall(r"^\s*NQ_CNT_(\w+),", header, re.M)
        names = re.findall(r'^\s*"(\w+)",', header, re.M)
        assert enum == names == manifest["counters"], sdir.name
        code = re.sub(r"^\s*#\s*define\b.*$", "", code_of(linked_sources(sdir)), flags=re.M)
        used = set(re.findall(r"\bnq_count(?:_add)?\((\w+)", code))
        assert used <= set(enum), f"{sdir.name}: counts {used - set(enum)} that the header does not define"
