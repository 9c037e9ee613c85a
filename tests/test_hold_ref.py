"""hold-ref: generated, compiled and run for real on the Debian kernel, beside the livepatch strategy.

The proof that it stops the use-after-free is on the vulnerable reference kernel (test_repro.py and
``make repro``); here the Debian kernel (fixed, so no crash either way) shows the mechanism: every confirm
call's entry is held and released, the entries kept alive are exactly the clash losers, and the module loads,
works and unloads while nqgen's livepatch module patches the confirm functions of the same kernel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DebianKernel, make_jobs, run_nqgen
from nqgen.lab.guest import GuestModule, GuestPlan, Workload, render_init
from nqgen.lab.manifest import Manifest
from nqgen.lab.runner import plan_runs

needs_vm = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or not Path("/bin/busybox").is_file(),
    reason="needs qemu-system-x86_64 and busybox-static (make deps installs them)",
)


def _manifest(strategy: str, module: str, unload: str = "rmmod") -> Manifest:
    lp = f"/sys/kernel/livepatch/{module}" if unload == "livepatch" else None
    return Manifest(strategy, module, Path(f"{module}.ko"), {}, None, (), None, unload, lp, None, 0, (), "")


def test_beside_adds_one_run_per_other_strategy_with_the_companion() -> None:
    hold, ftrace, lp = _manifest("hold-ref", "nq_h"), _manifest("ftrace", "nq_f"), _manifest("livepatch", "nq_l")
    specs = plan_runs([hold, ftrace, lp], baselines=False, beside=lp)
    assert [(s.name, s.beside.module if s.beside else None) for s in specs] == [
        ("hold-ref", None), ("hold-ref+livepatch", "nq_l"),
        ("ftrace", None), ("ftrace+livepatch", "nq_l"),
        ("livepatch", None),
    ]


def test_companion_loads_before_the_mitigation_and_its_livepatch_is_waited_for() -> None:
    plan = GuestPlan(
        run="hold-ref+livepatch",
        deps=(),
        helper=GuestModule("nqlab_ct", "/nqlab/nqlab_ct.ko", "helper"),
        mitigation=GuestModule("nq_hold_ref", "/nqlab/nq_hold_ref.ko", "mitigation"),
        workload=Workload(rounds=3),
        companion=GuestModule("nq_livepatch", "/nqlab/nq_livepatch.ko", "companion"),
        companion_livepatch_sysfs="/sys/kernel/livepatch/nq_livepatch",
    )
    script = render_init(plan)
    companion = script.index("load companion nq_livepatch")
    wait = script.index('if [ "$CMP" = 1 ]')
    mitigation = script.index("load mitigation nq_hold_ref")
    assert companion < wait < mitigation
    shell = "/bin/busybox" if Path("/bin/busybox").is_file() else "/bin/sh"
    args = [shell, "sh", "-n"] if shell.endswith("busybox") else [shell, "-n"]
    proc = subprocess.run([*args, "/dev/stdin"], input=script, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def hold_ref_out(debian: DebianKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("holdref")
    args = ["--kdir", str(debian.kdir), "--module", str(debian.nf_conntrack)]
    for strategy in ("hold-ref", "livepatch"):
        res = run_nqgen(["--strategy", strategy, *args, "--out", f"out-{strategy}"], cwd=work)
        assert res.returncode == 0, res.stderr
    out = work / "out"
    shutil.move(work / "out-hold-ref", out)
    shutil.move(work / "out-livepatch" / "livepatch", out / "livepatch")
    for strategy in ("hold-ref", "livepatch"):
        make = subprocess.run(["make", *make_jobs(), "-C", str(out / strategy), "W=1"], capture_output=True, text=True,
                              timeout=600)
        assert make.returncode == 0, make.stdout[-2000:] + make.stderr[-2000:]
        assert "warning:" not in make.stdout + make.stderr
    return out


def test_hold_ref_uses_no_private_symbol(hold_ref_out: Path) -> None:
    tree = hold_ref_out / "hold-ref"
    assert sorted(p.name for p in tree.glob("*.c") if not p.name.endswith(".mod.c")) == [
        "hold_ref.c", "nq_stats.c", "nq_target_id.c"
    ]
    assert not (tree / "nq_resolve.h").exists()  # no anchor, no kallsyms: only exports
    undefined = subprocess.run(["nm", "-u", str(tree / "nq_hold_ref.ko")], capture_output=True, text=True,
                               check=True).stdout
    assert "__nf_conntrack_confirm" in undefined and "kallsyms_lookup_name" not in undefined


@pytest.mark.vm
@needs_vm
def test_hold_ref_holds_every_confirm_and_keeps_exactly_the_losers_beside_livepatch(
    hold_ref_out: Path, debian: DebianKernel
) -> None:
    cmd = [sys.executable, "-m", "nqgen", "lab", "--out", str(hold_ref_out), "--kernel", str(debian.vmlinuz),
           "--modules-dir", str(debian.modules_dir), "--kdir", str(debian.kdir), "--no-baselines",
           "--strategy", "hold-ref", "--beside", "livepatch", "--rounds", "300", "--timeout", "240"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    runs = {r["name"]: r for r in json.loads((hold_ref_out / "lab.json").read_text())["runs"]}
    assert list(runs) == ["hold-ref", "hold-ref+livepatch"]
    for run in runs.values():
        d = run["derived"]
        assert d["fault_count"] == 0 and d["received"] == d["sent"] == 300 * 2 * 2, run["name"]
        assert d["loaded"] and d["unloaded"] and d["healthy"], run["name"]
        c = run["counters"]["workload"]
        assert c["held"] >= 300 * 2  # the first datagram of every flow, each family, is confirmed
        assert c["released"] == c["held"]  # every release ran within the drain time
        assert c["alloc_failures"] == 0 and c["no_entry"] == 0
        ct = d["workload_ct"]
        # the entries kept alive are the clash losers, plus insertions that failed
        assert ct["clashres"] <= c["kept_alive"] <= ct["clashres"] + ct["insert_failed"], (c, ct)
    beside = runs["hold-ref+livepatch"]
    assert beside["livepatch"]["enabled"] == "1" and beside["livepatch"]["transition"] == "0"
    assert "rmmod" in beside["unload"]["method"]
