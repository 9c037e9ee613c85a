"""Issue 8 items 2, 6, 8 and the smaller findings on advance-confirm, stop-hook and the resolver, checked
offline per generation on the generated C and the comparison (the kernels named cannot run here).

- item 2: an entry the NAT hooks have seen is never confirmed early by either advance-confirm variant (on 3.10
  nf_nat_setup_info() would rewrite the reply tuple of the hashed entry; on 4.9+ NAT would be skipped), and what
  the comparison says about it follows the target's struct nf_conn (nat_bysource), not a version;
- item 6: stop-hook's pre-confirm on G1 (helper hook at 300, seqadj in the confirm hook on confirmed entries too)
  confirms every entry; the helper/seqadj skip stays on G2/G3 and in advance-confirm-corrected;
- item 8: on RHEL 7 a discovered nf_conntrack_ipv6.ko makes ipv6_confirm optional (module notifier), for every
  strategy that resolves targets;
- smalls: no KSYM_SYMBOL_LEN buffer on the stack, IPv6 extension headers walked, corrected covers and needs,
  what unloading does to queued packets.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_nqgen
from elffixtures import FIXTURES as ELF_FIXTURES
from elffixtures import build_module
from nqgen.headers import clean_source, function_body
from test_generations import CASES
from test_headers import FIXTURES as HEADER_TREES

ADVANCE = ("advance-confirm", "advance-confirm-corrected")
RHEL7_IPV6_SRC = (
    (ELF_FIXTURES / "nf_conntrack_ipv4_rhel7.c")
    .read_text()
    .replace("ipv4", "ipv6")
    .replace("#define NFPROTO_IPV6 2", "#define NFPROTO_IPV6 10")
    .replace("NFPROTO_IPV4", "NFPROTO_IPV6")
)


def generate(tmp: Path, generation: str, extra_modules: tuple[Path, ...] = ()) -> Path:
    case = CASES[generation]
    ko = build_module(tmp, case.source, case.ko, case.cflags)
    out = tmp / "out"
    args = ["--strategy", "all", "--kdir", str(HEADER_TREES / generation), "--module", str(ko), "--out", str(out)]
    for extra in extra_modules:
        args += ["--module", str(extra)]
    proc = run_nqgen(args, tmp, env={"XDG_CACHE_HOME": str(tmp / "cache")})
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def outs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {g: generate(tmp_path_factory.mktemp("i8_" + g.replace(".", "_")), g) for g in CASES}


@pytest.fixture(scope="module")
def rhel7_both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RHEL 7.9 with nf_conntrack_ipv4.ko and nf_conntrack_ipv6.ko, as `--module` twice gives them."""
    tmp = tmp_path_factory.mktemp("i8_rhel7_ipv6")
    ipv6 = build_module(tmp, RHEL7_IPV6_SRC, "nf_conntrack_ipv6.ko")
    return generate(tmp, "rhel7.9", (ipv6,))


def body(path: Path, head: str) -> str:
    found = function_body(clean_source(path.read_text()), head)
    assert found is not None, f"{head} not in {path}"
    return found


def comparison(out: Path, strategy: str) -> dict[str, object]:
    rows = json.loads((out / "comparison.json").read_text())
    rows = rows["strategies"] if isinstance(rows, dict) else rows
    (row,) = [r for r in rows if r["strategy"] == strategy]
    return row


# --- item 2: NAT ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", sorted(CASES))
@pytest.mark.parametrize("strategy", ADVANCE)
def test_entries_seen_by_nat_are_never_confirmed_early(outs: dict[str, Path], generation: str, strategy: str) -> None:
    sdir = outs[generation] / strategy
    if not sdir.is_dir():
        pytest.skip(f"{strategy} is not emitted for {generation}")
    src = sdir / "advance_confirm.c"
    guard = body(src, r"\bstatic\s+bool\s+nq_nat_pending")
    assert "IPS_NAT_DONE_MASK" in guard and "nfct_nat(" in guard  # a binding done, or a NAT extension
    text = src.read_text()
    assert "NAT cannot be set up on a confirmed entry" not in text
    for fam in ("ipv4", "ipv6"):
        if f"nq_advance_{fam}(" not in text:
            continue
        hook = body(src, rf"\bstatic\s+unsigned\s+int\s+nq_advance_{fam}")
        confirm_call = "orig(" if strategy == "advance-confirm" else "nq_preconfirm("
        assert "nq_nat_pending(" in hook and confirm_call in hook
        # the guard comes first, and an entry it catches is queued without being confirmed
        assert hook.index("nq_nat_pending(") < hook.index(confirm_call)
        guarded = hook[hook.index("nq_nat_pending(") : hook.index(confirm_call)]
        assert "nq_queue_verdict(skb)" in guarded and "nat_unconfirmed" in guarded
    manifest = json.loads((sdir / "nqgen-module.json").read_text())
    assert "nat_unconfirmed" in manifest["counters"]


@pytest.mark.parametrize("generation", sorted(CASES))
def test_nat_consequence_follows_the_targets_struct_nf_conn(outs: dict[str, Path], generation: str) -> None:
    profile = json.loads((outs[generation] / "profile.json").read_text())
    has_bysource = "nat_bysource" in (HEADER_TREES / generation / "include/net/netfilter/nf_conntrack.h").read_text()
    want = "skipped" if has_bysource else "rewrites_reply"
    assert profile["features"]["nat_on_confirmed"] == want
    risks = " ".join(comparison(outs[generation], "advance-confirm")["risks"])  # type: ignore[arg-type]
    assert "NAT cannot be set up on a confirmed entry" not in risks
    if want == "rewrites_reply":  # RHEL 7: the crash path is named
        assert "no confirmed check" in risks and "reply tuple of a hashed entry" in risks
        assert "rewrite the reply tuple" in (outs[generation] / "advance-confirm/advance_confirm.c").read_text() or (
            "nf_conntrack_alter_reply() on an entry already in the hash table"
            in (outs[generation] / "advance-confirm/advance_confirm.c").read_text()
        )
    else:
        assert "silently not be NATed" in risks


# --- item 6: stop-hook on G1 -------------------------------------------------------------------------------------


def _skips_helpers(out: Path, strategy: str) -> bool:
    pre = body(out / strategy / "nq_confirm.c", r"\bbool\s+nq_preconfirm")
    return "nfct_help(" in pre or "IPS_SEQ_ADJUST_BIT" in pre


@pytest.mark.parametrize("generation", sorted(CASES))
def test_preconfirm_skips_helpers_only_where_they_have_not_run(outs: dict[str, Path], generation: str) -> None:
    out = outs[generation]
    profile = json.loads((out / "profile.json").read_text())["features"]
    if (out / "stop-hook").is_dir() and not profile["nf_stop_honoured"]:
        stop_c = (out / "stop-hook" / "stop_hook.c").read_text()
        assert "nq_preconfirm(" in stop_c
        # G1: the helper hook (300) ran before, seqadj is applied to confirmed entries: pre-confirm them all
        assert _skips_helpers(out, "stop-hook") == (profile["confirm_generation"] != "G1")
        notes = " ".join(comparison(out, "stop-hook")["risks"])  # type: ignore[arg-type]
        assert ("every entry is pre-confirmed" in notes) == (profile["confirm_generation"] == "G1")
    if (out / "advance-confirm-corrected").is_dir():  # at NF_IP_PRI_FIRST: before the helper hook, everywhere
        assert _skips_helpers(out, "advance-confirm-corrected")


# --- item 8: RHEL 7's nf_conntrack_ipv6 is optional --------------------------------------------------------------


RESOLVING = ("advance-confirm", "ftrace", "hook-swap")


@pytest.mark.parametrize("strategy", RESOLVING)
def test_rhel7_ipv6_target_is_optional_and_attached_by_a_module_notifier(rhel7_both: Path, strategy: str) -> None:
    sdir = rhel7_both / strategy
    resolve = (sdir / "nq_resolve.c").read_text()
    assert re.search(r'\.module = "nf_conntrack_ipv4",\s*\.optional = false', resolve)
    assert re.search(r'\.module = "nf_conntrack_ipv6",\s*\.optional = true', resolve)
    assert "register_module_notifier(&nq_module_nb)" in resolve
    event = body(sdir / "nq_resolve.c", r"\bstatic\s+int\s+nq_module_event")
    assert "MODULE_STATE_LIVE" in event and "nq_find(" in event and "nq_publish(" in event
    # a missing optional target does not make the load fail; a missing mandatory one does
    resolve_fn = body(sdir / "nq_resolve.c", r"\bint\s+nq_resolve_targets")
    assert "t->optional" in resolve_fn and "-ENOENT" in resolve_fn
    row = comparison(rhel7_both, strategy)
    assert any("attaches to it (module notifier)" in r for r in row["risks"])  # type: ignore[union-attr]
    if strategy == "advance-confirm":
        hook = body(sdir / "advance_confirm.c", r"\bstatic\s+unsigned\s+int\s+nq_advance_ipv6")
        assert "if (!orig)" in hook and "no_target" in hook
        assert "no_target" in json.loads((sdir / "nqgen-module.json").read_text())["counters"]
    if strategy == "ftrace":  # late targets get their filter, and none is attached during unload
        main = (sdir / "ftrace_main.c").read_text()
        init = body(sdir / "ftrace_main.c", r"\bstatic\s+int\s+__init\s+nq_init")
        assert init.index("nq_resolve_on_attach(") < init.index("nq_resolve_targets(")
        assert "nq_resolve_start();" in init
        assert "nq_resolve_stop();" in body(sdir / "ftrace_main.c", r"\bstatic\s+void\s+__exit\s+nq_exit")
        assert "ftrace_set_filter_ip(&nq_ftrace_ops, t->addr, 0, 0)" in main


def test_targets_in_one_module_stay_mandatory(outs: dict[str, Path]) -> None:
    for generation in ("rhel8.3", "5.10", "6.12"):
        resolve = (outs[generation] / "advance-confirm" / "nq_resolve.c").read_text()
        assert ".optional = true" not in resolve and "register_module_notifier" not in resolve


# --- smaller findings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", sorted(CASES))
def test_no_symbol_buffers_on_the_stack(outs: dict[str, Path], generation: str) -> None:
    for path in outs[generation].glob("*/nq_resolve.c"):
        code = clean_source(path.read_text())
        for m in re.finditer(r"^(?:static\s+)?\w[\w\s\*]*\b(\w+)\s*\([^;{]*\)\s*\{", code, re.M):
            fn = function_body(code, re.escape(m[0][: m[0].index("(")].strip().split()[-1]))
            assert fn is None or not re.search(r"\bchar\s+\w+\s*\[\s*KSYM_(SYMBOL|NAME)_LEN", fn), (path, m[1])


@pytest.mark.parametrize("generation", sorted(CASES))
def test_advance_confirm_walks_ipv6_extension_headers(outs: dict[str, Path], generation: str) -> None:
    for strategy in ADVANCE:
        src = outs[generation] / strategy / "advance_confirm.c"
        if not src.is_file() or "nq_advance_ipv6(" not in src.read_text():
            continue
        hook = body(src, r"\bstatic\s+unsigned\s+int\s+nq_advance_ipv6")
        assert "nexthdr != IPPROTO_UDP" not in hook and "nq_ipv6_is_udp(skb)" in hook
        assert "ipv6_skip_exthdr(" in body(src, r"\bstatic\s+bool\s+nq_ipv6_is_udp")


@pytest.mark.parametrize("generation", sorted(CASES))
def test_corrected_covers_what_it_hooks_and_names_every_export(outs: dict[str, Path], generation: str) -> None:
    out = outs[generation]
    if not (out / "advance-confirm-corrected").is_dir():
        pytest.skip("not emitted")
    row = comparison(out, "advance-confirm-corrected")
    families = json.loads((out / "advance-confirm-corrected" / "nqgen-module.json").read_text())["families"]
    assert sorted(row["covers"]) == sorted(families)  # type: ignore[arg-type]
    assert "nf_ct_seq_adjust" in str(row["needs"])


@pytest.mark.parametrize("generation", sorted(CASES))
def test_unload_effect_on_queued_packets_is_stated(outs: dict[str, Path], generation: str) -> None:
    out = outs[generation]
    registration = json.loads((out / "profile.json").read_text())["features"]["registration"]
    for strategy in ADVANCE:
        if not (out / strategy).is_dir():
            continue
        risks = " ".join(comparison(out, strategy)["risks"])  # type: ignore[arg-type]
        desc = re.search(r'MODULE_PARM_DESC\(queues, "([^"]+)"', (out / strategy / "advance_confirm.c").read_text())
        assert desc is not None
        if registration == "pernet":
            assert "ANY NFQUEUE queue" in risks and "ANY NFQUEUE queue" in desc[1]
        else:
            assert "rmmod is refused" in risks and "rmmod is refused" in desc[1]
