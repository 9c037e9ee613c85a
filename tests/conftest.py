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
