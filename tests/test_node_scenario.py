"""The lab's node scenario: real dnsmasq, iptables NAT + NFQUEUE, conntrack -E and glibc's resolver in a VM.

Offline tests check the pieces (init script, NAT evidence parsing, the generator's NAT gate); the ``vm``
test runs a short form on the installed Debian kernel, the ``repro`` test on the vulnerable reference kernel.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import DebianKernel, run_nqgen
from nqgen import reprokernel
from nqgen.lab.guest import GuestModule
from nqgen.lab.kernel import default_cache_dir, resolve_image
from nqgen.lab.manifest import discover
from nqgen.lab.scenarios.node.report import (
    answered,
    kasan_by_family,
    kasan_split,
    nat_verdicts,
    node_markdown,
    problems,
)
from nqgen.lab.scenarios.node.results import nat_evidence
from nqgen.lab.scenarios.node.runner import NodeConfig, NodeLab, node_json, run_node_lab
from nqgen.lab.scenarios.node.script import NodePlan, NodeWorkload, render_node_init
from nqgen.lab.scenarios.node.topology import IPV4, expected, hosts_file
from nqgen.natpath import NAT_BREAKING, NatPath, decide_nat, detect_running, gate
from nqgen.strategies import Feasibility

# Lines exactly as conntrack -E (conntrack-tools 1.4.7) and dnsmasq 2.90 printed them in the guest.
_UDP = "udp      17 30"
CT_EVENTS = "\n".join([
    f"    [NEW] {_UDP} src=10.244.1.2 dst=192.0.2.53 sport=43981 dport=53 [UNREPLIED] "
    "src=192.0.2.53 dst=10.244.1.2 sport=53 dport=43981",
    f"    [NEW] {_UDP} src=10.244.1.2 dst=192.0.2.53 sport=40445 dport=53 [UNREPLIED] "
    "src=192.0.2.53 dst=192.0.2.1 sport=53 dport=40445",
    f" [UPDATE] {_UDP} src=10.244.1.2 dst=192.0.2.53 sport=40445 dport=53 "
    "src=192.0.2.53 dst=192.0.2.1 sport=53 dport=40445",
    f"    [NEW] {_UDP} src=fd00:244:1::2 dst=2001:db8:1::53 sport=5001 dport=53 [UNREPLIED] "
    "src=2001:db8:1::53 dst=2001:db8:1::1 sport=53 dport=5001",
]) + "\n"
DNS_LOG = """\
Dec  1 13:38:57 dnsmasq[340]: read /etc/nq-hosts - 800 names
Dec  1 13:39:01 dnsmasq[340]: query[A] h1.pods.test from 10.244.1.2
Dec  1 13:39:01 dnsmasq[340]: query[AAAA] h1.pods.test from 192.0.2.1
Dec  1 13:39:01 dnsmasq[340]: /etc/nq-hosts h1.pods.test is 100.64.0.1
Dec  1 13:39:02 dnsmasq[340]: query[AAAA] h2.pods.test from 2001:db8:1::1
"""


def test_nat_evidence_tells_translated_from_untranslated_flows() -> None:
    ev = nat_evidence(CT_EVENTS, DNS_LOG)
    v4, v6 = ev["ipv4"], ev["ipv6"]
    assert (v4.new_flows, v4.masqueraded, v4.untranslated) == (2, 1, 1)
    assert (v4.queries_from_node, v4.queries_from_pod) == (1, 1)
    assert (v6.new_flows, v6.masqueraded, v6.untranslated, v6.queries_from_node) == (1, 1, 0, 1)


def _fault(frames: list[str], phase: str = "workload") -> dict[str, object]:
    return {"kind": "KASAN", "phase": phase, "title": "BUG: KASAN: use-after-free in nf_confirm+0x406/0x430",
            "frames": frames}


# top frames exactly as the reference kernel's KASAN reports gave them on the node (pool consumer)
V4 = ["nf_confirm+0x406/0x430 [nf_conntrack]", "nf_hook_slow+0xa6/0x1c0", "ip_output+0x3a0/0x540",
      "nf_reinject+0x246/0x6a0"]
V6 = ["nf_confirm+0x406/0x430 [nf_conntrack]", "ipv6_confirm+0x176/0x3f0 [nf_conntrack]", "nf_hook_slow+0xa6/0x1c0",
      "ip6_output+0x353/0x420", "nf_reinject+0x246/0x6a0"]


def _lk(family: str, ok: int, planned: int = 10) -> dict[str, object]:
    return {"phase": "workload", "family": family, "ok": ok, "planned": planned, "started": planned, "a_only": 0,
            "aaaa_only": 0, "wrong": 0, "p50_ms": 1.0, "max_ms": 2.0, "slow_5s": 0}


def test_advance_confirm_nat_verdict_counts_reports_per_family() -> None:
    nat = {"new_flows": 10, "masqueraded": 10, "untranslated": 0, "queries_from_node": 20, "queries_from_pod": 0}
    kept = {"name": "advance-confirm", "strategy": "advance-confirm", "kind": "mitigation", "kasan_reports": 3,
            "faults": [_fault(V4), _fault(V6), _fault(V6), _fault(V4, phase="boot")],
            "lookups": [_lk("ipv4", 10), _lk("ipv6", 10)], "nat": {"ipv4": nat, "ipv6": nat},
            "tftp": {"ipv4": {"ok": True}, "ipv6": {"ok": True}},
            "counter_deltas": {"early_confirms": 0, "nat_unconfirmed": 40}}
    assert kasan_by_family(kept) == {"ipv4": 1, "ipv6": 2}  # the boot-time report is the kernel's own
    broken = dict(kept, name="advance-confirm-corrected", strategy="advance-confirm-corrected", faults=[],
                  lookups=[_lk("ipv4", 0), _lk("ipv6", 10)],
                  nat={"ipv4": dict(nat, masqueraded=0, untranslated=10, queries_from_pod=20), "ipv6": nat})
    lines = nat_verdicts({"runs": [kept, broken, {"name": "ftrace", "strategy": "ftrace"}]})
    v4, v6, counters, b4, b6, _ = lines
    assert "ipv4: NAT kept" in v4 and "not protected: 1 KASAN" in v4
    assert "ipv6: NAT kept" in v6 and "not protected: 2 KASAN" in v6 and "nat_unconfirmed 40" in counters
    assert "ipv4: NAT BROKEN (0/10" in b4 and "20 queries from the pod" in b4 and "no KASAN report" in b4
    assert "ipv6: NAT kept" in b6 and "no KASAN report" in b6
    # advance-confirm leaves translated flows to the unfixed confirm (documented): its reports are the finding
    kept["problems"] = ["3 kernel report(s), first: BUG: KASAN: use-after-free in nf_confirm+0x406/0x430"]
    assert problems(kept) == []
    oops = dict(kept, faults=[_fault(V4), {"kind": "Oops", "phase": "workload", "title": "BUG: unable to handle"}])
    assert problems(oops) == kept["problems"]
    assert problems(dict(kept, strategy="ftrace")) == kept["problems"]
    # after the unload the health lookups run on the unfixed kernel again: its own report, not the strategy's
    after = dict(kept, strategy="ftrace", faults=[_fault(V6, phase="after")])
    assert problems(after) == [] and kasan_by_family(after) == {}
    assert "0 + 1 after unload" in node_markdown({"kernel": {"release": "r"}, "date": "d", "runs": [after],
                                                  "workload": {"queue_base": 0, "queue_count": 2, "threads": 4,
                                                               "lookups": 10, "queue_delay_us": 200}})


def test_dns_data_matches_what_the_client_checks() -> None:
    text = hosts_file(300)
    assert len(text.splitlines()) == 600
    a, aaaa = expected(258)
    assert f"{a} h258.pods.test" in text and a == "100.64.1.2"
    assert f"{aaaa} h258.pods.test" in text and aaaa == "2001:db8:64::102"


def test_node_init_is_valid_shell_with_the_real_ruleset() -> None:
    plan = NodePlan(run="t", deps=(GuestModule("veth", "/lib/modules/r/veth.ko", "dep"),),
                    workload=NodeWorkload(lookups=10, queue_workers=2), extra_queues=(0, 1))
    script = render_node_init(plan)
    shell = "/bin/busybox" if Path("/bin/busybox").is_file() else "/bin/sh"
    args = [shell, "sh", "-n"] if shell.endswith("busybox") else [shell, "-n"]
    proc = subprocess.run([*args, "/dev/stdin"], input=script, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"-t nat -A POSTROUTING -s {IPV4.pod_net} -o veth-up -j MASQUERADE" in script
    assert "-A FORWARD -p udp -j NFQUEUE --queue-balance 0:1 --queue-bypass" in script
    assert "-j CT --helper tftp" in script and "/usr/sbin/conntrack -E" in script
    assert "nq_nfqpool -b 0 -c 2 -d 200 -w 2" in script
    assert "/usr/sbin/dnsmasq" in script and "ip netns exec pod /usr/bin/nq_lookup" in script


def test_nat_gate_refuses_nat_breaking_strategies_unless_allowed() -> None:
    ok = {"advance-confirm": Feasibility(True, "x"), "ftrace": Feasibility(True, "y")}
    breaking = {"advance-confirm": "breaks NAT"}
    refused = gate(ok, NatPath(True, "test"), allow=False, breaking=breaking, unprotected={})
    assert not refused["advance-confirm"].feasible and "--allow-nat-breakage" in refused["advance-confirm"].reason
    assert refused["ftrace"].feasible
    allowed = gate(ok, NatPath(True, "test"), allow=True, breaking=breaking, unprotected={})
    assert allowed["advance-confirm"].feasible and any("NAT" in n for n in allowed["advance-confirm"].notes)
    assert gate(ok, NatPath(False, "none"), allow=False, breaking=breaking)["advance-confirm"].notes == ()


def test_nat_gate_says_advance_confirm_leaves_translated_flows_unprotected() -> None:
    ok = {"advance-confirm": Feasibility(True, "x"), "ftrace": Feasibility(True, "y")}
    assert "advance-confirm" not in NAT_BREAKING  # measured: NAT kept (test_node_scenario_on_the_debian_kernel)
    noted = gate(ok, NatPath(True, "test"), allow=False)
    assert noted["advance-confirm"].feasible and any("no protection" in n for n in noted["advance-confirm"].notes)
    assert noted["ftrace"].notes == ()
    assert gate(ok, NatPath(False, "none"), allow=False)["advance-confirm"].notes == ()


def test_nat_detection_reads_the_running_system(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net/ip_tables_names").write_text("filter\n")
    (tmp_path / "modules").write_text("x_tables 57344 1 ip_tables, Live 0x0\n")
    assert detect_running(tmp_path).present is False
    (tmp_path / "modules").write_text("nft_chain_nat 16384 3 - Live 0x0\nnf_nat 61440 1 nft_chain_nat, Live 0x0\n")
    assert detect_running(tmp_path).present is True
    (tmp_path / "modules").write_text("")
    (tmp_path / "net/ip_tables_names").write_text("nat\nfilter\n")
    assert detect_running(tmp_path).present is True
    assert decide_nat("auto", "6.1.0-9-amd64", running_release="6.18.0").present is None
    assert decide_nat("auto", "r1", running_release="r1", proc=tmp_path).present is True


def test_generator_says_advance_confirm_protects_no_translated_flow(debian: DebianKernel, tmp_path: Path) -> None:
    base = ["--kdir", str(debian.kdir), "--module", str(debian.nf_conntrack)]
    one = run_nqgen(["--strategy", "advance-confirm", "--nat", "yes", *base, "--out", "o1"], tmp_path)
    assert one.returncode == 0, one.stderr
    text = (tmp_path / "o1/COMPARISON.md").read_text()
    assert "NAT is in the packet path (--nat yes)" in text and "no protection" in text
    quiet = run_nqgen(["--strategy", "advance-confirm", "--nat", "no", *base, "--out", "o2"], tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "NAT is in the packet path" not in (tmp_path / "o2/COMPARISON.md").read_text()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_node_guest_programs_compile_without_warnings(tmp_path: Path) -> None:
    from nqgen.lab.scenarios.node.runner import _build_programs

    pool, lookup = _build_programs(tmp_path)
    assert pool.is_file() and lookup.is_file()
    libs = subprocess.run(["ldd", str(lookup)], capture_output=True, text=True, check=False).stdout
    assert "libc.so.6" in libs  # glibc's own resolver, dynamically linked as in a pod


# ---- in the VM ---------------------------------------------------------------------------------------

_NEEDS = ["/usr/sbin/dnsmasq", "/usr/sbin/xtables-legacy-multi", "/usr/sbin/conntrack", "/usr/bin/tftp",
          "/bin/busybox"]
needs_node = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or not all(Path(p).is_file() for p in _NEEDS),
    reason="needs qemu and the node's Debian packages (scripts/install-deps)",
)


def _generate(kdir: Path, module: Path, out: Path) -> None:
    # the node's ruleset has NAT in the path: generate the NAT-breaking strategies too, to measure them
    res = run_nqgen(["--strategy", "all", "--nat", "yes", "--allow-nat-breakage", "--kdir", str(kdir),
                     "--module", str(module), "--out", str(out)], out.parent)
    assert res.returncode == 0, res.stderr
    make = subprocess.run(["make", "-C", str(out)], capture_output=True, text=True, timeout=1200, check=False)
    assert make.returncode == 0, make.stdout[-2000:] + make.stderr[-2000:]


def _short(config: NodeConfig, out: Path, strategies: tuple[str, ...]) -> NodeLab:
    manifests = [m for m in discover(out) if m.strategy in strategies]
    return run_node_lab(config, manifests)


def _nat_broken(run: dict[str, object]) -> bool:
    lost = any(answered(run, f)[0] < answered(run, f)[1] for f in ("ipv4", "ipv6"))
    nat = run["nat"]
    assert isinstance(nat, dict)
    return lost or any(ev["untranslated"] > 0 for ev in nat.values())


@pytest.mark.vm
@needs_node
def test_node_scenario_on_the_debian_kernel(debian: DebianKernel, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _generate(debian.kdir, debian.nf_conntrack, out)
    image = resolve_image(debian.vmlinuz, default_cache_dir())
    config = NodeConfig(kernel=image, modules_dir=debian.modules_dir, kdir=debian.kdir, memory="512M",
                        workload=NodeWorkload(lookups=30, health_lookups=10, deadline_s=10),
                        sequential_baseline=False, nat_only_baseline=False, timeout=400,
                        logs_dir=out / "lab-logs")
    lab = _short(config, out, ("advance-confirm", "ftrace"))
    data = node_json(lab)
    runs = {r["name"]: r for r in data["runs"]}
    assert set(runs) == {"baseline-nfqueue-pool", "advance-confirm", "ftrace"}
    for name in ("baseline-nfqueue-pool", "ftrace"):
        r = runs[name]
        assert problems(r) == [], (name, problems(r))
        for fam in ("ipv4", "ipv6"):
            assert answered(r, fam) == (30, 30), (name, fam)
            ev = r["nat"][fam]
            assert ev["new_flows"] >= 30 and ev["masqueraded"] == ev["new_flows"] and ev["queries_from_pod"] == 0
            assert r["tftp"][fam]["ok"], (name, fam, r["tftp"])
    assert runs["ftrace"]["corrected_calls"] and runs["ftrace"]["unloaded"]
    # The generator's NAT gate must agree with what advance-confirm measurably does to masqueraded flows.
    ac = runs["advance-confirm"]
    assert ac["fault_count"] == 0 and ac["unloaded"]
    assert _nat_broken(ac) == ("advance-confirm" in NAT_BREAKING), (
        "nqgen.natpath.NAT_BREAKING disagrees with what advance-confirm measurably does to masqueraded lookups: "
        "update the gate together with the strategy"
    )
    assert "Measured: a real node" in node_markdown(data)


@pytest.mark.vm
@pytest.mark.repro
@needs_node
def test_node_scenario_on_the_reference_kernel(tmp_path: Path) -> None:
    rk = reprokernel.find_built()
    if rk is None:
        pytest.skip("the vulnerable reference kernel is not built: run `make repro-kernel`")
    out = tmp_path / "out"
    _generate(rk.kdir, rk.modules_dir / "kernel/net/netfilter/nf_conntrack.ko", out)
    image = resolve_image(rk.image, default_cache_dir())
    config = NodeConfig(kernel=image, modules_dir=rk.modules_dir, kdir=rk.kdir, memory="1G",
                        # clashes are rare with real software (0-4 per 400 lookups on Debian's 6.1 with the pool
                        # consumer): all 400 names per family make a report likely (about 4 expected per boot)
                        workload=NodeWorkload(lookups=400, health_lookups=10, deadline_s=300),
                        sequential_baseline=False, nat_only_baseline=False, timeout=900,
                        logs_dir=out / "lab-logs")
    data = node_json(_short(config, out, ("ftrace",)))
    runs = {r["name"]: r for r in data["runs"]}
    assert runs["baseline-nfqueue-pool"]["kasan_reports"] > 0, "the real node did not reproduce the report"
    ft = runs["ftrace"]
    # none while ftrace is loaded; the health lookups after its unload run on the unfixed kernel again and may
    # hit the bug (2 reports there in one CI run, 18:29 UTC 2026-12-01): that is the kernel's, not a failure
    assert kasan_split(ft)[0] == 0 and problems(ft) == [], (kasan_split(ft), problems(ft))
    assert ft["corrected_calls"] and ft["unloaded"]
    for fam in ("ipv4", "ipv6"):
        assert answered(ft, fam) == (400, 400)
        # every answer came back through MASQUERADE, and the TFTP helper flow through NAT worked
        ev = ft["nat"][fam]
        # not ">= 400" NEW events: a lookup whose random source port repeats one still in conntrack (30 s UDP
        # timeout) joins that entry without a NEW event; 400 lookups over 28 232 ephemeral ports expect about 2.8
        # such repeats (397 seen in one CI run). Every lookup was answered (above), none reached dnsmasq untranslated.
        assert ev["new_flows"] >= 380 and ev["masqueraded"] == ev["new_flows"] and ev["queries_from_pod"] == 0, ev
        assert ft["tftp"][fam]["ok"], (fam, ft["tftp"])


def test_modules_a_kernel_left_out_need_its_source(tmp_path: Path, debian: DebianKernel) -> None:
    from nqgen.errors import InputError
    from nqgen.lab.modtree import ModuleTree
    from nqgen.lab.scenarios.node import kmods

    tree_dir = tmp_path / "lib/modules/r"
    tree_dir.mkdir(parents=True)
    have = [r for r in kmods.NODE_ROOTS if r not in ("veth", "ip6table_nat")]
    (tree_dir / "modules.dep").write_text("".join(f"kernel/{r}.ko:\n" for r in have))
    tree = ModuleTree.load(tree_dir)
    assert kmods.missing_roots(tree) == ["veth", "ip6table_nat"]
    # Debian's headers package holds no .c files: the scenario must say what is missing, not half-build
    with pytest.raises(InputError, match="veth, ip6table_nat"):
        kmods.build_extras(tree, debian.kdir, tmp_path / "extras")
    assert not (tmp_path / "extras").exists()


SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")


@pytest.mark.skipif(not SOURCE_TARBALL.is_file(), reason="needs linux-source-6.1 (scripts/install-deps)")
def test_modules_a_kernel_left_out_are_built_from_its_source(tmp_path: Path, debian: DebianKernel) -> None:
    from nqgen.lab.modtree import ModuleTree, modinfo
    from nqgen.lab.scenarios.node import kmods

    names = ["veth", "ip6table_nat", "iptable_raw", "ip6table_raw", "xt_CT", "nf_conntrack_tftp", "nf_nat_tftp"]
    tree_dir = tmp_path / "tree"
    tree_dir.mkdir()
    have = [r for r in kmods.NODE_ROOTS if r not in names]
    (tree_dir / "modules.dep").write_text("".join(f"kernel/{r}.ko:\n" for r in have))
    members = [f"linux-source-6.1/{kmods.IN_TREE_SOURCE[n]}" for n in names]
    members.append("linux-source-6.1/net/netfilter/nf_internals.h")
    subprocess.run(["tar", "-xJf", str(SOURCE_TARBALL), "-C", str(tmp_path), *members], check=True, timeout=600)
    built = kmods.build_extras(ModuleTree.load(tree_dir), debian.kdir, tmp_path / "extras",
                               source=tmp_path / "linux-source-6.1")
    assert list(built.extras) == [r for r in kmods.NODE_ROOTS if r in names]  # nf_conntrack_tftp before nf_nat_tftp
    for name, ko in built.extras.items():
        assert modinfo(ko)["vermagic"][0].split()[0] == debian.release, name
