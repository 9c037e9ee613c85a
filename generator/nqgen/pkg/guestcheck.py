"""A small lab hook for the host files: boot a real kernel with the packaged files in its initramfs, load each
module, run the shipped ``nqgen-status`` (busybox sh) and ``nqgen-unload``, and report what happened.

It reuses the lab's pieces (kernel image, module closure, cpio writer, qemu boot) but not its workload: no
traffic is needed to show what a host's operator sees. With ``module.sig_enforce=1`` on the command line the
same boot shows which module files the kernel refuses.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, LabError
from ..lab.initramfs import Cpio
from ..lab.kernel import default_cache_dir, resolve_image
from ..lab.modtree import ModuleTree, modinfo_depends, modinfo_softdeps, read_module
from ..lab.qemu import QemuConfig, boot

ROOTS = ("nf_conntrack",)
RESULT_TTY = "/dev/ttyS1"


@dataclass(frozen=True)
class GuestCase:
    """One module file to load in the guest: ``variant`` names the file (e.g. 'unsigned', 'signed')."""

    module: str
    variant: str
    ko: Path
    livepatch: bool = False


@dataclass
class CaseResult:
    module: str
    variant: str
    insmod_rc: int | None = None
    insmod_output: str = ""
    status_text: str = ""
    status_rc: int | None = None
    sysfs: dict[str, str] = field(default_factory=dict)
    unload_rc: int | None = None
    unload_output: str = ""
    still_loaded: bool = False


@dataclass
class GuestRun:
    release: str
    cases: list[CaseResult]
    final_status_text: str
    final_status_rc: int | None
    dep_failures: list[str]
    console: str
    done: bool


_INIT = r"""#!/bin/sh
PATH=/bin:/sbin:/usr/sbin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp
R=__TTY__
stty -F $R raw -echo 2>/dev/null
say() { printf '%s\n' "$*" > $R; }
case_run() {
	m=$1; variant=$2; ko=$3; lp=$4
	say "@@ case $m $variant"
	dmesg -c > /dev/null 2>&1
	insmod "$ko" > /tmp/e 2>&1
	rc=$?
	dmesg -c >> /tmp/e 2>&1
	say "@@ insmod $rc"
	cat /tmp/e > $R
	if [ $rc = 0 ]; then
		if [ "$lp" = 1 ]; then
			i=0
			while [ "$(cat /sys/kernel/livepatch/$m/transition 2>/dev/null)" != 0 ] && [ $i -lt 300 ]; do
				usleep 100000
				i=$((i + 1))
			done
		fi
		nqgen-status > /tmp/s 2>&1
		src=$?
		say "@@ status $src"
		cat /tmp/s > $R
		say "@@ sysfs"
		for f in /sys/module/$m/initstate /sys/module/$m/srcversion /sys/module/$m/parameters/* \
			/sys/kernel/$m/* /sys/kernel/livepatch/$m/enabled /sys/kernel/livepatch/$m/transition; do
			[ -f "$f" ] && [ -r "$f" ] && say "$f=$(cat "$f" | tr '\n' ' ' | sed 's/ *$//')"
		done
		/usr/libexec/nqgen/nqgen-unload "$m" > /tmp/u 2>&1
		urc=$?
		say "@@ unload $urc"
		cat /tmp/u > $R
		grep -q "^$m " /proc/modules && say "@@ still-loaded"
	fi
	say "@@ end"
}
"""


def _applets(busybox: Path) -> list[str]:
    proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=False)
    return [a for a in proc.stdout.split() if a and "/" not in a and a != "busybox"]


def render_init(deps: list[tuple[str, str]], cases: list[GuestCase]) -> str:
    lines = [_INIT.replace("__TTY__", RESULT_TTY)]
    for name, path in deps:
        lines.append(f"insmod {shlex.quote(path)} 2>/dev/null || say {shlex.quote('@@ dep-failed ' + name)}")
    for c in cases:
        path = f"/nq/{c.variant}/{c.module}.ko"
        lines.append(
            f"case_run {shlex.quote(c.module)} {shlex.quote(c.variant)} {shlex.quote(path)} {int(c.livepatch)}"
        )
    lines += [
        "nqgen-status > /tmp/s 2>&1",
        "src=$?",
        'say "@@ final-status $src"',
        "cat /tmp/s > $R",
        'say "@@ done"',
        "sync",
        "printf '\\001' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null",
        "poweroff -f",
    ]
    return "\n".join(lines) + "\n"


def parse(results: str) -> tuple[list[CaseResult], str, int | None, list[str], bool]:
    """The guest's ``@@``-tagged report: per-case results, the final status, failed deps, whether it ended."""
    cases: list[CaseResult] = []
    final_text: list[str] = []
    final_rc: int | None = None
    deps: list[str] = []
    done = False
    cur: CaseResult | None = None
    section = ""
    for line in results.splitlines():
        if line.startswith("@@ "):
            words = line[3:].split()
            tag = words[0] if words else ""
            if tag == "case" and len(words) == 3:
                cur = CaseResult(module=words[1], variant=words[2])
                cases.append(cur)
                section = ""
            elif tag == "insmod" and cur is not None:
                cur.insmod_rc, section = int(words[1]), "insmod"
            elif tag == "status" and cur is not None:
                cur.status_rc, section = int(words[1]), "status"
            elif tag == "sysfs":
                section = "sysfs"
            elif tag == "unload" and cur is not None:
                cur.unload_rc, section = int(words[1]), "unload"
            elif tag == "still-loaded" and cur is not None:
                cur.still_loaded = True
            elif tag == "end":
                cur, section = None, ""
            elif tag == "dep-failed":
                deps.append(" ".join(words[1:]))
            elif tag == "final-status":
                final_rc, section = int(words[1]), "final"
            elif tag == "done":
                done, section = True, ""
            continue
        if section == "final":
            final_text.append(line)
        elif cur is None:
            continue
        elif section == "insmod":
            cur.insmod_output += line + "\n"
        elif section == "status":
            cur.status_text += line + "\n"
        elif section == "unload":
            cur.unload_output += line + "\n"
        elif section == "sysfs" and "=" in line:
            key, _, value = line.partition("=")
            cur.sysfs[key] = value
    return cases, "\n".join(final_text) + ("\n" if final_text else ""), final_rc, deps, done


def run_guest(
    image: Path,
    modules_dir: Path,
    host_root: Path,
    cases: list[GuestCase],
    work: Path,
    append: str = "",
    busybox: Path = Path("/bin/busybox"),
    timeout: float = 300.0,
    firmware: tuple[Path, Path] | None = None,
) -> GuestRun:
    """Boot ``image`` with ``host_root`` (a staged host tree: nqgen-status, env files) and load each case."""
    if not busybox.is_file():
        raise InputError(f"{busybox} not found (apt-get install busybox-static)")
    kernel = resolve_image(image, default_cache_dir())
    tree = ModuleTree.load(modules_dir)
    roots = list(ROOTS)
    softdeps: list[str] = []
    for c in cases:
        roots += modinfo_depends(c.ko)
        softdeps += modinfo_softdeps(c.ko)
    deps = tree.closure(roots, softdeps)
    cpio = Cpio()
    for d in ("dev", "proc", "sys", "tmp"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.copy("bin/busybox", busybox, 0o755)
    for applet in _applets(busybox):
        if not cpio.has(f"bin/{applet}"):
            cpio.symlink(f"bin/{applet}", "busybox")
    cpio.symlink("sbin", "bin")
    for path in sorted(p for p in host_root.rglob("*") if p.is_file()):
        rel = path.relative_to(host_root).as_posix()
        cpio.copy(rel, path)
    moddir = f"lib/modules/{kernel.release}"
    guest_deps = []
    for mod in deps:
        cpio.file(f"{moddir}/{mod.plain_relpath}", read_module(modules_dir / mod.relpath))
        guest_deps.append((mod.name, f"/{moddir}/{mod.plain_relpath}"))
    for c in cases:
        cpio.copy(f"nq/{c.variant}/{c.module}.ko", c.ko)
    cpio.file("init", render_init(guest_deps, cases).encode(), 0o755)
    work.mkdir(parents=True, exist_ok=True)
    initrd = work / "initrd.cpio"
    initrd.write_bytes(cpio.bytes())
    # UEFI boots the bzImage through its EFI stub (the firmware's variables, db included, are then the kernel's)
    boot_image = image if firmware else kernel.boot_path
    cfg = QemuConfig(kernel=boot_image, initrd=initrd, smp=2, memory="1G", timeout=timeout, append=append,
                     firmware=firmware)  # fmt: skip
    outcome = boot(cfg, work)
    parsed, final_text, final_rc, dep_failures, done = parse(outcome.results)
    if not outcome.console.strip():
        raise LabError(f"the guest kernel printed nothing: {outcome.qemu_output.strip()[-200:]}")
    return GuestRun(
        release=kernel.release,
        cases=parsed,
        final_status_text=final_text,
        final_status_rc=final_rc,
        dep_failures=dep_failures,
        console=outcome.console,
        done=done,
    )


def sysfs_tree(sysfs: dict[str, str], dest: Path) -> Path:
    """Rebuild the files the guest read (``/sys/...`` -> value) under ``dest`` for ``nqgen status``."""
    for path, value in sysfs.items():
        if not path.startswith("/sys/"):
            continue
        target = dest / path[len("/sys/") :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(value + "\n")
    return dest
