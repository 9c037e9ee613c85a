"""A whole ``nqgen --strategy all`` for one kernel against ``nm | grep`` on its module plus one trivial ``make``.

Also where the command's time goes: ``python -X importtime`` for the imports, ``cProfile`` for the phases
(symbol reading, header parsing, rendering).
"""

from __future__ import annotations

import os
import pstats
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nqgen.bench.symbols import MODULE_NAMES, nm_grep_command
from nqgen.bench.timing import Ratio, Series, ratio, side_by_side

TRIVIAL_C = """// SPDX-License-Identifier: GPL-2.0
#include <linux/module.h>
static int __init trivial_init(void) { return 0; }
static void __exit trivial_exit(void) { }
module_init(trivial_init);
module_exit(trivial_exit);
MODULE_LICENSE("GPL");
"""

# (phase, file name ending, function): cumulative time of these functions in the cProfile of one run
PHASES = (
    ("symbols (ELF, symvers, config)", "probe.py", "collect_symbol_facts"),
    ("header parsing (cache off)", "headers.py", "probe_features"),
    ("rendering (cookiecutter)", "generate.py", "generate"),
    ("of which jinja2 compiles templates", "jinja2/environment.py", "compile"),
)


# a kernel nqgen has not seen: the header facts cache (nqgen.headers) is bypassed in every timed run
UNCACHED = {**os.environ, "NQGEN_NO_CACHE": "1"}


@dataclass(frozen=True)
class WholeRun:
    nqgen: Series
    reference: Series
    nqgen_command: str
    reference_command: str
    imports: dict[str, float]  # top-level package -> cumulative import seconds
    import_total: float  # CPU seconds of the imports (the minimum of a few fresh processes)
    phases: dict[str, float]  # PHASES label -> seconds (cProfile, so inflated by the profiler)
    profiled_total: float

    @property
    def wall_ratio(self) -> Ratio:
        return ratio(self.nqgen.wall, self.reference.wall)

    @property
    def cpu_ratio(self) -> Ratio:
        return ratio(self.nqgen.cpu, self.reference.cpu)

    def to_json(self) -> dict[str, object]:
        return {"nqgen_command": self.nqgen_command, "reference_command": self.reference_command,
                "nqgen": self.nqgen.to_json(), "reference": self.reference.to_json(),
                "wall_ratio": self.wall_ratio.to_json(), "cpu_ratio": self.cpu_ratio.to_json(),
                "imports_s": self.imports, "import_total_s": self.import_total, "phases_s": self.phases,
                "profiled_total_s": self.profiled_total}  # fmt: skip


def _nqgen_argv(kdir: Path, module: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "nqgen", "--strategy", "all", "--kdir", str(kdir), "--module", str(module),
            "--out", str(out)]  # fmt: skip


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)}: exit {done.returncode}: {done.stderr.strip()[-300:]}")


def import_times(extra: tuple[str, ...] = (), runs: int = 3) -> tuple[dict[str, float], float]:
    """Import time per top-level package (the sum of its modules' own times, so nothing counts twice) of
    ``import nqgen.cli`` (and ``extra``) in a fresh process, and the CPU time of those imports.

    ``-X importtime`` reports wall-clock time, so on a loaded machine a preemption lands on whatever module was
    importing: each package keeps its minimum over ``runs`` processes.
    """
    code = "; ".join(f"import {m}" for m in ("nqgen.cli", *extra))
    timed = f"import time; t0 = time.process_time(); {code}; print(time.process_time() - t0)"
    per_pkg: dict[str, float] = {}
    cpu = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", timed], capture_output=True, text=True,
                              check=True)  # fmt: skip
        cpu.append(float(done.stdout.strip()))
        this: dict[str, float] = {}
        for line in done.stderr.splitlines():
            if not line.startswith("import time:") or line.count("|") != 2:
                continue
            own, _cumulative, name = line.removeprefix("import time:").split("|")
            if own.strip().isdigit():
                pkg = name.strip().split(".")[0]
                this[pkg] = this.get(pkg, 0.0) + int(own.strip()) / 1e6
        for pkg, sec in this.items():
            per_pkg[pkg] = min(per_pkg.get(pkg, sec), sec)
    top = dict(sorted(per_pkg.items(), key=lambda kv: -kv[1])[:10])
    return top, min(cpu)


def profile_phases(kdir: Path, module: Path, work: Path) -> tuple[dict[str, float], float]:
    prof = work / "nqgen.prof"
    argv = _nqgen_argv(kdir, module, work / "out-prof")
    _run([argv[0], "-m", "cProfile", "-o", str(prof), *argv[1:]], env=UNCACHED)
    stats = pstats.Stats(str(prof))
    table = stats.stats  # type: ignore[attr-defined]  # (file, line, func) -> (cc, nc, tt, ct, callers)
    phases: dict[str, float] = {}
    for label, filename, func in PHASES:
        hits = [v for k, v in table.items() if k[0].endswith(filename) and k[2] == func]
        phases[label] = max((v[3] for v in hits), default=0.0)
        if func == "compile":
            phases["templates compiled"] = float(sum(v[1] for v in hits))
    total = float(stats.total_tt)  # type: ignore[attr-defined]
    return phases, total


def whole_run(kdir: Path, module: Path, rounds: int) -> WholeRun:
    with tempfile.TemporaryDirectory(prefix="nqgen-bench-") as tmp:
        work = Path(tmp)
        argv = _nqgen_argv(kdir, module, work / "out")
        nm = nm_grep_command(module, MODULE_NAMES)
        make = f"make -s -C {shlex.quote(str(kdir))} M=DIR modules >/dev/null"
        reference = f"{nm} >/dev/null; {make}"
        rounds_done = [0]

        def ours() -> None:
            _run(argv, env=UNCACHED)

        def theirs() -> None:
            rounds_done[0] += 1
            trivial = work / f"trivial{rounds_done[0]}"  # a fresh directory: every round compiles from scratch
            trivial.mkdir()
            (trivial / "trivial.c").write_text(TRIVIAL_C)
            (trivial / "Kbuild").write_text("obj-m := trivial.o\n")
            _run(["sh", "-c", reference.replace("M=DIR", f"M={shlex.quote(str(trivial))}")])

        series = side_by_side({"nqgen": ours, "reference": theirs}, rounds)
        imports, import_total = import_times(("nqgen.generate", "nqgen.headers", "nqgen.probe"))
        phases, total = profile_phases(kdir, module, work)
    return WholeRun(series["nqgen"], series["reference"], shlex.join(argv), reference, imports, import_total,
                    phases, total)  # fmt: skip
