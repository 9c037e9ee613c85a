"""Wrong build refused for every module the generated module attaches to, on the RHEL 7.7 kernel (issue 12 part 2).

On 3.10 conntrack is three modules: nf_conntrack (the exported confirm every strategy calls), nf_conntrack_ipv4
(ipv4_confirm) and nf_conntrack_ipv6 (ipv6_confirm, an optional target: attached when it loads). The module records
the build ID of each and checks every one that is loaded at load, and nf_conntrack_ipv6 again before attaching to it
when it loads later. "Another build" of nf_conntrack_ipv6 is made here by generating against a copy of the real
module whose build-ID note differs in one byte (what a rebuild changes: the live module in the guest is the real one);
everything else about the copy is the real module. Skips until the RHEL 7.7 kernel is built (make rhel-kernels).
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from conftest import run_nqgen
from nqgen import kernels
from nqgen.kernels import BuiltKernel
from nqgen.lab.kernel import default_cache_dir, resolve_image
from nqgen.lab.manifest import Manifest, discover
from nqgen.lab.runner import LabConfig
from nqgen.lab.soak import BootRecord, SoakModule, make_lab

CONNTRACK = {
    "nf_conntrack": "kernel/net/netfilter/nf_conntrack.ko",
    "nf_conntrack_ipv4": "kernel/net/ipv4/netfilter/nf_conntrack_ipv4.ko",
    "nf_conntrack_ipv6": "kernel/net/ipv6/netfilter/nf_conntrack_ipv6.ko",
}


def _built() -> BuiltKernel:
    k = kernels.find_built("rhel77")
    if k is None:
        pytest.skip("rhel77 is not built (make rhel-kernels, or nqgen kernel build rhel77 --source DIR)")
    return k


def build_id(ko: Path) -> str:
    with ko.open("rb") as fh:
        sec = ELFFile(fh).get_section_by_name(".note.gnu.build-id")
        assert sec is not None, ko
        return str(next(iter(sec.iter_notes()))["n_desc"])


def other_build_id(ko: Path, dest: Path) -> Path:
    """A copy of ``ko`` whose GNU build ID differs in its last byte."""
    with ko.open("rb") as fh:
        sec = ELFFile(fh).get_section_by_name(".note.gnu.build-id")
        assert sec is not None, ko
        end = sec["sh_offset"] + sec["sh_size"] - 1  # last byte of the descriptor (20-byte SHA-1, aligned)
    data = bytearray(ko.read_bytes())
    data[end] ^= 0xFF
    dest.write_bytes(bytes(data))
    assert build_id(dest) != build_id(ko)
    return dest


def _args(k: BuiltKernel, modules: dict[str, Path], out: Path) -> list[str]:
    args = ["--strategy", "ftrace", "--kdir", str(k.kdir), "--out", str(out)]
    for path in modules.values():
        args += ["--module", str(path)]
    return args


def _generate(k: BuiltKernel, modules: dict[str, Path], out: Path) -> dict[str, Manifest]:
    out.parent.mkdir(parents=True, exist_ok=True)
    res = run_nqgen(_args(k, modules, out), out.parent)
    assert res.returncode == 0, res.stderr
    make = subprocess.run(["nice", "-n", "10", "make", "-C", str(out)], capture_output=True, text=True, timeout=1800)
    assert make.returncode == 0, (make.stdout + make.stderr)[-3000:]
    return {m.strategy: m for m in discover(out)}


def test_generated_c_checks_every_module_it_attaches_to(tmp_path: Path) -> None:
    k = _built()
    real = {name: k.modules_dir / rel for name, rel in CONNTRACK.items()}
    out = tmp_path / "out"
    res = run_nqgen(_args(k, real, out), tmp_path)
    assert res.returncode == 0, res.stderr
    c = (out / "ftrace" / "nq_target_id.c").read_text()
    for name, path in real.items():
        bid = build_id(path)
        assert f'.module = "{name}"' in c
        assert ", ".join(f"0x{bid[i:i + 2]}" for i in range(0, 16, 2)) in c, name  # first 8 bytes, as rendered
    entry = c[c.index('.module = "nf_conntrack_ipv6"'):]
    assert ".optional = true" in entry.split("}", 1)[0]  # optional target: checked when it loads
    assert "nq_target_id_check_late" in (out / "ftrace" / "nq_resolve.c").read_text()


def _step(rec: BootRecord, i: int) -> dict[str, Any]:
    (s,) = [r for r in rec.of_type("step") if r["i"] == i]
    s["dmesg"] = base64.b64decode(s["dmesg_b64"]).decode("utf-8", "replace")
    return s


@pytest.mark.vm
def test_rhel77_refuses_another_build_of_nf_conntrack_ipv6(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (make deps installs it)")
    k = _built()
    real = {name: k.modules_dir / rel for name, rel in CONNTRACK.items()}
    (tmp_path / "other").mkdir()  # the file name is the module name on 3.10 (no "name" in .modinfo)
    other = other_build_id(real["nf_conntrack_ipv6"], tmp_path / "other" / "nf_conntrack_ipv6.ko")
    wrong_v6 = {**real, "nf_conntrack_ipv6": other}
    right = SoakModule.of(_generate(k, real, tmp_path / "right" / "out")["ftrace"])
    right = SoakModule(right.name, right.ko, right.params, file="nq_ftrace_right")
    wrong = SoakModule.of(_generate(k, wrong_v6, tmp_path / "wrong" / "out")["ftrace"])
    v6 = SoakModule("nf_conntrack_ipv6", real["nf_conntrack_ipv6"])  # the real module, loaded again by the test
    cfg = LabConfig(kernel=resolve_image(k.image, default_cache_dir()), modules_dir=k.modules_dir, kdir=k.kdir,
                    memory="512M", logs_dir=tmp_path / "logs")  # fmt: skip
    lab, keep = make_lab(cfg, tmp_path / "work", helper=False)  # the soak helper is written for 4.10+
    with keep:
        rec = lab.steps("rhel77-wrong-v6", [
            ("load", wrong),  # 0: nf_conntrack_ipv6 (loaded at boot) is another build: refused
            ("load", right),  # 1: the right builds: loads
            ("unload", right),  # 2
            ("unload", v6),  # 3: nf_conntrack_ipv6 goes
            ("load", wrong),  # 4: loads: nf_conntrack and nf_conntrack_ipv4 match, ipv6 is not there
            ("load", v6),  # 5: ipv6 comes: checked before attaching, not attached
            ("unload", wrong),  # 6
        ])  # fmt: skip
    assert rec.done and not rec.faults, (rec.faults, rec.outcome.console[-3000:])
    s = _step(rec, 0)
    assert s["rc"] != 0, s
    assert "nq_ftrace: wrong target: nf_conntrack_ipv6 build ID" in s["dmesg"] and "refusing to load" in s["dmesg"]
    assert "redirected" not in s["dmesg"]
    assert _step(rec, 1)["rc"] == 0 and "wrong target" not in _step(rec, 1)["dmesg"]
    assert _step(rec, 2)["rmmod_rc"] == 0 and _step(rec, 3)["rmmod_rc"] == 0
    s = _step(rec, 4)
    assert s["rc"] == 0 and "wrong target" not in s["dmesg"], s
    assert "[nf_conntrack_ipv6] is not loaded: ipv6_confirm is attached when it loads" in s["dmesg"]
    s = _step(rec, 5)
    assert s["rc"] == 0, s
    assert "nq_ftrace: wrong target: nf_conntrack_ipv6 build ID" in s["dmesg"] and "not attaching to it" in s["dmesg"]
    assert "[nf_conntrack_ipv6] loaded, but ipv6_confirm cannot be used: ipv6 stays unprotected" in s["dmesg"]
    assert "ipv6_confirm attached" not in s["dmesg"]
    assert _step(rec, 6)["rmmod_rc"] == 0
    before, after = rec.states["before"], rec.states["after"]
    assert after.refcnt == before.refcnt and after.enabled_functions == before.enabled_functions
    assert after.modules == before.modules
    traffic = rec.of_type("traffic")
    assert traffic and all(t["received"] == t["sent"] > 0 for t in traffic), traffic
