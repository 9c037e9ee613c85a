"""``make repro``: the crash on a vulnerable kernel, and which strategy stops it.

Builds (or takes from the cache) the kernel of a recipe — the Debian 6.1 reference kernel by default, or a
kernel of the builder (``nqgen.kernels``: RHEL 7.7, RHEL 8.1, RHEL 8.1 with the extension freed at once) —
generates every strategy against its own conntrack modules and build tree, builds them, runs the lab on that
kernel with and without NFQUEUE in the path, several boots per configuration, and judges the result
(``reprotable``): a baseline must show the bug (a KASAN report or a stale use seen by the lab's detector), the
strategies that replace the confirm must show neither. ``advance-confirm`` is measured, not judged: it still runs
the unfixed confirm and the comparison says how often it faults.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import click

from . import reprokernel
from .errors import BuildError, LabError, NqgenError
from .generate import generate
from .probe import build_profile, default_inputs, find_conntrack_modules
from .reprotable import REPLACING, ConfigSummary, judge, markdown, summarize

__all__ = ["REPLACING", "REPRO_MD", "ConfigSummary", "Target", "ensure_target", "find_target", "judge", "markdown",
           "run", "summarize"]

REPRO_MD = "REPRO.md"
DEFAULT_RECIPE = "debian61-repro"
DEBIAN_TITLE = "Reproduction on the vulnerable reference kernel"


@dataclass(frozen=True)
class Target:
    """A built kernel to run the comparison on: what the lab and the generator need of it."""

    recipe: str
    title: str  # heading of the REPRO.md section
    release: str
    image: Path  # bzImage
    modules_dir: Path
    kdir: Path  # the build tree of the kernel that boots (modules are built against it)


class _Built(Protocol):
    @property
    def release(self) -> str: ...
    @property
    def image(self) -> Path: ...
    @property
    def modules_dir(self) -> Path: ...
    @property
    def kdir(self) -> Path: ...


def _target(recipe: str, title: str, built: _Built) -> Target:
    return Target(recipe, title, built.release, built.image, built.modules_dir, built.kdir)


def _kernels() -> Any:
    """The kernel builder package (``nqgen.kernels``), which builds the RHEL recipes."""
    try:
        return importlib.import_module("nqgen.kernels")
    except ModuleNotFoundError as exc:
        raise BuildError(f"kernel recipes other than {DEFAULT_RECIPE} need the kernel builder (nqgen.kernels)") from exc


def find_target(recipe: str = DEFAULT_RECIPE) -> Target | None:
    """The built kernel of ``recipe``, or None when it is not built (never builds)."""
    if recipe == DEFAULT_RECIPE:
        rk = reprokernel.find_built()
        return None if rk is None else _target(recipe, DEBIAN_TITLE, rk)
    kernels = _kernels()
    built = kernels.find_built(recipe)
    return None if built is None else _target(recipe, _title(kernels, recipe), built)


def ensure_target(recipe: str = DEFAULT_RECIPE, jobs: int = 2, source: Path | None = None) -> Target:
    """The built kernel of ``recipe`` (of exactly ``source`` when given: a kernel tree, tarball or .src.rpm),
    building it when it is not in the cache."""
    if recipe == DEFAULT_RECIPE and source is None:
        return _target(recipe, DEBIAN_TITLE, reprokernel.ensure_built(jobs=jobs))
    kernels = _kernels()
    return _target(recipe, _title(kernels, recipe), kernels.ensure_built(recipe, source, jobs=jobs))


def _kasan(kdir: Path) -> bool:
    config = kdir / ".config"
    return config.is_file() and "CONFIG_KASAN=y" in config.read_text(errors="replace").splitlines()


def _title(kernels: Any, recipe: str) -> str:
    return f"Reproduction on {kernels.get_recipe(recipe).summary} (recipe `{recipe}`)"


def run(
    out: Path,
    repeat: int,
    rounds: int,
    jobs: int,
    strategies: tuple[str, ...] = (),
    nfqueue_variants: bool = True,
    lab_args: tuple[str, ...] = (),
    recipe: str = DEFAULT_RECIPE,
    baselines: bool = True,
    source: Path | None = None,
) -> list[str]:
    """Generate, build and measure on the ``recipe`` kernel; the judge's problems (empty: the expected result).

    One strategy alone is generated (and built) alone, the cheap short form; ``baselines=False`` boots only the
    strategies, so no boot shows the bug and the judge asks for none.
    """
    # with a source, the build of exactly that source (built when not cached); without, a finished build of the
    # recipe is used as it is and only when there is none is one built
    target = ensure_target(recipe, jobs, source) if source is not None else (
        find_target(recipe) or ensure_target(recipe, jobs))
    click.echo(f"repro: kernel {target.release} ({target.recipe}, {target.image})")
    modules = find_conntrack_modules(target.modules_dir)
    if not modules:
        raise BuildError(f"{target.modules_dir} has no conntrack module: the {recipe} kernel build is incomplete")
    system_map = target.kdir / "System.map"
    inputs = dataclasses.replace(
        default_inputs(kdir=target.kdir),
        modules=modules,
        system_map=system_map if system_map.is_file() else None,
        config=target.kdir / ".config",
    )
    profile = build_profile(inputs)
    if profile.features.fix_present:
        raise BuildError(f"the {recipe} kernel {profile.release} carries the fix: nothing to reproduce")
    which = strategies[0] if len(strategies) == 1 else "all"
    generate(profile, which, out, str(target.kdir), argv=("repro", "--recipe", recipe), say=click.echo)
    nqgen = [sys.executable, "-m", "nqgen"]
    make = subprocess.run(["make", "-C", str(out), f"-j{jobs}", "NQGEN=" + " ".join(nqgen)], check=False)
    if make.returncode != 0:
        raise BuildError(f"make -C {out} failed for the {recipe} kernel")
    lab_cmd = [
        *nqgen, "lab", "--out", str(out), "--kernel", str(target.image), "--modules-dir", str(target.modules_dir),
        "--kdir", str(target.kdir), "--memory", "1G", "--repeat", str(repeat), "--rounds", str(rounds),
        *(["--nfqueue-variants"] if nfqueue_variants else []),
        *([] if baselines else ["--no-baselines"]),
        # under TCG on a loaded host the boot-time IO-APIC timer check can miss its ticks and panic ("IO-APIC +
        # timer doesn't work!", seen on 4.18 at load 20): skip it, as virtual machines commonly do
        *([] if "--append" in lab_args else ["--append", "no_timer_check"]),
        # a KASAN 4.18 boot with 1000 racing flows takes minutes under TCG on a shared host (5-11 min at load 20-30)
        *(["--timeout", "900"] if "--timeout" not in lab_args and _kasan(target.kdir) else []),
        *(a for name in strategies for a in ("--strategy", name)),
        *lab_args,
    ]
    click.echo("repro: " + " ".join(lab_cmd))
    lab_rc = subprocess.run(lab_cmd, check=False).returncode
    lab_path = out / "lab.json"
    if not lab_path.is_file():
        raise LabError(f"the lab wrote no {lab_path} (exit {lab_rc})")
    lab = json.loads(lab_path.read_text())
    summaries = summarize(lab)
    problems = judge(summaries, need_baseline=baselines)
    text = markdown(summaries, lab, problems, target.title)
    (out / REPRO_MD).write_text(text)
    click.echo(text)
    return problems


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("out-repro"), show_default=True)
@click.option("--repeat", type=click.IntRange(1, 50), default=3, show_default=True, help="Boots per configuration.")
@click.option("--rounds", type=click.IntRange(1, 40000), default=500, show_default=True, help="Flows per family.")
@click.option("--jobs", type=click.IntRange(1, 64), default=2, show_default=True, help="make -j for the kernel.")
@click.option("--strategy", "strategies", multiple=True, help="Measure only these strategies (repeatable).")
@click.option("--nfqueue-variants/--no-nfqueue-variants", default=True, show_default=True)
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Boot without mitigation too (--no-baselines: strategies only, e.g. to add boots to a run).")
@click.option("--recipe", default=DEFAULT_RECIPE, show_default=True,
              help="Kernel to run on: debian61-repro (make repro-kernel) or a recipe of the kernel builder"
                   " (rhel77, rhel81, rhel81-kasan-free).")
@click.option("--source", type=click.Path(exists=True, path_type=Path),
              help="The kernel source of the recipe (tree, tarball or .src.rpm): its build is used, and made first"
                   " when not cached (default: the newest finished build of the recipe, else its usual source).")
@click.argument("lab_args", nargs=-1)
def main(
    out: Path,
    repeat: int,
    rounds: int,
    jobs: int,
    strategies: tuple[str, ...],
    nfqueue_variants: bool,
    baselines: bool,
    recipe: str,
    source: Path | None,
    lab_args: tuple[str, ...],
) -> None:
    """Build the kernel if needed and run the whole crash comparison on it."""
    try:
        problems = run(out, repeat, rounds, jobs, strategies, nfqueue_variants, lab_args, recipe, baselines, source)
    except NqgenError as exc:
        click.echo(f"nqgen repro: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    if problems:
        click.echo("nqgen repro: unexpected result: " + "; ".join(problems), err=True)
        sys.exit(LabError.exit_code)


if __name__ == "__main__":
    main()
