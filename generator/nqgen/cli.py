"""The ``nqgen`` command line: the only place where errors become messages and exit codes."""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import EXIT_INPUT, InputError, NqgenError, UsageError
from .strategies import DEFAULT, NAMES

_PATH = click.Path(path_type=Path)


def _err(message: str) -> None:
    click.echo(message, err=True)


def _check_exists(option: str, path: Path | None, want_dir: bool = False) -> None:
    if path is None:
        return
    if not path.exists():
        raise InputError(f"{option} {path}: no such {'directory' if want_dir else 'file'}")
    if want_dir and not path.is_dir():
        raise InputError(f"{option} {path}: not a directory")
    if not want_dir and path.is_dir():
        raise InputError(f"{option} {path}: is a directory, expected a file")


def _check_strategy(name: str) -> None:
    choices = (*NAMES, "all")
    if name in choices:
        return
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UsageError(f"unknown strategy {name!r}{hint}; choose from {', '.join(choices)}")


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--strategy",
    default=DEFAULT,
    show_default=True,
    help=f"Mitigation to generate: {', '.join(NAMES)}, or all.",
)
@click.option(
    "--kdir",
    type=_PATH,
    envvar="NQGEN_KDIR",
    help="Target kernel build/headers tree (default $NQGEN_KDIR, else /lib/modules/$(uname -r)/build).",
)
@click.option(
    "--module",
    "modules",
    type=_PATH,
    multiple=True,
    help="Module with the confirm function (nf_conntrack.ko[.xz/.zst/.gz], nf_conntrack_ipv4.ko); repeatable.",
)
@click.option("--vmlinux", type=_PATH, help="The target's vmlinux ELF.")
@click.option("--system-map", type=_PATH, help="The target's System.map.")
@click.option("--kallsyms", type=_PATH, help="A copy of the target's /proc/kallsyms.")
@click.option("--config", "config", type=_PATH, help="The target's kernel .config.")
@click.option("--symvers", type=_PATH, help="The target's Module.symvers (default <kdir>/Module.symvers).")
@click.option(
    "--from-package",
    "packages",
    type=_PATH,
    multiple=True,
    help="Read the target from its kernel packages (kernel-devel/kernel[-core,-modules] .rpm, "
    "linux-headers/-common/linux-kbuild/linux-image .deb); repeatable.",
)
@click.option("--out", type=_PATH, default=Path("out"), show_default=True, help="Output directory, replaced whole.")
@click.option("--profile-only", is_flag=True, help="Print the kernel profile as JSON and write nothing.")
@click.option("--nat", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Is NAT (SNAT/MASQUERADE) in the packet path? auto: inspect the running system if it runs "
                   "the target kernel.")
@click.option("--allow-nat-breakage", is_flag=True,
              help="Generate strategies that break NAT (advance-confirm*) even when NAT is in the path.")
@click.option("--force", is_flag=True, help="Replace --out even when it is a link, a file or not nqgen's.")
@click.option("--max-decompressed", type=click.IntRange(1), metavar="MIB",
              help="Most MiB a compressed module/vmlinux may expand to (default: 32x its size, at least 256 MiB, "
                   "at most 8 GiB; $NQGEN_MAX_DECOMPRESSED_MIB).")
@click.option("--targets", type=_PATH, metavar="DIR|LIST",
              help="Fleet mode: generate for every kernel in DIR (one input directory per kernel) or in a list file "
                   "(NAME --kdir PATH --module PATH ... per line); one subdirectory of --out per kernel.")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), default=None,
              help="Fleet mode: worker processes (default: the CPUs this process may use).")
@click.pass_context
def cli(
    ctx: click.Context,
    strategy: str,
    kdir: Path | None,
    modules: tuple[Path, ...],
    vmlinux: Path | None,
    system_map: Path | None,
    kallsyms: Path | None,
    config: Path | None,
    symvers: Path | None,
    packages: tuple[Path, ...],
    out: Path,
    profile_only: bool,
    nat: str,
    allow_nat_breakage: bool,
    force: bool,
    max_decompressed: int | None,
    targets: Path | None,
    jobs: int | None,
) -> None:
    """Generate kernel modules that mitigate the nf_conntrack confirm use-after-free (CVE-2022-49561).

    Run without a command to generate; `nqgen lab` runs the generated modules in a VM, `nqgen verify` checks
    built modules against the target.
    """
    if max_decompressed is not None:
        from .symsources import CAP_ENV

        os.environ[CAP_ENV] = str(max_decompressed)
    if ctx.invoked_subcommand is not None:
        return
    from .generate import generate
    from .probe import ProfileInputs, build_profile, default_inputs

    _check_strategy(strategy)
    if targets is not None:
        given = [opt for opt, value in (("--kdir", kdir), ("--module", modules), ("--vmlinux", vmlinux),
                                        ("--system-map", system_map), ("--kallsyms", kallsyms), ("--config", config),
                                        ("--symvers", symvers), ("--from-package", packages),
                                        ("--profile-only", profile_only)) if value]  # fmt: skip
        if given:
            raise UsageError(f"--targets names every kernel's inputs itself: drop {', '.join(given)}")
        from .fleet import command as fleet_command
        from .fleet.run import FleetOptions

        done = fleet_command.run(targets, FleetOptions(strategy, nat, allow_nat_breakage), out,
                                 jobs or fleet_command.default_jobs(), force, click.echo)  # fmt: skip
        ctx.exit(done.exit_code)
    if jobs is not None:
        raise UsageError("--jobs applies to --targets only")
    _check_exists("--kdir", kdir, want_dir=True)
    for opt, path in (
        ("--vmlinux", vmlinux),
        ("--system-map", system_map),
        ("--kallsyms", kallsyms),
        ("--config", config),
        ("--symvers", symvers),
        *(("--module", m) for m in modules),
        *(("--from-package", p) for p in packages),
    ):
        _check_exists(opt, path)
    if packages:
        from .pkg.frompkg import from_packages

        target = from_packages(packages)
        _err(f"nqgen: {len(packages)} package(s) of {target.release} extracted in {target.root}")
        inputs = target.inputs
        if kdir is not None:
            inputs = dataclasses.replace(inputs, kdir=kdir)
    else:
        try:
            inputs = default_inputs(kdir=kdir)
        except InputError:
            if kdir is not None or not modules:
                raise
            # No tree for the running kernel, but the user named the module: profile what was given.
            inputs = ProfileInputs()
    overrides: dict[str, Any] = {}
    if modules:
        overrides["modules"] = list(modules)
    for key, value in (
        ("vmlinux", vmlinux),
        ("system_map", system_map),
        ("kallsyms", kallsyms),
        ("config", config),
        ("symvers", symvers),
    ):
        if value is not None:
            overrides[key] = value
    inputs = dataclasses.replace(inputs, **overrides)
    profile = build_profile(inputs)
    for warning in profile.warnings:
        _err(f"nqgen: warning: {warning}")
    if profile_only:
        click.echo(profile.to_json())
        return
    if profile.features.fix_present:
        _err(
            f"nqgen: WARNING: {profile.release} already carries the upstream fix (nf_conntrack_confirm re-reads ct "
            "after __nf_conntrack_confirm): no mitigation is needed on this kernel; generating anyway for testing"
        )
    if inputs.kdir is None:
        raise InputError("no kernel headers tree to build against: pass --kdir")
    from .natpath import decide_nat, gate

    nat_path = decide_nat(nat, profile.release)
    result = generate(profile, strategy, out, str(inputs.kdir), argv=sys.argv[1:], say=click.echo,
                      adjust=lambda d: gate(d, nat_path, allow_nat_breakage), force=force)
    click.echo(f"wrote {result.out}: build with `make -C {result.out}`, compare in {result.out}/COMPARISON.md")


@cli.command()
@click.option("--out", type=_PATH, default=Path("out"), show_default=True, help="Generated output directory.")
def verify(out: Path) -> None:
    """Check built modules against the target: vermagic and exported symbols."""
    from .verify import check_out

    _check_exists("--out", out, want_dir=True)
    for c in check_out(out):
        params = ", ".join(c.params) or "none"
        click.echo(f"ok {c.strategy}: {c.ko.name} vermagic '{c.vermagic.strip()}', params: {params}")
        if c.from_source:
            click.echo(f"   {len(c.from_source)} of its {len(c.undefined)} imports are known exported only from the "
                       "source tree's EXPORT_SYMBOL declarations (the target has no Module.symvers)")


def _add_lab() -> None:
    try:
        from .lab.command import lab
        from .lab.hookswap_command import lab_hookswap
    except ImportError:
        return
    cli.add_command(lab)
    cli.add_command(lab_hookswap)


_add_lab()


def _add_kernel() -> None:
    from .kernels.cli import kernel

    cli.add_command(kernel)


_add_kernel()


def _add_pkg() -> None:
    from .pkg.command import pkg, status_cmd

    cli.add_command(pkg)
    cli.add_command(status_cmd)


_add_pkg()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning nqgen errors into one line on stderr and an exit code."""
    try:
        rv = cli.main(args=argv, prog_name="nqgen", standalone_mode=False)
    except NqgenError as exc:
        _err(f"nqgen: error: {exc}")
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        _err(f"nqgen: error: {exc.format_message()}")
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _err("nqgen: aborted")
        sys.exit(1)
    except OSError as exc:
        _err(f"nqgen: error: {exc}")
        sys.exit(EXIT_INPUT)
    sys.exit(rv if isinstance(rv, int) else 0)
