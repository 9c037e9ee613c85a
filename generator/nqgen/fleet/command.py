"""``nqgen --targets``: the fleet run behind the CLI (staged output, progress, summary, exit code)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from nqgen.fleet import run as fleet_run
from nqgen.fleet import targets as fleet_targets
from nqgen.generate import OUT_MARKER, check_out
from nqgen.render import staged_output


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:
        return max(1, os.cpu_count() or 1)


def run(spec: Path, options: fleet_run.FleetOptions, out: Path, jobs: int, force: bool,
        say: Callable[[str], None]) -> fleet_run.FleetRun:  # fmt: skip
    """Read the targets, generate them all into a staged ``out``, print the summary; ``out`` replaced at the end."""
    targets = fleet_targets.load(spec)
    check_out(out, force)

    def progress(r: fleet_run.TargetResult) -> None:
        mark = "ok" if r.status == "ok" else r.status.upper()
        say(f"[{mark}] {r.name}: {r.message}")

    with staged_output(out, replace_any=force) as stage:
        (stage / OUT_MARKER).write_text("created by nqgen --targets: `nqgen --out` replaces this directory whole\n")
        result = fleet_run.run_fleet(targets, options, stage, min(jobs, len(targets)), progress)
        fleet_run.write_summary(stage, result, str(spec))
    say(fleet_run.table(result))
    say(f"wrote {out}: one directory per generated target, summary in {out}/{fleet_run.FLEET_JSON}")
    return result
