"""Plain-text tables and the JSON document of one ``make bench`` run."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from nqgen.bench.symbols import Skipped, SymbolCase
from nqgen.bench.whole import WholeRun

SYMBOL_GOAL = 1.0  # issue 14: nqgen's lookup at most 1.0x nm | grep
WHOLE_GOAL = 3.0  # issue 14: a whole --strategy all at most 3x nm | grep plus one trivial make


def machine() -> dict[str, object]:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")  # fmt: skip
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    nm = subprocess.run(["nm", "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "nm": nm, "loadavg": list(load), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip


def _goal(value: float, goal: float) -> str:
    return "met" if value <= goal else "NOT met"


def symbol_table(cases: list[SymbolCase | Skipped]) -> str:
    head = (f"{'input':<22} {'symbols':>8} {'nqgen s':>8} {'ref s':>8} {'wall ratio (range)':>22} "
            f"{'cpu ratio (range)':>22} {'same names':>10}  goal <= {SYMBOL_GOAL:.1f}x (cpu)")  # fmt: skip
    rows = [head, "-" * len(head)]
    for case in cases:
        if isinstance(case, Skipped):
            rows.append(f"{case.label:<22} skipped: {case.reason}")
            continue
        rows.append(f"{case.label:<22} {case.entries:>8} {case.nqgen.median_wall:>8.3f} "
                    f"{case.reference.median_wall:>8.3f} {case.wall_ratio!s:>22} {case.cpu_ratio!s:>22} "
                    f"{'yes' if case.agree else 'NO':>10}  {_goal(case.cpu_ratio.median, SYMBOL_GOAL)}")  # fmt: skip
    return "\n".join(rows)


def whole_table(run: WholeRun | Skipped) -> str:
    if isinstance(run, Skipped):
        return f"whole nqgen --strategy all: skipped: {run.reason}"
    lines = [
        f"nqgen --strategy all (no cache): {run.nqgen.median_wall:.2f} s wall, {run.nqgen.median_cpu:.2f} s cpu",
        f"nm | grep + make trivial module: {run.reference.median_wall:.2f} s wall, "
        f"{run.reference.median_cpu:.2f} s cpu",
        f"ratio: wall {run.wall_ratio}, cpu {run.cpu_ratio}; goal <= {WHOLE_GOAL:.0f}x: "
        f"{_goal(run.cpu_ratio.median, WHOLE_GOAL)} (cpu)",
        f"imports: {run.import_total:.2f} s cpu; by package (python -X importtime, wall, min of 3): "
        + ", ".join(f"{pkg} {sec:.2f}" for pkg, sec in list(run.imports.items())[:8]),
        f"phases (cProfile of one run, {run.profiled_total:.2f} s profiled): "
        + ", ".join(f"{label} {sec:.0f}" if label == "templates compiled" else f"{label} {sec:.2f} s"
                    for label, sec in run.phases.items()),
    ]
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)
