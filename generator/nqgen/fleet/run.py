"""Generate for every target of a fleet, in a pool of worker processes.

Each target runs exactly what ``nqgen --strategy S --kdir ... --module ...`` runs for one kernel (profile, NAT gate,
``generate``) and ends as a :class:`TargetResult` with the exit code that command would have had: an error in one
target is that target's result, never the run's. ``generate`` writes each target's directory through a staging
directory, and the fleet directory itself is staged, so an interrupted run leaves nothing half-written.
Workers are forked after the imports, so the interpreter start and imports are paid once per run, not per kernel.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

from nqgen.errors import EXIT_BUILD, EXIT_INPUT, EXIT_NOT_APPLICABLE, NqgenError
from nqgen.fleet.targets import Target

FLEET_JSON = "fleet.json"


@dataclass(frozen=True)
class FleetOptions:
    strategy: str
    nat: str = "auto"
    allow_nat_breakage: bool = False


@dataclass(frozen=True)
class TargetResult:
    name: str
    status: str  # "ok", "not-applicable" or "failed"
    exit_code: int
    message: str
    release: str | None
    generated: tuple[str, ...]
    skipped: dict[str, str]
    seconds: float  # wall time of this target in its worker
    cpu_seconds: float  # CPU time of its worker and its child programs for this target (load does not inflate it)
    started: float  # seconds since the run started
    worker: int  # pid of the process that ran it

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["generated"] = list(self.generated)
        return d


def _cpu_seconds() -> float:
    """CPU time of this process and of the programs it ran and waited for (grep over a source tree, zstd)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def generate_one(target: Target, options: FleetOptions, out: Path, t0: float) -> TargetResult:
    """One target, as the single-target command would run it; every error becomes the result's exit code."""
    from nqgen.generate import generate
    from nqgen.natpath import decide_nat, gate
    from nqgen.probe import build_profile

    start = time.monotonic()
    cpu0 = _cpu_seconds()
    release: str | None = None

    def result(status: str, code: int, message: str, generated: Sequence[str] = (),
               skipped: dict[str, str] | None = None) -> TargetResult:  # fmt: skip
        return TargetResult(target.name, status, code, message, release, tuple(generated), skipped or {},
                            round(time.monotonic() - start, 4), round(_cpu_seconds() - cpu0, 4),
                            round(start - t0, 4), os.getpid())  # fmt: skip

    if target.problem is not None:
        return result("failed", EXIT_INPUT, target.problem)
    try:
        profile = build_profile(target.inputs)
        release = profile.release
        nat_path = decide_nat(options.nat, profile.release)
        argv = ["--strategy", options.strategy, *target.argv]
        gen = generate(profile, options.strategy, out / target.name, str(target.inputs.kdir), argv=argv,
                       adjust=lambda d: gate(d, nat_path, options.allow_nat_breakage))  # fmt: skip
    except NqgenError as exc:
        status = "not-applicable" if exc.exit_code == EXIT_NOT_APPLICABLE else "failed"
        return result(status, exc.exit_code, str(exc))
    except OSError as exc:
        return result("failed", EXIT_INPUT, str(exc))
    except Exception as exc:  # one target's bug must not stop the fleet; reported with its place
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return result("failed", EXIT_BUILD, f"internal error: {type(exc).__name__}: {exc} "
                                            f"({Path(where.filename).name}:{where.lineno})")  # fmt: skip
    note = "; upstream fix present" if profile.features.fix_present else ""
    return result("ok", 0, f"{len(gen.generated)} generated, {len(gen.skipped)} skipped{note}", gen.generated,
                  gen.skipped)  # fmt: skip


@dataclass(frozen=True)
class FleetRun:
    results: tuple[TargetResult, ...]  # in target order
    jobs: int
    seconds: float

    @property
    def exit_code(self) -> int:
        """0 when every target generated, else the exit code of the first target (in list order) that did not."""
        return next((r.exit_code for r in self.results if r.exit_code != 0), 0)

    @property
    def kernels_per_second(self) -> float:
        return len(self.results) / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        ok = sum(r.status == "ok" for r in self.results)
        return {"jobs": self.jobs, "seconds": round(self.seconds, 3), "targets": len(self.results), "ok": ok,
                "kernels_per_second": round(self.kernels_per_second, 3), "exit_code": self.exit_code,
                "results": [r.to_json() for r in self.results]}  # fmt: skip


def run_fleet(targets: Sequence[Target], options: FleetOptions, stage: Path, jobs: int,
              progress: Callable[[TargetResult], None] = lambda _r: None) -> FleetRun:  # fmt: skip
    """Generate every target into ``stage/<name>``; ``jobs`` worker processes (1: in this process)."""
    from nqgen import srcexports

    with srcexports.remembered():  # forked workers inherit it: each scans a repeated source tree once
        return _run_fleet(targets, options, stage, jobs, progress)


def _run_fleet(targets: Sequence[Target], options: FleetOptions, stage: Path, jobs: int,
               progress: Callable[[TargetResult], None]) -> FleetRun:  # fmt: skip
    t0 = time.monotonic()
    by_name: dict[str, TargetResult] = {}
    if jobs <= 1:
        for t in targets:
            by_name[t.name] = generate_one(t, options, stage, t0)
            progress(by_name[t.name])
    else:
        # fork: the workers inherit the imports done here (nqgen.generate and its templates' libraries)
        import nqgen.generate
        import nqgen.probe  # noqa: F401

        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures: dict[Future[TargetResult], Target] = {
                pool.submit(generate_one, t, options, stage, t0): t for t in targets}  # fmt: skip
            for fut, t in futures.items():
                try:
                    res = fut.result()
                except BrokenProcessPool as exc:
                    res = TargetResult(t.name, "failed", EXIT_BUILD, f"worker process died: {exc}", None, (), {},
                                       0.0, 0.0, round(time.monotonic() - t0, 4), 0)  # fmt: skip
                by_name[t.name] = res
                progress(res)
    seconds = time.monotonic() - t0
    return FleetRun(tuple(by_name[t.name] for t in targets), jobs, seconds)


def write_summary(stage: Path, run: FleetRun, spec: str) -> None:
    doc = {"targets_from": spec, **run.to_json()}
    (stage / FLEET_JSON).write_text(json.dumps(doc, indent=2) + "\n")


def table(run: FleetRun) -> str:
    width = max([len(r.name) for r in run.results] + [6])
    head = f"{'target':<{width}}  {'status':<14} {'exit':>4} {'wall s':>7} {'cpu s':>6}  release / message"
    rows = [head, "-" * len(head)]
    for r in run.results:
        what = f"{r.release or '?'}: {r.message}" if r.status == "ok" else r.message
        rows.append(f"{r.name:<{width}}  {r.status:<14} {r.exit_code:>4} {r.seconds:>7.2f} {r.cpu_seconds:>6.2f}  "
                    f"{what}")
    ok = sum(r.status == "ok" for r in run.results)
    rows.append(f"{ok} of {len(run.results)} targets generated in {run.seconds:.1f} s with {run.jobs} worker(s) "
                f"({run.kernels_per_second:.2f} kernels/s); exit {run.exit_code}")  # fmt: skip
    return "\n".join(rows)
