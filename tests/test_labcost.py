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
    assert text.count("measure new") == 8 and text.count("measure established") == 8
    states = [line.split()[-1] for line in text.splitlines() if line.startswith("measure") and " 1 o" in line]
    assert states == ["on"] * 4 + ["off"] * 4  # pair 1 runs the patched phase first (no order effect on one side)
    ports = {cp.sport(p, s, f) for p in range(2) for s in range(2) for f in range(2)}
    assert len(ports) == 8 and max(ports) + 100 <= 65535  # blocks of source ports never overlap


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
    result = run_cost(cfg, manifest, CostPlan(pairs=1, datagrams=100))
    d = result.to_dict()
    assert result.completed and not result.faults and result.lost() == 0, d
    assert all(r["median"] is not None for r in result.ratios().values()), d
    loads = [r for r in result.records if r.get("type") == "insmod" and r.get("role") == "mitigation"]
    unloads = [r for r in result.records if r.get("type") == "unload"]
    assert [r["rc"] for r in loads] == [0] and [r["rmmod_rc"] for r in unloads] == [0], d
