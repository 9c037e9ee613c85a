"""The ftrace and livepatch strategies in the lab: what the kernel itself says while they are loaded.

- ``sysctl kernel.ftrace_enabled=0`` must be refused while either module is loaded (FTRACE_OPS_FL_PERMANENT;
  before it, the write silently turned the redirect off);
- the kernel must list every function the module claims to patch (on Debian 6.1, G2: ipv4_confirm,
  ipv6_confirm and the exported nf_confirm) as patched: ftrace's enabled_functions with an IPMODIFY record,
  livepatch's sysfs function directories;
- bridged packets (pings out through a bridge with a dummy port; nf_conntrack_bridge's POST_ROUTING hook calls
  nf_confirm() directly) reach the corrected nf_confirm: its counter nf_confirm_calls grows;
- the livepatch unload waits for the enable transition to finish before it disables (a disable while the
  enable transition is pending reverses it mid-way; the soak's load/unload loops locked up on it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DebianBuilt, DebianKernel
from nqgen.lab.guest import GuestModule, GuestPlan, Workload, _livepatch_wait_block, render_init
from nqgen.lab.results import RunResult, apply_results


def _plan(unload: str, patched: tuple[str, ...], permanent: bool | None, bridge: bool = False) -> GuestPlan:
    return GuestPlan(
        run="t",
        deps=(GuestModule("nf_conntrack", "/lib/modules/r/nf_conntrack.ko", "dep"),),
        helper=GuestModule("nqlab_ct", "/nqlab/nqlab_ct.ko", "helper", ("queue=-1",)),
        mitigation=GuestModule("nq_livepatch", "/nqlab/nq_livepatch.ko", "mitigation"),
        workload=Workload(rounds=3),
        unload=unload,
        livepatch_sysfs="/sys/kernel/livepatch/nq_livepatch" if unload == "livepatch" else None,
        ftrace_permanent=permanent,
        patched=patched,
        bridge=bridge,
    )


def _valid_shell(script: str) -> None:
    shell = "/bin/busybox" if Path("/bin/busybox").is_file() else "/bin/sh"
    args = [shell, "sh", "-n"] if shell.endswith("busybox") else [shell, "-n"]
    proc = subprocess.run([*args, "/dev/stdin"], input=script, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_livepatch_unload_waits_for_the_enable_transition_before_disabling() -> None:
    script = render_init(_plan("livepatch", ("ipv4_confirm",), True))
    _valid_shell(script)
    unload = script[script.index("log before-unload") :]
    disable = unload.index('echo 0 > "$LP/enabled"')
    wait = re.search(r'while \[ -e "\$LP/transition" \] && \[ "\$\(cat "\$LP/transition"', unload)
    assert wait is not None and wait.start() < disable, unload[:600]
    assert "ENWAIT=" in unload[:disable] and '\\"enable_wait_ms\\":$ENWAIT' in unload


def test_guest_checks_the_sysctl_and_the_patched_functions() -> None:
    script = render_init(_plan("rmmod", ("ipv4_confirm", "nf_confirm"), True))
    _valid_shell(script)
    assert "echo 0 > /proc/sys/kernel/ftrace_enabled" in script and "echo 1 > /proc/sys/kernel/ftrace_enabled" in script
    assert "/sys/kernel/tracing/enabled_functions" in script and "for fn in ipv4_confirm nf_confirm" in script
    plain = render_init(_plan("rmmod", (), None))  # a hook-based module: neither check
    assert "ftrace_enabled" not in plain and "enabled_functions" not in plain and "nqbr0" not in plain
    bridged = render_init(_plan("livepatch", ("nf_confirm",), True, bridge=True))
    _valid_shell(bridged)
    assert "ip link add nqbr0 type bridge" in bridged and "ping6 -c 3 -W 1 -I nqbr0 ff02::1" in bridged
    assert bridged.index("nqbr0 type bridge") < bridged.index("log before-unload")


@pytest.mark.skipif(not Path("/bin/busybox").is_file(), reason="needs busybox-static")
def test_a_pending_enable_transition_names_the_tasks_not_yet_switched(tmp_path: Path) -> None:
    """The guest's wait for the enable transition, run by busybox sh against a made-up /proc and livepatch
    directory: when the transition is still 1, the record names every task whose patch_state is 0 (on RHEL 8.1
    built with gcc 12 it was the oom_reaper kthread, unwindable only once objtool knew gcc's ".cold" names), and
    the lab's problem says so."""
    block = _livepatch_wait_block("/sys/kernel/livepatch/nq_livepatch", "MIT")
    proc, lp = tmp_path / "proc", tmp_path / "lp"
    for pid, state, comm in ((1, "1", "init"), (261, "0", "oom_reaper"), (300, "-1", "kworker/0:1H")):
        task = proc / str(pid) / "task" / str(pid)
        task.mkdir(parents=True)
        (task / "patch_state").write_text(state + "\n")
        (task / "comm").write_text(comm + "\n")
    lp.mkdir()
    (lp / "enabled").write_text("1\n")
    (lp / "transition").write_text("1\n")
    block = block.replace("/proc/", f"{proc}/").replace("/sys/kernel/livepatch/nq_livepatch", str(lp))
    block = block.replace("-lt 300", "-lt 2")
    script = "usleep() { :; }\nemit() { printf '%s\\n' \"$1\"; }\nMIT=1\n" + block + "\n"
    out = subprocess.run(["/bin/busybox", "sh", "-c", script], capture_output=True, text=True, check=True).stdout
    rec = json.loads(out)
    assert rec == {"type": "livepatch", "enabled": "1", "transition": "1", "waited_ms": 200,
                   "pending": "oom_reaper:261"}
    run = RunResult(name="livepatch", kind="mitigation", strategy="livepatch", module="nq_livepatch", nfqueue=False)
    apply_results(run, out)
    assert "livepatch not fully applied (enabled 1, transition 1; tasks not yet switched: oom_reaper:261)" in run.errors
    (lp / "transition").write_text("0\n")
    done = json.loads(subprocess.run(["/bin/busybox", "sh", "-c", script], capture_output=True, text=True,
                                     check=True).stdout)
    assert done["transition"] == "0" and done["pending"] == "" and done["waited_ms"] == 0


# ---- real boot on the Debian kernel ------------------------------------------------------------------------


def _lab_ready() -> bool:
    return shutil.which("qemu-system-x86_64") is not None and Path("/bin/busybox").is_file()


@pytest.mark.vm
@pytest.mark.skipif(not _lab_ready(), reason="needs qemu-system-x86_64 and busybox-static")
def test_ftrace_and_livepatch_on_the_debian_kernel(
    debian: DebianKernel, debian_built: DebianBuilt, tmp_path: Path
) -> None:
    out = tmp_path / "out"  # a copy of the session's built tree (conftest): the lab writes lab.json into it
    shutil.copytree(debian_built.out, out, symlinks=True)
    cmd = [sys.executable, "-m", "nqgen", "lab", "--out", str(out), "--kernel", str(debian.vmlinuz)]
    cmd += ["--modules-dir", str(debian.modules_dir), "--kdir", str(debian.kdir), "--timeout", "300"]
    cmd += ["--strategy", "ftrace", "--strategy", "livepatch", "--no-baselines", "--rounds", "60"]
    lab = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1500)
    assert lab.returncode == 0, lab.stderr + lab.stdout
    runs = {r["name"]: r for r in json.loads((out / "lab.json").read_text())["runs"]}
    assert set(runs) == {"ftrace", "livepatch"}
    for name, run in runs.items():
        assert run["errors"] == [], name
        assert run["derived"]["fault_count"] == 0 and run["derived"]["unloaded"] and run["derived"]["healthy"]
        # FTRACE_OPS_FL_PERMANENT (ours for ftrace, the kernel's own for livepatch): the sysctl is refused
        assert run["ftrace_enabled"]["expect_refused"] is True and run["ftrace_enabled"]["refused"] is True, name
        assert run["ftrace_enabled"]["write_rc"] != 0, name
        # G2: nf_confirm is patched too, and the corrected copies ran
        assert run["patched"] == {"ipv4_confirm": True, "ipv6_confirm": True, "nf_confirm": True}, name
        assert "nf_confirm_calls" in run["counters"]["workload"], name
        bridge = run["bridge"]
        assert bridge["setup"] is True and bridge["nf_confirm_after"] > bridge["nf_confirm_before"], (name, bridge)
        assert run["counters"]["workload"]["confirm_calls"] >= 60 * 2 * 2, name
    lp = runs["livepatch"]
    assert lp["livepatch"]["transition"] == "0" and lp["livepatch"]["pending"] == ""
    assert "enable_wait_ms" in lp["unload"] and lp["unload"]["method"] == "livepatch"
    assert "livepatch enabling:" in lp["kernel_log"] + json.dumps(lp["loads"])
