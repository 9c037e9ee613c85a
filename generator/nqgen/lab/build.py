"""Build what the guest runs: the static guest programs and the lab's helper module (against the target kdir)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from ..errors import BuildError, InputError
from .guestapi import GuestApi

GUEST_PROGRAMS = ("nq_udprace", "nq_queue", "nq_ctevents", "nq_pktcost")
GUEST_HEADERS = ("nq_nfq.h",)  # shared by the NFQUEUE consumers (nq_queue, the node's nq_nfqpool)
HELPER_MODULE = "nqlab_ct"
DETECTOR_MODULE = "nqlab_detect"


def guest_source(name: str) -> str:
    """The text of a file in the ``nqgen/guest`` package data."""
    return resources.files("nqgen").joinpath("guest", name).read_text()


def stage_guest_headers(dest: Path) -> None:
    """Write the guest programs' shared headers next to their sources in ``dest``."""
    for name in GUEST_HEADERS:
        (dest / name).write_text(guest_source(name))


def build_programs(dest: Path) -> dict[str, Path]:
    """Compile every guest program with ``gcc -static -O2 -Wall -Werror``; name -> binary."""
    if shutil.which("gcc") is None:
        raise BuildError("gcc not found: the lab compiles its guest programs")
    dest.mkdir(parents=True, exist_ok=True)
    stage_guest_headers(dest)
    out: dict[str, Path] = {}
    for name in GUEST_PROGRAMS:
        src = dest / f"{name}.c"
        src.write_text(guest_source(f"{name}.c"))
        binary = dest / name
        proc = subprocess.run(
            ["gcc", "-static", "-O2", "-Wall", "-Werror", "-pthread", "-o", str(binary), str(src)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BuildError(f"gcc failed for guest program {name}: {_first_error(proc.stderr)}")
        out[name] = binary
    return out


def build_module(
    source: str, name: str, kdir: Path, dest: Path, cflags: Sequence[str] = (), kasan: bool = True
) -> Path:
    """Build one single-file kernel module ``name`` from ``source`` against ``kdir``.

    ``cflags`` are added to the module's ccflags; ``kasan=False`` leaves it uninstrumented on a KASAN kernel.
    """
    if not (kdir / "Makefile").is_file():
        raise InputError(f"{kdir} is not a kernel build tree (no Makefile); pass --kdir")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{name}.c").write_text(source)
    # -Werror, except for the alias warning gcc >= 9 raises inside module_init() of kernels older than
    # upstream a6e60d84989f (3.10, 4.18): it comes from the kernel's own init.h, not from our code
    flags = ["-Werror", "-Wno-error=missing-attributes", *cflags]
    kbuild = f"obj-m := {name}.o\nccflags-y := {' '.join(flags)}\n"
    if not kasan:
        kbuild += f"KASAN_SANITIZE_{name}.o := n\n"
    (dest / "Kbuild").write_text(kbuild)
    proc = subprocess.run(
        ["make", "-C", str(kdir), f"M={dest}", "modules"],
        capture_output=True,
        text=True,
        check=False,
    )
    ko = dest / f"{name}.ko"
    if proc.returncode != 0 or not ko.is_file():
        raise BuildError(f"building {name}.ko against {kdir} failed: {_first_error(proc.stdout + proc.stderr)}")
    return ko


def build_helper(kdir: Path, dest: Path, api: GuestApi) -> Path:
    """The lab's helper module nqlab_ct.ko, built against the target's kdir for its hook API."""
    return build_module(guest_source(f"{HELPER_MODULE}.c"), HELPER_MODULE, kdir, dest, api.cflags())


def build_detector(kdir: Path, dest: Path, api: GuestApi) -> Path:
    """The stale-use detector nqlab_detect.ko (kprobes only read freed entries: no KASAN instrumentation)."""
    return build_module(guest_source(f"{DETECTOR_MODULE}.c"), DETECTOR_MODULE, kdir, dest, api.cflags(), kasan=False)


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()[:300]
    lines = [x for x in text.splitlines() if x.strip()]
    return lines[-1].strip()[:300] if lines else "no output"
