"""Tests of the VM lab: parsers and the initramfs offline, and real boots of the Debian kernel under qemu (``vm``)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nqgen.errors import EXIT_LAB, InputError
from nqgen.generate import OUT_MARKER
from nqgen.lab.build import build_module, build_programs
from nqgen.lab.guest import GuestModule, GuestPlan, Workload, render_init
from nqgen.lab.initramfs import Cpio
from nqgen.lab.kernel import image_release, resolve_image
from nqgen.lab.manifest import Manifest, discover
from nqgen.lab.modtree import ModuleTree
from nqgen.lab.report import ROW_COLUMNS, measured_columns, measured_markdown, rows
from nqgen.lab.results import RunResult, apply_results, find_faults, parse_ct_stat
from nqgen.lab.runner import plan_runs


def _debian_kernel() -> tuple[Path, Path, Path] | None:
    """(image, modules tree, kdir) of an installed Debian kernel with headers, newest first."""
    for image in sorted(Path("/boot").glob("vmlinuz-*-amd64"), reverse=True):
        release = image.name[len("vmlinuz-") :]
        tree = Path("/lib/modules") / release
        if (tree / "modules.dep").is_file() and (tree / "build" / "Makefile").is_file():
            return image, tree, tree / "build"
    return None


DEBIAN = _debian_kernel()
needs_vm = pytest.mark.skipif(
    DEBIAN is None or shutil.which("qemu-system-x86_64") is None or not Path("/bin/busybox").is_file(),
    reason="needs qemu-system-x86_64, busybox-static and a Debian kernel with headers",
)

# A module following the manifest contract: counts UDP packets seen at POST_ROUTING in
# /sys/kernel/nqtest_count/hook_calls.
COUNTING_MODULE = r"""
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/kobject.h>
#include <linux/module.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/sysfs.h>
#include <net/net_namespace.h>

static atomic64_t nqtest_calls;
static struct kobject *nqtest_kobj;

static unsigned int nqtest_hook(void *priv, struct sk_buff *skb, const struct nf_hook_state *state)
{
	if (ip_hdr(skb)->protocol == IPPROTO_UDP)
		atomic64_inc(&nqtest_calls);
	return NF_ACCEPT;
}

static const struct nf_hook_ops nqtest_ops = {
	.hook = nqtest_hook, .pf = NFPROTO_IPV4, .hooknum = NF_INET_POST_ROUTING, .priority = NF_IP_PRI_FIRST,
};

static ssize_t hook_calls_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	return sysfs_emit(buf, "%lld\n", (long long)atomic64_read(&nqtest_calls));
}

static struct kobj_attribute nqtest_attr = __ATTR_RO(hook_calls);

static int __init nqtest_init(void)
{
	int ret;

	nqtest_kobj = kobject_create_and_add("nqtest_count", kernel_kobj);
	if (!nqtest_kobj)
		return -ENOMEM;
	ret = sysfs_create_file(nqtest_kobj, &nqtest_attr.attr);
	if (!ret)
		ret = nf_register_net_hook(&init_net, &nqtest_ops);
	if (ret)
		kobject_put(nqtest_kobj);
	return ret;
}

static void __exit nqtest_exit(void)
{
	nf_unregister_net_hook(&init_net, &nqtest_ops);
	kobject_put(nqtest_kobj);
}

module_init(nqtest_init);
module_exit(nqtest_exit);
MODULE_LICENSE("GPL");
"""

# A deliberately broken module: its hook writes through a NULL pointer on the first UDP packet.
BROKEN_MODULE = r"""
#include <linux/ip.h>
#include <linux/module.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <net/net_namespace.h>

static int *nqbroken_ptr;

static unsigned int nqbroken_hook(void *priv, struct sk_buff *skb, const struct nf_hook_state *state)
{
	if (ip_hdr(skb)->protocol == IPPROTO_UDP)
		WRITE_ONCE(*nqbroken_ptr, 1);
	return NF_ACCEPT;
}

static const struct nf_hook_ops nqbroken_ops = {
	.hook = nqbroken_hook, .pf = NFPROTO_IPV4, .hooknum = NF_INET_POST_ROUTING, .priority = NF_IP_PRI_FIRST,
};

static int __init nqbroken_init(void)
{
	return nf_register_net_hook(&init_net, &nqbroken_ops);
}

static void __exit nqbroken_exit(void)
{
	nf_unregister_net_hook(&init_net, &nqbroken_ops);
}

module_init(nqbroken_init);
module_exit(nqbroken_exit);
MODULE_LICENSE("GPL");
"""


# A livepatch following the manifest contract (unload: disable through sysfs, wait, rmmod).
LIVEPATCH_MODULE = r"""
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/module.h>
#include <linux/seq_file.h>

static int nqtest_lp_cmdline_show(struct seq_file *m, void *v)
{
	seq_puts(m, "nqtest livepatched\n");
	return 0;
}

static struct klp_func nqtest_lp_funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = nqtest_lp_cmdline_show, },
	{ }
};

static struct klp_object nqtest_lp_objs[] = {
	{ .funcs = nqtest_lp_funcs, },
	{ }
};

static struct klp_patch nqtest_lp_patch = {
	.mod = THIS_MODULE,
	.objs = nqtest_lp_objs,
};

static int __init nqtest_lp_init(void)
{
	return klp_enable_patch(&nqtest_lp_patch);
}

static void __exit nqtest_lp_exit(void)
{
}

module_init(nqtest_lp_init);
module_exit(nqtest_lp_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
"""


def _module_out(
    out: Path, strategy: str, name: str, source: str, kdir: Path, counters: list[str], unload: str = "rmmod"
) -> None:
    """Build ``source`` as out/<strategy>/<name>.ko with its nqgen-module.json (and out/ marked as nqgen's)."""
    ko = build_module(source, name, kdir, out / strategy / "build")
    (out / OUT_MARKER).write_text("laid out by tests/test_lab.py as nqgen lays out a generated tree\n")
    (out / strategy / f"{name}.ko").write_bytes(ko.read_bytes())
    manifest: dict[str, object] = {
        "strategy": strategy,
        "module": name,
        "ko": f"{name}.ko",
        "params": {},
        "stats_dir": f"/sys/kernel/{name}" if counters else None,
        "counters": counters,
        "corrected_counter": counters[0] if counters else None,
        "unload": unload,
        "livepatch_sysfs": f"/sys/kernel/livepatch/{name}" if unload == "livepatch" else None,
        "queues": None,
        "families": ["ipv4"],
        "notes": "lab test module",
    }
    (out / strategy / "nqgen-module.json").write_text(json.dumps(manifest))


def _lab(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert DEBIAN is not None
    image, tree, kdir = DEBIAN
    cmd = [sys.executable, "-m", "nqgen", "lab", "--out", str(out), "--kernel", str(image)]
    cmd += ["--modules-dir", str(tree), "--kdir", str(kdir), "--timeout", "150", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)


# ---- offline -------------------------------------------------------------------------------------


def test_ct_stat_sums_per_cpu_hex_rows() -> None:
    text = (
        "entries  clashres found new invalid ignore delete delete_list insert insert_failed drop\n"
        "00000005  00000011 00000000 00000000 00000000 00000000 00000000 00000000 0000000a 00000001 00000002\n"
        "00000005  00000021 00000000 00000000 00000000 00000000 00000000 00000000 0000000b 00000000 00000003\n"
    )
    stat = parse_ct_stat(text)
    assert stat["clashres"] == 0x11 + 0x21
    assert stat["insert_failed"] == 1
    assert stat["drop"] == 5
    assert stat["entries"] == 5


CONSOLE_OOPS = """\
[    9.100000] nqbroken: loading out-of-tree module taints kernel.
[    9.200000] BUG: kernel NULL pointer dereference, address: 0000000000000000
[    9.200001] #PF: supervisor write access in kernel mode
[    9.200002] Oops: 0002 [#1] PREEMPT SMP NOPTI
[    9.200003] RIP: 0010:nqbroken_hook+0x11/0x20 [nqbroken]
[    9.200004] Call Trace:
[    9.200005]  <TASK>
[    9.200006]  nf_hook_slow+0x41/0xc0
[    9.200007]  ? ip_finish_output+0x10/0x10
[    9.200008]  ip_output+0x6f/0x100
[    9.200009]  </TASK>
[    9.200010] ---[ end trace 0000000000000000 ]---
[    9.200011] Kernel panic - not syncing: Fatal exception in interrupt
"""


def test_find_faults_keeps_oops_text_title_and_frames() -> None:
    faults = find_faults(CONSOLE_OOPS)
    assert len(faults) == 1
    f = faults[0]
    assert f.kind == "BUG"
    assert f.title == "BUG: kernel NULL pointer dereference, address: 0000000000000000"
    assert "Oops: 0002" in f.text and "end trace" in f.text
    assert f.frames[:3] == ["nqbroken_hook+0x11/0x20 [nqbroken]", "nf_hook_slow+0x41/0xc0", "ip_output+0x6f/0x100"]
    assert find_faults("[    1.0] nf_conntrack: default automatic helper assignment has been turned off\n") == []


KASAN_REPORT = """\
[   30.100000] ==================================================================
[   30.100001] BUG: KASAN: use-after-free in nf_confirm+0x406/0x430 [nf_conntrack]
[   30.100002] Read of size 8 at addr ffff888005a1b2c0 by task nq_udprace/140
[   30.100003] Call Trace:
[   30.100004]  <TASK>
[   30.100005]  dump_stack_lvl+0x45/0x5d
[   30.100006]  print_report+0x16f/0x470
[   30.100007]  ? nf_confirm+0x406/0x430 [nf_conntrack]
[   30.100008]  kasan_report+0xb0/0xe0
[   30.100009]  nf_confirm+0x406/0x430 [nf_conntrack]
[   30.100010]  nf_hook_slow+0x64/0x100
[   30.100011]  </TASK>
[   30.100012] Allocated by task 139:
[   30.100013]  __nf_conntrack_alloc+0x5b/0x2b0 [nf_conntrack]
[   30.100014] ==================================================================
[   31.000000] WARNING: CPU: 1 PID: 5 at net/netfilter/core.c:600 nf_hook_slow+0x99/0xc0
[   31.000001] ---[ end trace 0000000000000000 ]---
"""


def test_find_faults_splits_kasan_and_warning_reports_and_skips_reporting_frames() -> None:
    faults = find_faults(KASAN_REPORT)
    assert [f.kind for f in faults] == ["KASAN", "WARNING"]
    assert faults[0].title == "BUG: KASAN: use-after-free in nf_confirm+0x406/0x430 [nf_conntrack]"
    assert faults[0].frames == ["nf_confirm+0x406/0x430 [nf_conntrack]", "nf_hook_slow+0x64/0x100"]


def test_reports_are_tagged_with_their_phase_and_boot_warnings_do_not_count() -> None:
    run = RunResult(name="ftrace", kind="mitigation", strategy="ftrace", module="nq_ftrace", nfqueue=False)
    marks = {"boot": 5.0, "before": 10.0, "loaded": 20.0, "workload": 40.0, "unloaded": 45.0}
    apply_results(
        run,
        "\n".join(f'{{"type":"taint","phase":"{p}","value":0,"uptime":{t}}}' for p, t in marks.items()),
    )
    early = "[    1.000000] WARNING: CPU: 0 PID: 1 at arch/x86/kernel/tsc.c:1 tsc_init+0x1/0x2\n"
    late = "[   50.000000] BUG: kernel NULL pointer dereference, address: 0000000000000000\n"
    run.set_faults(find_faults(early + KASAN_REPORT + late))
    assert [(f.kind, f.phase) for f in run.faults] == [
        ("WARNING", "boot"), ("KASAN", "workload"), ("WARNING", "workload"), ("BUG", "after"),
    ]
    assert [f.kind for f in run.run_faults] == ["KASAN", "WARNING", "BUG"]
    run.set_faults(find_faults(early))
    assert run.run_faults == [] and run.verdict != "fault"


def test_a_kernel_that_dies_before_init_is_incomplete_not_a_module_fault() -> None:
    run = RunResult(name="ftrace", kind="mitigation", strategy="ftrace", module="nq_ftrace", nfqueue=False)
    apply_results(run, "")
    run.set_faults(find_faults(KASAN_REPORT))
    assert run.run_faults == [] and run.verdict == "incomplete"
    assert any("the kernel failed before init (2 report(s), first: BUG: KASAN" in p for p in run.problems)


def test_plan_runs_repeats_and_adds_nfqueue_variants() -> None:
    queued = Manifest("advance-confirm", "nq_a", Path("a.ko"), {}, None, (), None, "rmmod", None, 0, 1, (), "")
    direct = Manifest("ftrace", "nq_f", Path("f.ko"), {}, None, (), None, "rmmod", None, None, 0, (), "")
    specs = plan_runs([queued, direct], baselines=True, repeat=2, nfqueue_variants=True)
    names = [(s.name, s.repeat, s.nfqueue) for s in specs]
    assert names == [
        ("baseline", 1, False), ("baseline", 2, False),
        ("baseline-nfqueue", 1, True), ("baseline-nfqueue", 2, True),
        ("advance-confirm", 1, False), ("advance-confirm", 2, False),
        ("ftrace", 1, False), ("ftrace", 2, False),
        ("ftrace+nfqueue", 1, True), ("ftrace+nfqueue", 2, True),
    ]


def _fake_run(name: str, clashres: int, faults: int, verdict: str) -> dict[str, object]:
    return {
        "name": name, "kind": "baseline", "nfqueue": False, "completed": True, "corrected_counter": None,
        "faults": [{"kind": "KASAN", "title": "BUG: KASAN: use-after-free in nf_confirm", "text": "x", "frames": []}]
        * faults,
        "derived": {"sent": 100, "received": 100, "workload_ct": {"clashres": clashres}, "fault_count": faults,
                    "verdict": verdict, "healthy": True, "health_sent": 10, "health_received": 10},
    }


def test_report_groups_repeated_boots_with_spread_and_rates() -> None:
    lab = {
        "workload": {"flows": 50},
        "runs": [_fake_run("baseline", 10, 2, "fault"), _fake_run("baseline", 20, 0, "ok")],
    }
    (row,) = rows(lab)
    cells = dict(zip(["run", *[n for n, _ in ROW_COLUMNS]], row, strict=True))
    assert cells["run"] == "baseline x2"
    assert cells["delivered"] == "200/200"
    assert cells["clashres"] == "10..20 (mean 15.0)"
    assert cells["faults"].startswith("2 in 1/2 boots: BUG: KASAN")
    assert cells["verdict"] == "fault (1/2)"
    measured = measured_columns(lab)["baseline"]
    assert measured["lab: clashes per 10k flows"] == "3000.0"  # 30 clashes in 100 flows
    assert measured["lab: reports per 10k flows"] == "200.0"
    assert "| baseline x2 |" in measured_markdown(lab)


def test_results_lines_make_a_run_with_problems() -> None:
    run = RunResult(name="x", kind="mitigation", strategy="x", module="nq_x", nfqueue=False)
    lines = [
        '{"type":"insmod","role":"mitigation","module":"nq_x","optional":false,"rc":1,'
        '"stderr_b64":"aW5zbW9kOiBjYW4ndCBpbnNlcnQgJ3gua28nOiBVbmtub3duIHN5bWJvbCBpbiBtb2R1bGUK","dmesg_b64":""}',
        '{"type":"traffic","name":"workload","family":"ipv4","rounds":10,"threads":2,"sent":20,"send_errors":0,'
        '"received":18}',
        '{"type":"traffic","name":"workload","family":"ipv6","rounds":10,"threads":2,"sent":18,"send_errors":2,'
        '"received":18}',
        "garbage that is not json",
        '{"type":"done","code":0}',
    ]
    apply_results(run, "\n".join(lines))
    assert run.completed
    assert run.loaded is False
    assert run.verdict == "refused"
    assert any("Unknown symbol in module" in p for p in run.problems)
    assert any("lost 4 of 40 datagrams (2 refused at send)" in p for p in run.problems)
    assert any("unparsable" in e for e in run.errors)


def test_flows_after_unload_must_reach_the_conntrack_table() -> None:
    header = "entries  clashres insert_failed drop\n"
    stat = base64.b64encode((header + "00000005 0 0 0\n00000005 0 0 0\n").encode()).decode()
    lines = [
        '{"type":"traffic","name":"health","family":"ipv4","rounds":50,"threads":1,"sent":50,"send_errors":0,'
        '"received":50}',
        json.dumps({"type": "ctstat", "phase": "health", "b64": stat}),
        '{"type":"done","code":0}',
    ]
    run = RunResult(name="baseline", kind="baseline", strategy=None, module=None, nfqueue=False)
    apply_results(run, "\n".join(lines))
    assert run.healthy is True and run.confirmed_after is False
    assert any("5 entries after 50 new flows" in p for p in run.problems)


def test_initramfs_is_a_valid_newc_archive(tmp_path: Path) -> None:
    c = Cpio()
    c.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    c.symlink("sbin", "bin")
    c.char_device("dev/console", 5, 1)
    archive = tmp_path / "a.cpio"
    archive.write_bytes(c.bytes())
    listing = subprocess.run(["cpio", "-itv"], stdin=archive.open("rb"), capture_output=True, text=True, check=True)
    assert re.search(r"^crw.* 5,\s*1 .*dev/console$", listing.stdout, re.M)
    assert re.search(r"^lrwx.* sbin -> bin$", listing.stdout, re.M)
    assert re.search(r"^-rwxr-xr-x .* 18 .*bin/hello$", listing.stdout, re.M)


def test_init_script_is_valid_shell() -> None:
    plan = GuestPlan(
        run="t",
        deps=(GuestModule("nf_conntrack", "/lib/modules/r/nf_conntrack.ko", "dep"),),
        helper=GuestModule("nqlab_ct", "/nqlab/nqlab_ct.ko", "helper", ("queue=-1",)),
        mitigation=GuestModule("nq_lp", "/nqlab/nq_lp.ko", "mitigation", ("a=1",)),
        workload=Workload(rounds=3),
        stats_dir="/sys/kernel/nq_lp",
        counters=("confirm_calls",),
        unload="livepatch",
        livepatch_sysfs="/sys/kernel/livepatch/nq_lp",
        queue_base=0,
        queue_count=2,
    )
    script = render_init(plan)
    shell = "/bin/busybox" if Path("/bin/busybox").is_file() else "/bin/sh"
    args = [shell, "sh", "-n"] if shell.endswith("busybox") else [shell, "-n"]
    proc = subprocess.run([*args, "/dev/stdin"], input=script, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert 'echo 0 > "$LP/enabled"' in script and "nq_queue -b 0 -c 2" in script


@pytest.mark.skipif(DEBIAN is None, reason="needs an installed Debian kernel")
def test_module_closure_comes_from_modules_dep() -> None:
    assert DEBIAN is not None
    tree = ModuleTree.load(DEBIAN[1])
    names = [m.name for m in tree.closure(["nf_conntrack_netlink", "nfnetlink_queue"])]
    assert names.index("nf_conntrack") < names.index("nf_conntrack_netlink")
    assert names.index("nfnetlink") < names.index("nfnetlink_queue")
    assert names.index("libcrc32c") < names.index("nf_conntrack")
    with pytest.raises(InputError):
        tree.closure(["no_such_module_nq"])
    assert image_release(DEBIAN[0]) == DEBIAN[1].name


@pytest.mark.skipif(DEBIAN is None, reason="needs an installed Debian kernel")
def test_bzimage_boots_through_its_extracted_pvh_vmlinux(tmp_path: Path) -> None:
    assert DEBIAN is not None
    image = resolve_image(DEBIAN[0], tmp_path)
    assert image.boot_mode == "pvh" and image.boot_path.parent == tmp_path
    assert image.boot_path.read_bytes()[:4] == b"\x7fELF"
    assert image.release == DEBIAN[1].name and not image.kasan
    assert resolve_image(image.boot_path, tmp_path).boot_path == image.boot_path  # an ELF vmlinux as is


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_guest_programs_compile_static_without_warnings(tmp_path: Path) -> None:
    programs = build_programs(tmp_path)
    assert set(programs) == {"nq_udprace", "nq_queue", "nq_ctevents", "nq_pktcost"}
    for binary in programs.values():
        assert b"/ld-linux" not in binary.read_bytes()[:4096]  # no interpreter: runs in the bare initramfs


def test_discover_rejects_unknown_strategy(tmp_path: Path) -> None:
    (tmp_path / "ftrace").mkdir()
    (tmp_path / "ftrace" / "nqgen-module.json").write_text(
        json.dumps({"strategy": "ftrace", "module": "nq_ftrace", "ko": "nq_ftrace.ko"})
    )
    assert discover(tmp_path) == []  # not built: skipped by default
    with pytest.raises(InputError, match="not built"):
        discover(tmp_path, ("ftrace",))
    with pytest.raises(InputError, match="no manifest for strategy livepatch"):
        discover(tmp_path, ("livepatch",))


# ---- real boots ----------------------------------------------------------------------------------


@pytest.mark.vm
@needs_vm
def test_baselines_counting_module_and_livepatch_on_the_debian_kernel(tmp_path: Path) -> None:
    assert DEBIAN is not None
    out = tmp_path / "out"
    _module_out(out, "counting", "nqtest_count", COUNTING_MODULE, DEBIAN[2], ["hook_calls"])
    _module_out(out, "livepatch", "nqtest_lp", LIVEPATCH_MODULE, DEBIAN[2], [], unload="livepatch")
    proc = _lab(out, "--rounds", "60")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lab = json.loads((out / "lab.json").read_text())
    runs = {r["name"]: r for r in lab["runs"]}
    assert list(runs) == ["baseline", "baseline-nfqueue", "livepatch", "counting"]
    for run in runs.values():
        d = run["derived"]
        assert run["completed"], run["name"]
        assert d["sent"] == 60 * 2 * 2 and d["received"] == d["sent"], run["name"]
        assert d["fault_count"] == 0 and d["workload_ct"] is not None
        assert run["ctevents"]["subscribed"] == 1 and run["ctevents"]["new"] > 0
        # the stale-use detector ran in every boot: it saw every new flow's event delivery, and this
        # Debian kernel carries the fix, so none reached a released entry
        assert d["detector_loaded"] is True, run["name"]
        assert run["detector"]["end"]["calls"] >= 60 * 2, run["name"]
        assert d["stale_uses"] == 0 and d["detector_clashes"] is not None, run["name"]
    assert lab["guest"]["detector"] and "-DNQLAB_CT_NETNS_GET" in lab["guest"]["cflags"]
    queued = runs["baseline-nfqueue"]
    assert queued["queue"]["accepted"] == queued["derived"]["sent"] + queued["derived"]["health_sent"]
    counting = runs["counting"]["derived"]
    assert counting["loaded"] and counting["unloaded"] and counting["healthy"]
    assert counting["corrected_calls"] >= 60 * 2  # every IPv4 datagram passed the module's hook
    lp = runs["livepatch"]
    assert lp["livepatch"]["enabled"] == "1" and lp["livepatch"]["transition"] == "0"
    assert lp["unload"]["method"] == "livepatch" and lp["derived"]["unloaded"] and lp["derived"]["healthy"]
    assert "unpatching complete" in lp["unload"]["dmesg"]
    assert (out / "lab.png").read_bytes()[:4] == b"\x89PNG"
    assert "counting" in proc.stdout and "verdict" in proc.stdout


@pytest.mark.vm
@needs_vm
def test_broken_module_is_reported_as_a_fault_with_the_oops_text(tmp_path: Path) -> None:
    assert DEBIAN is not None
    out = tmp_path / "out"
    _module_out(out, "broken", "nqbroken", BROKEN_MODULE, DEBIAN[2], [])
    proc = _lab(out, "--rounds", "20", "--no-baselines")
    assert proc.returncode == EXIT_LAB, proc.stderr
    assert "broken" in proc.stderr and "kernel report" in proc.stderr
    lab = json.loads((out / "lab.json").read_text())
    (run,) = lab["runs"]
    assert run["derived"]["verdict"] == "fault"
    assert not run["completed"]
    fault = run["faults"][0]
    assert fault["title"].startswith("BUG: kernel NULL pointer dereference")
    assert "nqbroken_hook" in fault["text"] and any("nqbroken_hook" in f for f in fault["frames"])
    assert lab["failed"] == ["broken"]
