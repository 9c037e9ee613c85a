"""``make bench`` part 4: fleet mode (``nqgen --targets``): kernels per second with 1 and 2 workers, and the cost of
the 100th kernel against the first.

The targets are every real kernel found on this machine — Debian's amd64 kernel, its -rt and -cloud headers trees
(with the amd64 ``nf_conntrack.ko``: those flavours' modules are not installed), each built kernel of
``$NQGEN_CACHE/kernels`` and the reference kernel (its build tree, and RHEL 7.7's tree prepared with RHEL's config)
and, when the repository's tests are beside the package, the header fixtures with modules compiled in their
shape — repeated under new names until there are ``count`` targets: a fleet of 100 distinct kernel builds does not
exist here, and repeats are what a fleet of hosts looks like (many hosts per kernel build). Each run starts with an
empty header-facts cache, so the first target of every tree pays its header scan.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nqgen import probe, reprokernel
from nqgen.bench.symbols import Skipped

ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Kernel:
    label: str
    kdir: Path
    modules: tuple[Path, ...]
    kind: str  # "real" or "fixture"

    def line(self, name: str) -> str:
        args = ["--kdir", str(self.kdir)]
        for m in self.modules:
            args += ["--module", str(m)]
        return shlex.join([name, *args])


def _cache_root() -> Path:
    return Path(os.environ.get("NQGEN_CACHE", "/var/cache/nqgen"))


def real_kernels(debian_release: str | None) -> list[Kernel]:
    out: list[Kernel] = []
    if debian_release is not None:
        mods = Path("/lib/modules") / debian_release
        found = probe.find_conntrack_modules(mods)
        if found and (mods / "build").is_dir():
            out.append(Kernel(f"debian {debian_release}", mods / "build", tuple(found), "real"))
            stem = debian_release.rsplit("-", 1)[0]
            for flavour in ("rt-amd64", "cloud-amd64"):
                kdir = Path(f"/usr/src/linux-headers-{stem}-{flavour}")
                if (kdir / "Makefile").is_file():
                    out.append(Kernel(f"debian {stem}-{flavour} headers", kdir, tuple(found), "real"))
    for meta in sorted(_cache_root().glob("kernels/*/*/kernel.json")):
        try:
            doc = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        base = meta.parent
        kdir = base / str(doc.get("kdir", "build"))
        found = probe.find_conntrack_modules(base / str(doc.get("modules_dir", "")))
        if found and kdir.is_dir() and not doc.get("base"):  # kasan-free variants share their base's tree
            out.append(Kernel(f"{doc.get('recipe')} build tree", kdir, tuple(found), "real"))
        distro = [base / p for p in doc.get("distro_modules") or []]
        if doc.get("distro_kdir") and all(p.is_file() for p in distro):
            out.append(Kernel(f"{doc.get('recipe')} distro-config tree", base / str(doc["distro_kdir"]),
                              tuple(distro), "real"))  # fmt: skip
    ref = reprokernel.find_built()
    if ref is not None:
        found = probe.find_conntrack_modules(ref.modules_dir)
        if found and ref.kdir.is_dir():
            out.append(Kernel("reference 6.1 (fix reverted)", ref.kdir, tuple(found), "real"))
    return out


def fixture_kernels(work: Path) -> list[Kernel] | str:
    """The header fixtures with modules compiled as tests/test_generations does (repository checkouts only)."""
    tests = ROOT / "tests"
    if not (tests / "test_generations.py").is_file():
        return "the repository's tests/ is not beside the package"
    sys.path.insert(0, str(tests))
    try:
        from test_generations import CASES, build_module  # type: ignore[import-not-found]
        from test_headers import FIXTURES  # type: ignore[import-not-found]
    except ImportError as exc:
        return f"cannot import the test fixtures: {exc}"
    finally:
        sys.path.remove(str(tests))
    out = []
    for generation, case in CASES.items():
        d = work / f"fixture-{generation}"
        d.mkdir(parents=True, exist_ok=True)
        ko = build_module(d, case.source, case.ko, case.cflags)
        out.append(Kernel(f"fixture {generation}", Path(FIXTURES) / generation, (ko,), "fixture"))
    return out


@dataclass(frozen=True)
class FleetBench:
    kernels: list[Kernel]
    count: int
    runs: dict[int, dict[str, object]]  # jobs -> fleet.json plus the wall time of the whole command
    fixtures_note: str | None

    def kps(self, jobs: int) -> float:
        run = self.runs[jobs]
        return float(str(run["targets"])) / float(str(run["command_s"]))

    def cpu_per_kernel(self, jobs: int) -> float:
        results = self.runs[jobs]["results"]
        assert isinstance(results, list)
        return sum(float(r["cpu_seconds"]) for r in results) / len(results)

    def first_last(self, jobs: int = 1) -> tuple[float, float, float]:
        """CPU seconds of target 1, of the last target, and of the last repeat of target 1's kernel (same inputs): its
        worker's CPU time, since wall time on a shared machine measures the neighbours."""
        results = self.runs[jobs]["results"]
        assert isinstance(results, list)
        same = results[(len(results) - 1) // len(self.kernels) * len(self.kernels)]
        key = "cpu_seconds"
        return float(results[0][key]), float(results[-1][key]), float(same[key])

    def to_json(self) -> dict[str, object]:
        first, last, same = self.first_last()
        return {"kernels": [{"label": k.label, "kdir": str(k.kdir), "modules": [str(m) for m in k.modules],
                             "kind": k.kind} for k in self.kernels],
                "targets": self.count, "fixtures_note": self.fixtures_note,
                "kernels_per_second": {str(j): round(self.kps(j), 3) for j in self.runs},
                "cpu_s_per_kernel": {str(j): round(self.cpu_per_kernel(j), 3) for j in self.runs},
                "speedup_2_vs_1": round(self.kps(2) / self.kps(1), 3) if 2 in self.runs and 1 in self.runs else None,
                "first_target_s": first, "last_target_s": last, "last_vs_first": round(last / first, 3),
                "same_kernel_last_repeat_s": same, "same_kernel_last_vs_first": round(same / first, 3),
                "runs": {str(j): r for j, r in self.runs.items()}}  # fmt: skip


def run_fleet_bench(work: Path, debian_release: str | None, count: int = 100,
                    jobs_list: tuple[int, ...] = (1, 2)) -> FleetBench | Skipped:  # fmt: skip
    kernels = real_kernels(debian_release)
    fixtures = fixture_kernels(work / "fixtures")
    note = fixtures if isinstance(fixtures, str) else None
    if not isinstance(fixtures, str):
        kernels += fixtures
    if not kernels:
        return Skipped("fleet", "no kernel inputs found (make deps installs Debian's)")
    lines = [kernels[i % len(kernels)].line(f"k{i + 1:03d}") for i in range(count)]
    spec = work / "targets.txt"
    spec.write_text("\n".join(lines) + "\n")
    runs: dict[int, dict[str, object]] = {}
    for jobs in jobs_list:
        with tempfile.TemporaryDirectory(prefix="nqgen-fleet-cache-") as cache:
            out = work / f"out-j{jobs}"
            argv = [sys.executable, "-m", "nqgen", "--strategy", "all", "--targets", str(spec), "--out", str(out),
                    "--force", "--nat", "no", "-j", str(jobs)]  # fmt: skip
            env = {**os.environ, "XDG_CACHE_HOME": cache}
            env.pop("NQGEN_NO_CACHE", None)
            t0 = time.monotonic()
            done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
            wall = time.monotonic() - t0
        doc = json.loads((out / "fleet.json").read_text()) if (out / "fleet.json").is_file() else {}
        if not doc:
            raise RuntimeError(f"{shlex.join(argv)}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
        runs[jobs] = {**doc, "command_s": round(wall, 3), "command": shlex.join(argv)}
    return FleetBench(kernels, count, runs, note)


def fleet_table(bench: FleetBench | Skipped) -> str:
    if isinstance(bench, Skipped):
        return f"fleet: skipped: {bench.reason}"
    real = sum(k.kind == "real" for k in bench.kernels)
    lines = [f"Fleet: nqgen --strategy all --targets LIST with {bench.count} targets = {len(bench.kernels)} kernels "
             f"({real} real trees, {len(bench.kernels) - real} header fixtures) repeated under new names; "
             "empty header cache at the start of each run"]  # fmt: skip
    if bench.fixtures_note:
        lines.append(f"  (fixtures left out: {bench.fixtures_note})")
    for jobs, run in bench.runs.items():
        lines.append(f"  {jobs} worker(s): {run['command_s']:.1f} s for the command, {bench.kps(jobs):.2f} kernels/s, "
                     f"{bench.cpu_per_kernel(jobs):.2f} s CPU per kernel in the workers, "
                     f"{run['ok']}/{run['targets']} generated, exit {run['exit_code']}")  # fmt: skip
    if 1 in bench.runs and 2 in bench.runs:
        lines.append(f"  2 workers / 1 worker: {bench.kps(2) / bench.kps(1):.2f}x (linear: 2.00x)")
    first, last, same = bench.first_last()
    n = (bench.count - 1) // len(bench.kernels) * len(bench.kernels) + 1
    lines.append(f"  1 worker, CPU: target 1 ({bench.kernels[0].label}) {first:.3f} s; target {bench.count} "
                 f"({bench.kernels[(bench.count - 1) % len(bench.kernels)].label}) {last:.3f} s = {last / first:.2f}x "
                 f"the first; target {n} (target 1's inputs again) {same:.3f} s = {same / first:.2f}x")  # fmt: skip
    return "\n".join(lines)
