"""The whole node scenario in one command: generate every strategy, build it, run ``nqgen lab --scenario node``.

``python -m nqgen.lab.scenarios.node --target debian`` uses the installed Debian kernel (``make node``);
``--target repro`` the vulnerable reference kernel (``make node-repro``; built first when missing);
``--target rhel77`` the RHEL 7.7 kernel of ``nqgen kernel build rhel77`` (3.10: never built here, too long). The
strategies are generated with ``--nat yes --allow-nat-breakage``: the node's ruleset has NAT in the path and
the point is to measure what each strategy does to it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from .... import reprokernel
from ....errors import BuildError, InputError, NqgenError


def _targets(target: str, release: str | None, jobs: int) -> tuple[Path, Path, Path, list[Path]]:
    """(kernel image, modules dir, kdir, conntrack modules) of the target."""
    if target == "repro":
        rk = reprokernel.ensure_built(jobs=jobs)
        return rk.image, rk.modules_dir, rk.kdir, [rk.modules_dir / "kernel/net/netfilter/nf_conntrack.ko"]
    if target == "rhel77":
        from .... import kernels
        from ....probe import find_conntrack_modules

        k = kernels.find_built("rhel77")
        if k is None:
            raise InputError("the rhel77 kernel is not built: nqgen kernel build rhel77 --source DIR")
        return k.image, k.modules_dir, k.kdir, find_conntrack_modules(k.modules_dir)
    if not release:
        raise InputError("--target debian needs --release (make node passes scripts/debian-kernel's answer)")
    mods = Path("/lib/modules") / release
    if not (mods / "build" / "Makefile").is_file():
        raise InputError(f"{mods}/build is not a kernel build tree (apt-get install linux-headers-{release})")
    return Path(f"/boot/vmlinuz-{release}"), mods, mods / "build", [mods / "kernel/net/netfilter/nf_conntrack.ko"]


def run_full(out: Path, target: str, release: str | None, lookups: int, jobs: int, strategies: tuple[str, ...],
             repeat: int) -> int:
    image, mods, kdir, ct = _targets(target, release, jobs)
    nqgen = [sys.executable, "-m", "nqgen"]
    gen = subprocess.run([*nqgen, "--strategy", "all", "--nat", "yes", "--allow-nat-breakage", "--kdir", str(kdir),
                          *(a for ko in ct for a in ("--module", str(ko))), "--out", str(out)], check=False)
    if gen.returncode != 0:
        raise BuildError(f"generation for {kdir} failed (exit {gen.returncode})")
    make = subprocess.run(["make", "-C", str(out), f"-j{jobs}", "NQGEN=" + " ".join(nqgen)], check=False)
    if make.returncode != 0:
        raise BuildError(f"make -C {out} failed")
    cmd = [*nqgen, "lab", "--scenario", "node", "--out", str(out), "--kernel", str(image), "--modules-dir",
           str(mods), "--kdir", str(kdir), "--lookups", str(lookups), "--repeat", str(repeat),
           "--timeout", "400" if target == "debian" else "900",
           # KASAN under TCG: 400 lookups per family take minutes (the reference-kernel test uses 300 s too)
           "--lookup-deadline", "30" if target == "debian" else "300"]
    for s in strategies:
        cmd += ["--strategy", s]
    return subprocess.run(cmd, check=False).returncode


@click.command()
@click.option("--target", type=click.Choice(["debian", "repro", "rhel77"]), default="debian", show_default=True)
@click.option("--release", help="The Debian kernel release (--target debian).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out-node"), show_default=True)
@click.option("--lookups", type=click.IntRange(1, 400), default=200, show_default=True)
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--strategy", "strategies", multiple=True, help="Only these strategies (default all built).")
@click.option("--repeat", type=click.IntRange(1, 20), default=1, show_default=True)
def main(target: str, release: str | None, out: Path, lookups: int, jobs: int, strategies: tuple[str, ...],
         repeat: int) -> None:
    """Generate, build and run the node scenario on the Debian, the reference or the RHEL 7.7 kernel."""
    try:
        rc = run_full(out, target, release, lookups, jobs, strategies, repeat)
    except NqgenError as exc:
        click.echo(f"nqgen node: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(rc)
