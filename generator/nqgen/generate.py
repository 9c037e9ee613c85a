"""Generation: decide feasibility, render every feasible strategy, and write ``out/`` in one piece."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__, compare
from .context import cookiecutter_context, module_name
from .errors import InputError, NotApplicableError
from .profile import KernelProfile
from .render import render_out_makefile, render_strategy, staged_output
from .strategies import STRATEGIES, Feasibility, by_name

# Written into every out/ nqgen creates: only such a directory (or an empty one) is replaced without --force.
OUT_MARKER = ".nqgen-out"


def check_out(out: Path, force: bool) -> None:
    """Refuse to replace what nqgen did not create: a symlink, a file, or a non-empty foreign directory.

    ``out`` is replaced whole on success, so a mistyped ``--out`` (``--out ~``, ``--out /etc``, a link into
    someone's tree) would otherwise delete it. An out/ of an earlier nqgen (``inputs.json`` naming
    ``nqgen_version``) counts as nqgen's.
    """
    if force:
        return
    hint = "; pass --force to replace it"
    if out.is_symlink():
        raise InputError(f"output path {out} is a symbolic link{hint}")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory{hint}")
    if is_nqgen_out(out) or not any(out.iterdir()):
        return
    raise InputError(f"output directory {out} was not created by nqgen{hint}")


def is_nqgen_out(out: Path) -> bool:
    """``out`` is a directory nqgen created (its marker, or an earlier nqgen's inputs.json)."""
    if (out / OUT_MARKER).is_file():
        return True
    try:
        return "nqgen_version" in json.loads((out / "inputs.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_generated(out: Path, force: bool, option: str = "--out") -> None:
    """Commands that write into a generated tree (lab, lab-hookswap, soak): ``out`` must be a directory nqgen
    created, given as itself; a symbolic link, a file or a foreign directory is refused unless ``force``."""
    hint = "; pass --force to use it anyway"
    if out.is_symlink() and not force:
        raise InputError(f"{option} {out} is a symbolic link{hint}")
    if not out.exists():
        raise InputError(f"{option} {out}: no such directory (run nqgen first)")
    if not out.is_dir():
        raise InputError(f"{option} {out}: not a directory")
    if not force and not is_nqgen_out(out):
        raise InputError(f"{option} {out} was not created by nqgen (no {OUT_MARKER}){hint}")


@dataclass(frozen=True)
class GenerationResult:
    out: Path
    generated: tuple[str, ...]
    skipped: dict[str, str]  # strategy -> reason


def decide(profile: KernelProfile, names: Sequence[str]) -> dict[str, Feasibility]:
    return {n: by_name(n).check(profile) for n in names}


def expand(strategy: str) -> tuple[str, ...]:
    return tuple(s.name for s in STRATEGIES) if strategy == "all" else (strategy,)


def generate(
    profile: KernelProfile,
    strategy: str,
    out: Path,
    kdir: str,
    argv: Sequence[str] = (),
    say: Callable[[str], None] = lambda _msg: None,
    adjust: Callable[[dict[str, Feasibility]], dict[str, Feasibility]] | None = None,
    force: bool = False,
) -> GenerationResult:
    """Render the strategy (or all of them) for the profile into ``out``, replacing it only on success.

    ``adjust`` may refuse or annotate strategies for reasons outside the kernel (NAT in the path).
    """
    check_out(out, force)
    names = expand(strategy)
    decisions = decide(profile, names)
    if adjust is not None:
        decisions = adjust(decisions)
    if strategy != "all" and not decisions[strategy].feasible:
        raise NotApplicableError(f"{strategy} cannot work on {profile.release}: {decisions[strategy].reason}")
    feasible = [n for n in names if decisions[n].feasible]
    skipped = {n: d.reason for n, d in decisions.items() if not d.feasible}
    for n, reason in skipped.items():
        say(f"skipping {n}: {reason}")
    if not feasible:
        raise NotApplicableError(f"no strategy can work on {profile.release}")
    with staged_output(out, replace_any=force) as stage:
        (stage / OUT_MARKER).write_text("created by nqgen: `nqgen --out` replaces this directory whole\n")
        for n in feasible:
            render_strategy(n, cookiecutter_context(profile, n, kdir), stage)
            say(f"generated {out / n} ({module_name(n)}.ko): {decisions[n].reason}")
        render_out_makefile(
            {
                "dirname": "out",
                "kdir": kdir,
                "strategies": " ".join(feasible),
                "nqgen": f"{sys.executable} -m nqgen",
            },
            stage,
        )
        (stage / "profile.json").write_text(profile.to_json() + "\n")
        (stage / "target-exports.txt").write_text("\n".join(sorted(profile.exports)) + "\n")
        inputs = {
            "nqgen_version": __version__,
            "command": shlex.join(["nqgen", *argv]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "release": profile.release,
            "kdir": kdir,
            "strategy": strategy,
            "generated": feasible,
            "skipped": skipped,
            "sources": profile.sources,
        }
        (stage / "inputs.json").write_text(json.dumps(inputs, indent=2) + "\n")
        compare.write_static(stage, profile, decisions)
    return GenerationResult(out=out, generated=tuple(feasible), skipped=skipped)
