"""The packet-path cost boot (``nqgen.lab.cost``): its script, and one short real boot with ftrace.

Only what the boot must show is asserted (every phase measured, nothing lost, no kernel report, the module loaded
and unloaded each time); the ratios themselves are ``make bench`` output, never asserted.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import DebianKernel, run_nqgen
from nqgen.errors import InputError
from nqgen.lab.cost import CostPlan, run_cost
from nqgen.lab.cost import render_init as render_cost_init
from nqgen.lab.kernel import default_cache_dir, resolve_image
from nqgen.lab.manifest import discover
from nqgen.lab.runner import LabConfig


def test_cost_script_is_valid_shell_and_alternates_phases() -> None:
    cp = CostPlan(pairs=2, datagrams=100)
    text = render_cost_init(cp, {"deps": "load dep a /a.ko false", "load": "MIT=0\nload mitigation m /m.ko false",
                                 "unload": "rmmod m"})  # fmt: skip
    proc = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert text.count("load mitigation m") == 2 and text.count("rmmod m") == 2
    # the sender times itself (nq_pktcost), once per phase, both families and kinds in it
    assert text.count("/bin/nq_pktcost -f 46 -n 100 -e 4 ") == 1
    phases = [line.split()[1:] for line in text.splitlines() if line.startswith("measure ")]
    assert [(pair, state) for _, pair, state in phases] == [("0", "off"), ("0", "on"), ("1", "on"), ("1", "off")]
    ports = [int(port) for port, _, _ in phases]  # pair 1 runs the patched phase first (no order effect on one side)
    assert len(set(ports)) == 4 and all(b - a >= 100 for a, b in zip(sorted(ports), sorted(ports)[1:], strict=False))
    assert max(ports) + 100 <= 65535 and "nf_conntrack_max" in text


def test_cost_plan_refuses_more_ports_than_exist() -> None:
    with pytest.raises(InputError):
        CostPlan(pairs=20, datagrams=2000).check()


@pytest.mark.vm
def test_one_cost_boot_measures_every_phase(debian: DebianKernel, tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None or not Path("/bin/busybox").is_file():
        pytest.skip("needs qemu-system-x86_64 and busybox-static")
    out = tmp_path / "out"
    args = ["--strategy", "ftrace", "--kdir", str(debian.kdir), "--module", str(debian.nf_conntrack)]
    proc = run_nqgen([*args, "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    make = subprocess.run(["make", "-C", str(out / "ftrace")], capture_output=True, text=True, check=False)
    assert make.returncode == 0, make.stdout + make.stderr
    image = resolve_image(debian.vmlinuz, default_cache_dir())
    cfg = LabConfig(kernel=image, modules_dir=debian.modules_dir, kdir=debian.kdir, memory="512M", timeout=400)
    (manifest,) = discover(out, ("ftrace",))
    result = run_cost(cfg, manifest, CostPlan(pairs=1, datagrams=100, repeat=2))
    d = result.to_dict()
    assert result.completed and not result.faults and result.lost() == 0, d
    assert all(r["median"] is not None for r in result.ratios().values()), d
    samples = [r["sample"] for r in result.records if r.get("type") == "cost"]
    assert len(samples) == 8 and all(s["ns"] > 0 and s["sent"] == s["datagrams"] for s in samples), samples
    assert {s["datagrams"] for s in samples} == {100, 200}
    assert set(result.stages()) == {"init", "ready", "measured"}, d
    loads = [r for r in result.records if r.get("type") == "insmod" and r.get("role") == "mitigation"]
    unloads = [r for r in result.records if r.get("type") == "unload"]
    assert [r["rc"] for r in loads] == [0] and [r["rmmod_rc"] for r in unloads] == [0], d
