"""The lab on 3.10/4.18 kernels: the guest modules' API decisions, the stale-use detector, and the messages.

Offline parts read the real RHEL 7.7 and RHEL 8.1 headers from their source snapshots when present (skipped with
the reason otherwise) and compile the guest modules for real against the installed Debian headers; boots on the
RHEL kernels themselves are in test_repro.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import DebianKernel
from elffixtures import build_module as build_fixture
from nqgen import compare, strategies
from nqgen.errors import EXIT_LAB
from nqgen.lab import guestapi
from nqgen.lab.build import DETECTOR_MODULE, HELPER_MODULE, build_detector, build_helper, guest_source
from nqgen.lab.guest import DETECTOR_COUNTS, GuestModule, GuestPlan, Workload, render_init
from nqgen.lab.results import RunResult, apply_results
from nqgen.probe import ProfileInputs, build_profile
from nqgen.reprotable import judge, markdown, merge, summarize

HEADERS = Path(__file__).parent / "fixtures" / "headers"
# (bare git dir, commit) of the RHEL snapshots named in the issue; only read, never copied into the repository
RHEL_TREES = {
    "rhel77": (Path("/work/.mirror/dcui+RHEL77/repo"), "HEAD"),
    "rhel81": (Path("/work/.mirror/cai-fuqiang+linux-4.18.0-147/repo"), "17d780554"),
}
API_FILES = (
    "Makefile",
    "include/linux/netfilter.h",
    "include/linux/skbuff.h",
    "include/linux/ftrace.h",
    "include/net/netfilter/nf_conntrack_core.h",
    "include/net/netfilter/nf_conntrack.h",
    "include/net/netfilter/nf_conntrack_ecache.h",
    "include/linux/netfilter/nf_conntrack_common.h",
)


def _rhel_headers(name: str, dest: Path) -> Path:
    gitdir, commit = RHEL_TREES[name]
    if not gitdir.is_dir() or shutil.which("git") is None:
        pytest.skip(f"the {name} source snapshot is not here ({gitdir})")
    for rel in API_FILES:
        proc = subprocess.run(["git", f"--git-dir={gitdir}", "show", f"{commit}:{rel}"], capture_output=True,
                              check=False)
        if proc.returncode == 0:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(proc.stdout)
    return dest



def test_rhel77_helper_uses_global_hooks_without_netns_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    api = guestapi.decide(_rhel_headers("rhel77", tmp_path / "rhel77"))
    assert api.cflags() == ["-DNQLAB_HOOK_OPS_STATE", "-DNQLAB_GLOBAL_HOOKS", "-DNQLAB_OPS_OWNER"]
    assert "does not declare nf_ct_netns_get" in api.evidence["ct_netns_get"]
    assert api.evidence["ct_refcount_t"].endswith("{ atomic_t use; }")
    assert api.detector, api.detector_reason  # nf_ct_deliver_cached_events is out of line on 3.10


def test_rhel81_helper_uses_pernet_hooks_and_netns_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    api = guestapi.decide(_rhel_headers("rhel81", tmp_path / "rhel81"))
    assert api.cflags() == ["-DNQLAB_HOOK_PRIV_STATE", "-DNQLAB_CT_NETNS_GET"]
    assert api.detector, api.detector_reason


def test_detector_needs_kprobes_in_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tree = _rhel_headers("rhel77", tmp_path / "rhel77")
    (tree / ".config").write_text("CONFIG_KPROBES=y\n# CONFIG_KRETPROBES is not set\nCONFIG_NF_CONNTRACK_EVENTS=y\n")
    api = guestapi.decide(tree)
    assert not api.detector and "lacks CONFIG_KRETPROBES" in (api.detector_reason or "")


def test_guest_modules_compile_against_debian_without_warnings(debian: DebianKernel, tmp_path: Path) -> None:
    kdir = debian.kdir
    api = guestapi.decide(kdir)
    # 6.1: refcount_t, nf_ct_deliver_cached_events out of line (exported from nf_conntrack.ko)
    assert "-DNQLAB_CT_REFCOUNT_T" in api.cflags() and api.detector, api.detector_reason
    helper = build_helper(kdir, tmp_path / "helper", api)
    detector = build_detector(kdir, tmp_path / "detector", api)
    assert "KASAN_SANITIZE_nqlab_detect.o := n" in (tmp_path / "detector" / "Kbuild").read_text()
    for ko in (helper, detector):
        (ko.parent / f"{ko.stem}.c").touch()
        proc = subprocess.run(["make", "-C", str(kdir), f"M={ko.parent}", "W=1", "modules"],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not re.search(r"\bwarning:", proc.stdout + proc.stderr), proc.stderr[-2000:]


def test_guest_sources_carry_every_api_branch() -> None:
    helper = guest_source(f"{HELPER_MODULE}.c")
    for flag in ("NQLAB_HOOK_PRIV_STATE", "NQLAB_HOOK_OPS_STATE", "NQLAB_GLOBAL_HOOKS", "NQLAB_OPS_OWNER",
                 "NQLAB_CT_NETNS_GET"):
        assert flag in helper
    assert "nf_register_hooks(" in helper and "nf_register_net_hooks(" in helper
    detector = guest_source(f"{DETECTOR_MODULE}.c")
    assert '"__nf_conntrack_confirm"' in detector and '"nf_ct_deliver_cached_events"' in detector


def _plan(detector: bool) -> GuestPlan:
    return GuestPlan(
        run="baseline", deps=(), helper=GuestModule("nqlab_ct", "/nqlab/nqlab_ct.ko", "helper", ("queue=-1",)),
        mitigation=None, workload=Workload(rounds=10),
        detector=GuestModule("nqlab_detect", "/nqlab/nqlab_detect.ko", "detector", (), True) if detector else None,
    )


def test_init_loads_the_detector_and_reports_its_counts() -> None:
    script = render_init(_plan(True))
    assert "load detector nqlab_detect /nqlab/nqlab_detect.ko true && DET=1" in script
    assert DETECTOR_COUNTS in script
    for phase in ("before", "workload", "end"):
        assert f"detector {phase}\n" in script
    assert "load detector" not in render_init(_plan(False))
    if shutil.which("sh"):
        assert subprocess.run(["sh", "-n"], input=script, text=True, check=False).returncode == 0


def _lines(stale: int, clashes: int, completed: bool = True) -> str:
    recs: list[dict[str, object]] = [
        {"type": "insmod", "role": "detector", "module": "nqlab_detect", "optional": True, "rc": 0, "uptime": 1.0},
        {"type": "detector", "phase": "before",
         "counts": {"clashes": [0, 0], "stale": [0, 0], "loser": [0, 0], "calls": 0, "missed": 0}},
        {"type": "detector", "phase": "workload",
         "counts": {"clashes": [clashes, 1], "stale": [stale, 0], "loser": [stale, 0], "calls": 900, "missed": 0}},
        {"type": "detector", "phase": "end",
         "counts": {"clashes": [clashes, 1], "stale": [stale, 0], "loser": [stale, 0], "calls": 1000, "missed": 0}},
    ]
    if completed:
        recs.append({"type": "done", "code": 0})
    return "\n".join(json.dumps(r) for r in recs)


def test_a_stale_use_is_a_fault_like_a_kernel_report() -> None:
    run = RunResult(name="ftrace", kind="mitigation", strategy="ftrace", module="nq_ftrace", nfqueue=False)
    apply_results(run, _lines(stale=3, clashes=40))
    assert run.detector_loaded and run.stale_uses == 3 and run.detector_clashes == 41
    assert run.stale_by_family == {"ipv4": 3, "ipv6": 0}
    assert run.verdict == "fault"
    assert "3 stale use(s) of released conntrack entries (nqlab_detect)" in run.problems
    clean = RunResult(name="baseline", kind="baseline", strategy=None, module=None, nfqueue=False)
    apply_results(clean, _lines(stale=0, clashes=40))
    assert clean.stale_uses == 0 and "stale" not in " ".join(clean.problems)


def test_refused_detector_is_a_problem_of_the_run() -> None:
    run = RunResult(name="baseline", kind="baseline", strategy=None, module=None, nfqueue=False)
    line = {"type": "insmod", "role": "detector", "module": "nqlab_detect", "optional": True, "rc": 1}
    apply_results(run, json.dumps(line) + '\n{"type":"done","code":0}')
    assert run.detector_loaded is False and run.stale_uses is None
    assert any(p.startswith("detector nqlab_detect refused") for p in run.problems)


def _run_dict(name: str, strategy: str | None, stale: int, corrected: int | None, kasan: int = 0) -> dict[str, object]:
    kind = "baseline" if strategy is None else "mitigation"
    run = RunResult(name=name, kind=kind, strategy=strategy, module=strategy, nfqueue=False,
                    corrected_counter="corrected" if corrected is not None else None)
    apply_results(run, _lines(stale=stale, clashes=50))
    if corrected is not None:
        run.counters["workload"] = {"corrected": corrected}
    d = run.to_dict()
    d["faults"] = [{"kind": "KASAN", "title": "BUG: KASAN: use-after-free in nf_confirm", "phase": "workload",
                    "frames": []}] * kasan
    return d


def test_comparison_counts_stale_uses_as_evidence_and_judges_the_replacing_strategies() -> None:
    lab: dict[str, object] = {
        "workload": {"flows": 1000, "rounds": 500, "threads": 2, "families": ["ipv4", "ipv6"], "queue_delay_us": 200},
        "kernel": {"release": "3.10.0-dexuan", "kasan": False}, "vm": {"smp": 2, "memory": "1G"}, "repeat": 1,
        "date": "2026-12-01T14:00:00+00:00", "machine": {}, "guest": {"detector": True},
        "runs": [_run_dict("baseline", None, 30, None), _run_dict("ftrace", "ftrace", 0, 2000),
                 _run_dict("livepatch", "livepatch", 2, 2000)],
    }
    summaries = summarize(lab)
    base, ftrace, livepatch = summaries
    assert livepatch.stale == 2
    assert (base.stale, base.boots_with_evidence, base.clashres, base.clash_source) == (30, 1, [51], "detector")
    assert (ftrace.stale, ftrace.corrected) == (0, [2000])
    problems = judge(summaries)
    assert problems == ["livepatch: 2 stale use(s) of released conntrack entries"]
    text = markdown(summaries, lab, problems, "Reproduction on RHEL 7.7")
    assert "| no mitigation | no | 1 | 1 | 30 | 0 | 51 | - | 0 | 0 | 0/0 | none |" in text
    assert "| ftrace | no | 1 | 0 | 0 | 0 | 51 | 2000 | 0 | 0 |" in text
    assert "nqlab_detect" in text and "**Unexpected:**" in text
    assert "- baseline: 30 stale use(s) over 1 boot(s) (ipv4 30, ipv6 0)" in text
    lab["runs"] = [_run_dict("baseline", None, 0, None)]
    assert judge(summarize(lab))[0].startswith("no baseline showed the bug")
    lab["runs"] = [_run_dict("baseline", None, 0, None, kasan=2)]
    assert judge(summarize(lab)) == []  # a KASAN report is evidence just as well


NULL_DEREF_PANIC = """\
[   12.500000] BUG: unable to handle kernel NULL pointer dereference at 0000000000000010
[   12.500100] IP: [<ffffffffa0101234>] nf_ct_deliver_cached_events+0x28/0x110 [nf_conntrack]
[   12.500200] Oops: 0000 [#1] SMP
[   12.500300] Call Trace:
[   12.500400]  [<ffffffffa0202345>] ipv6_confirm+0x95/0x140 [nf_conntrack_ipv6]
[   12.500500]  [<ffffffff81234567>] nf_reinject+0x77/0x1a0
[   12.500600] ---[ end trace 1234567890abcdef ]---
[   12.500700] Kernel panic - not syncing: Fatal exception in interrupt
"""


def test_a_panicked_boot_is_counted_and_a_replacing_strategy_that_died_is_not_a_pass() -> None:
    """3.10 with IPv6 through NFQUEUE panicked the baseline in 3 of 11 boots: the table counts the panic, the run
    goes on, and a strategy boot that never finished cannot pass as a clean one."""
    from nqgen.lab.results import find_faults, find_panic

    assert find_panic(NULL_DEREF_PANIC) == "Kernel panic - not syncing: Fatal exception in interrupt"
    assert find_panic("[    1.0] all well\n") == ""
    faults = find_faults(NULL_DEREF_PANIC)
    assert [f.kind for f in faults] == ["BUG"]  # the panic line closes the report; find_panic keeps it apart

    def died(name: str, strategy: str | None, panic: bool) -> dict[str, object]:
        run = RunResult(name=name, kind="baseline" if strategy is None else "mitigation", strategy=strategy,
                        module=strategy, nfqueue=True, timed_out=not panic,
                        panic="Kernel panic - not syncing: Fatal exception in interrupt" if panic else "")
        before = _lines(stale=0, clashes=0, completed=False).splitlines()[:2]  # died before the workload count
        apply_results(run, "\n".join(before))
        run.uptime = {"boot": 2.0, "before": 5.0}  # init ran: the panic came in the workload
        run.set_faults(find_faults(NULL_DEREF_PANIC) if panic else [])
        return run.to_dict()

    lab: dict[str, object] = {
        "workload": {"flows": 1000, "rounds": 500, "threads": 2, "families": ["ipv4", "ipv6"], "queue_delay_us": 200},
        "kernel": {"release": "3.10.0-dexuan", "kasan": False}, "vm": {"smp": 2, "memory": "1G"}, "repeat": 2,
        "date": "d", "machine": {}, "guest": {"detector": True},
        "runs": [died("baseline-nfqueue", None, True), _run_dict("baseline-nfqueue", None, 980, None),
                 _run_dict("ftrace", "ftrace", 0, 4000), died("ftrace", "ftrace", False)],
    }
    base, ftrace = summarize(lab)
    assert (base.boots, base.panics, base.died, base.boots_with_evidence, base.reports) == (2, 1, 1, 2, 1)
    assert (ftrace.died, ftrace.timeouts, ftrace.panics) == (1, 1, 0)
    assert judge([base, ftrace]) == ["ftrace: 1 boot(s) did not finish (0 panic(s), 1 timeout(s))"]
    text = markdown([base, ftrace], lab, [], "RHEL 7.7")
    # the panicked boot's stale uses and clashes were never counted: its report is the evidence
    assert "| no mitigation | yes | 2 | 2 | 980 (980) | 1 (1/0) | 51 (51) | - | 1 | 1 (1 panic) |" in text
    assert "| ftrace | no | 2 | 0 | 0 (0) | 0 (0/0) | 51 (51) | 4000 (4000) | 0 | 1 (1 timeout) |" in text


def test_livepatch_transition_and_clash_free_nfqueue_rows_are_said_as_measured() -> None:
    livepatch = RunResult(name="livepatch", kind="mitigation", strategy="livepatch", module="nq_livepatch",
                          nfqueue=False, corrected_counter="corrected")
    apply_results(livepatch, _lines(stale=0, clashes=30) + "\n" + json.dumps(
        {"type": "livepatch", "enabled": "1", "transition": "1", "waited_ms": 30000}))
    livepatch.counters["workload"] = {"corrected": 4000}
    queued = _run_dict("ftrace+nfqueue", "ftrace", 0, 4000)
    queued["nfqueue"] = True
    queued["derived"]["detector_clashes"] = 0  # type: ignore[index]
    lab: dict[str, object] = {
        "workload": {"flows": 1000, "rounds": 500, "threads": 2, "families": ["ipv4", "ipv6"], "queue_delay_us": 200},
        "kernel": {"release": "4.18.0-nqgen-rhel81", "kasan": True}, "vm": {"smp": 2, "memory": "1G"}, "repeat": 1,
        "date": "d", "machine": {}, "guest": {"detector": True}, "runs": [livepatch.to_dict(), queued],
    }
    summaries = summarize(lab)
    assert summaries[0].transition_pending == 1
    text = markdown(summaries, lab, judge(summaries, need_baseline=False), "RHEL 8.1")
    assert "livepatch enable transition was still in progress (`transition` 1) when the lab's wait ended (30 s)" \
        " in 1 of 1 boot(s)" in text
    assert "- ftrace+nfqueue: no clash reached the confirm with every packet queued" in text
    assert "livepatch not fully applied" not in text  # the transition line says it
    # unqueued, a replacing strategy that saw no clash has not shown anything
    quiet = _run_dict("stop-hook", "stop-hook", 0, 4000)
    quiet["derived"]["detector_clashes"] = 0  # type: ignore[index]
    lab["runs"] = [quiet]
    assert judge(summarize(lab), need_baseline=False) == [
        "stop-hook: no clash in 1 boot(s): the race was not exercised"]


def test_boots_of_later_runs_pool_with_earlier_ones_and_short_forms_need_no_baseline() -> None:
    def lab(date: str, runs: list[dict[str, object]], release: str = "4.18.0-nqgen-rhel81") -> dict[str, object]:
        return {"workload": {"flows": 1000, "rounds": 500, "threads": 2, "families": ["ipv4", "ipv6"],
                             "queue_delay_us": 200},
                "kernel": {"release": release, "kasan": True}, "vm": {"smp": 2, "memory": "1G"}, "repeat": 1,
                "date": date, "machine": {}, "guest": {"detector": True}, "runs": runs}

    first = lab("d1", [_run_dict("baseline", None, 40, None), _run_dict("ftrace", "ftrace", 0, 4000)])
    second = lab("d2", [_run_dict("ftrace", "ftrace", 0, 4000), _run_dict("ftrace", "ftrace", 0, 4000)])
    merged = merge([first, second])
    summaries = summarize(merged)
    assert [(s.name, s.boots) for s in summaries] == [("baseline", 1), ("ftrace", 3)]
    assert judge(summaries) == []
    text = markdown(summaries, merged, [], "RHEL 8.1")
    assert "| ftrace | no | 3 | 0 |" in text and "d1; d2" in text
    with pytest.raises(ValueError, match="different kernel"):
        merge([first, lab("d3", [], release="3.10.0")])
    # a short form without baselines: nothing asks a baseline for the bug, and the text does not claim one
    short = summarize(second)
    assert judge(short) == ["no baseline showed the bug (no kernel report, no stale use): the kernel may not be"
                            " vulnerable"]
    assert judge(short, need_baseline=False) == []
    assert "No baseline was booted" in markdown(short, second, [], "RHEL 8.1")


def test_rhel7_messages_name_each_object_and_the_global_hook_table(tmp_path: Path) -> None:
    v4 = build_fixture(tmp_path, "nf_conntrack_ipv4_rhel7.c", "nf_conntrack_ipv4.ko")
    v6 = build_fixture(tmp_path, "nf_hook_ops_layouts.c", "nf_conntrack_ipv6.ko", ["-DLAYOUT=2"])
    profile = build_profile(ProfileInputs(kdir=HEADERS / "rhel7.9", modules=[v4, v6]))
    assert profile.features.registration == "global"
    results = {s.name: s.check(profile) for s in strategies.STRATEGIES}
    assert results["livepatch"].reason == (
        "replaces ipv4_confirm in object nf_conntrack_ipv4; ipv6_confirm in object nf_conntrack_ipv6"
    )
    rows = {r["strategy"]: r for r in compare.static_rows(profile, results)}
    for name in ("advance-confirm", "advance-confirm-corrected", "hook-swap", "stop-hook"):
        text = rows[name]["touches"] + " " + rows[name]["undo"]
        assert "in every netns" not in text and "pernet" not in text, name
        assert "global hook table" in rows[name]["touches"], name
    assert rows["advance-confirm"]["undo"] == (
        "unregisters its hooks (global) and waits for packets in flight (packets held in NFQUEUE: see its notes)"
    )


def test_pernet_kernels_keep_the_per_netns_wording(debian: DebianKernel) -> None:
    profile = build_profile(ProfileInputs(kdir=debian.kdir, modules=[debian.nf_conntrack]))
    results = {s.name: s.check(profile) for s in strategies.STRATEGIES}
    rows = {r["strategy"]: r for r in compare.static_rows(profile, results)}
    assert "in every netns" in rows["stop-hook"]["touches"]
    assert results["livepatch"].reason.endswith("in object nf_conntrack")


# A module that makes one event delivery on an entry whose refcount is 0, safely: a freshly allocated entry
# (use 0 until it is attached to a packet) without an extension area, so nf_ct_deliver_cached_events() finds no
# event cache and returns; then it is freed. The detector must count exactly this one stale use.
STALE_ONCE_MODULE = r"""
#include <linux/module.h>
#include <net/net_namespace.h>
#include <net/netfilter/nf_conntrack.h>
#include <net/netfilter/nf_conntrack_ecache.h>
#include <net/netfilter/nf_conntrack_zones.h>

static int __init nqtest_stale_init(void)
{
	struct nf_conntrack_tuple tuple = { .src.l3num = NFPROTO_IPV4, .dst.protonum = IPPROTO_UDP };
	struct nf_conn *ct;

	ct = nf_conntrack_alloc(&init_net, &nf_ct_zone_dflt, &tuple, &tuple, GFP_KERNEL);
	if (IS_ERR(ct))
		return PTR_ERR(ct);
	nf_ct_deliver_cached_events(ct);
	nf_conntrack_free(ct);
	return 0;
}

static void __exit nqtest_stale_exit(void)
{
}

module_init(nqtest_stale_init);
module_exit(nqtest_stale_exit);
MODULE_LICENSE("GPL");
"""


@pytest.mark.vm
def test_detector_counts_a_delivery_to_a_released_entry_on_the_debian_kernel(
    debian: DebianKernel, tmp_path: Path
) -> None:
    from test_lab import _lab, _module_out, needs_vm

    if needs_vm.args[0]:
        pytest.skip(needs_vm.kwargs["reason"])
    out = tmp_path / "out"
    _module_out(out, "stale-once", "nqtest_stale", STALE_ONCE_MODULE, debian.kdir, [])
    proc = _lab(out, "--rounds", "20", "--no-baselines")
    assert proc.returncode == EXIT_LAB, proc.stderr  # a stale use fails a mitigation like a kernel report
    (run,) = json.loads((out / "lab.json").read_text())["runs"]
    d = run["derived"]
    assert d["loaded"] and d["detector_loaded"] and d["fault_count"] == 0
    assert (d["stale_uses"], d["stale_by_family"]) == (1, {"ipv4": 1, "ipv6": 0})
    assert d["verdict"] == "fault" and "1 stale use(s) of released conntrack entries (nqlab_detect)" in d["problems"]
    assert "nqlab_detect: stale use: nf_ct_deliver_cached_events() on a released ipv4 entry" in run["kernel_log"]
