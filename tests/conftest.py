"""Shared fixtures: the real Debian kernel this machine has installed (make deps installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DebianKernel:
    release: str
    kdir: Path
    modules_dir: Path
    nf_conntrack: Path
    system_map: Path
    config: Path
    vmlinuz: Path


def _debian_release() -> str | None:
    try:
        out = subprocess.run(
            [str(ROOT / "scripts" / "debian-kernel")], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out or None


@pytest.fixture(scope="session")
def debian() -> DebianKernel:
    release = _debian_release()
    if release is None:
        pytest.skip("Debian's linux-image-amd64 is not installed (make deps installs it)")
    mods = Path("/lib/modules") / release
    k = DebianKernel(
        release=release,
        kdir=mods / "build",
        modules_dir=mods,
        nf_conntrack=mods / "kernel/net/netfilter/nf_conntrack.ko",
        system_map=Path(f"/boot/System.map-{release}"),
        config=Path(f"/boot/config-{release}"),
        vmlinuz=Path(f"/boot/vmlinuz-{release}"),
    )
    for p in (k.kdir, k.nf_conntrack, k.system_map, k.config, k.vmlinuz):
        if not p.exists():
            pytest.skip(f"{p} is missing (make deps installs linux-headers-amd64 and linux-image-amd64)")
    return k


@dataclass(frozen=True)
class DebianBuilt:
    """Every strategy generated for Debian's nf_conntrack.ko and built with ``make -C out`` (which ends with
    ``nqgen verify``): one build shared by the whole session."""

    out: Path
    log: str  # make's stdout and stderr


def make_jobs() -> list[str]:
    """``-jN`` for the cores this machine has: the suite runs one test at a time, so a build may use them all."""
    return [f"-j{os.cpu_count() or 1}"]


@pytest.fixture(scope="session")
def debian_built(debian: DebianKernel, tmp_path_factory: pytest.TempPathFactory) -> DebianBuilt:
    """Read only: tests that write into an out directory (``nqgen lab --out``, ``make sign``) use a copy or
    a tree of their own. ``make -C out`` in the shared tree itself only adds files (packages/)."""
    work = tmp_path_factory.mktemp("debian-built")
    args = ["--strategy", "all", "--kdir", str(debian.kdir), "--module", str(debian.nf_conntrack), "--out", "out"]
    res = run_nqgen(args, cwd=work)
    assert res.returncode == 0, res.stderr
    make = subprocess.run(
        ["nice", "-n", "10", "make", *make_jobs(), "-C", "out"], cwd=work, capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip
    assert make.returncode == 0, make.stdout[-3000:] + make.stderr[-3000:]
    return DebianBuilt(work / "out", make.stdout + make.stderr)


def nqgen_cmd() -> list[str]:
    """The nqgen command as installed next to this interpreter (falls back to python -m nqgen)."""
    exe = Path(sys.executable).with_name("nqgen")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("nqgen")
    return [found] if found else [sys.executable, "-m", "nqgen"]


def run_nqgen(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "NQGEN_KDIR"}
    full_env.update(env or {})
    return subprocess.run([*nqgen_cmd(), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
