"""RHEL 7: a mitigation loaded before ``nf_conntrack_ipv6`` protects IPv4 at once and attaches to IPv6 later.

On 3.10 ``ipv6_confirm`` lives in ``nf_conntrack_ipv6.ko``, which a host need not have loaded. ``advance-confirm``,
``ftrace`` and ``hook-swap`` then load without it and attach through a module notifier when it loads (issue 8
item 8, ``kmod/nq_resolve.c``). One boot per strategy: the kernel's modules without ``nf_defrag_ipv6`` and
``nf_conntrack_ipv6``, the mitigation, racing IPv4 traffic through NFQUEUE (``workload``), a little IPv6 traffic
with no IPv6 conntrack (``pre6``), then ``insmod nf_defrag_ipv6 nf_conntrack_ipv6`` (role ``late``), a pause for
``hook-swap``'s rescan, racing IPv6 traffic (``late6``), the unload and a health check of both families. Counters,
the stale-use detector and ``/proc/net/stat/nf_conntrack`` are read after each phase.

``python -m nqgen.lab.scenarios.lateipv6 --out OUT --kernel ... --modules-dir ... --kdir ...`` runs the strategies
generated in OUT and writes ``OUT/late-ipv6.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from ...errors import InputError, NqgenError
from ..guest import Workload, _patched_functions_block, render_init
from ..kernel import default_cache_dir, resolve_image
from ..manifest import Manifest, discover
from ..modtree import modinfo_depends
from ..results import RunResult, apply_results, find_faults
from ..runner import Guest, LabConfig, RunSpec, boot_initramfs, machine_info, plan_guest

LATE = ("nf_defrag_ipv6", "nf_conntrack_ipv6")  # held back, loaded in this order after the mitigation
STRATEGIES = ("advance-confirm", "ftrace", "hook-swap")  # the ones with an optional IPv6 target on 3.10
PRE6_ROUNDS = 50
RESCAN_WAIT_US = 1_000_000  # hook-swap rescans every interval_ms (200 in the lab)
WORKLOAD_ANCHOR = "taint workload\n"


@dataclass
class LateRun:
    """One boot: the seed lab's records plus the late-load phases."""

    strategy: str
    base: RunResult
    held_back: list[str] = field(default_factory=list)

    def counters(self, phase: str) -> dict[str, int | None]:
        return self.base.counters.get(phase) or {}

    def traffic(self, phase: str) -> tuple[int, int]:
        """(sent, received) in a traffic phase."""
        xs = [t for t in self.base.traffic if t.phase == phase]
        return sum(t.sent for t in xs), sum(t.received for t in xs)

    def detector(self, phase: str) -> dict[str, Any]:
        return self.base.detector.get(phase) or {}

    def attached_lines(self) -> list[str]:
        """What the module printed when the held-back modules loaded (the notifier attaching the target)."""
        text = "".join(x.dmesg for x in self.base.loads if x.role == "late")
        return [ln.strip() for ln in text.splitlines() if "attached" in ln or "redirected" in ln]

    def to_dict(self) -> dict[str, Any]:
        d = self.base.to_dict()
        d["strategy"] = self.strategy
        d["held_back"] = self.held_back
        d["load_order"] = [(x.role, x.module, x.rc) for x in self.base.loads]
        d["counters_by_phase"] = self.base.counters
        d["detector_by_phase"] = self.base.detector
        d["traffic_by_phase"] = {p: self.traffic(p) for p in ("workload", "pre6", "late6", "health")}
        d["attached_lines"] = self.attached_lines()
        return d


def _late_block(late: list[tuple[str, str]], rounds: int, patched_check: str) -> str:
    """Shell lines after the IPv4 workload: IPv6 without conntrack, the late loads, IPv6 with it."""
    lines = [
        "FAMILIES=6",
        f"traffic pre6 {PRE6_ROUNDS} 5002 40000 1",
        "counters pre6",
        "detector pre6",
    ]
    for name, path in late:
        lines.append(f"load late {name} {path} false")
    lines += [
        f"usleep {RESCAN_WAIT_US}",
        *([patched_check] if patched_check else []),
        "counters attached",
        "ctstat attached",
        "detector attached",
        f"traffic late6 {rounds} 5003 41000 $THREADS",
        "counters late6",
        "ctstat late6",
        "detector late6",
        "taint late6",
        "FAMILIES=46",
    ]
    return "\n".join(lines) + "\n"


def run_one(guest: Guest, m: Manifest, work: Path) -> LateRun:
    cfg = guest.config
    if any(d in LATE for d in modinfo_depends(m.ko)):
        raise InputError(f"{m.ko.name} depends on {', '.join(d for d in modinfo_depends(m.ko) if d in LATE)}: "
                         "it cannot load before nf_conntrack_ipv6")
    deps = guest.closure([m.ko])
    late_files = {mod.name: mod for mod in deps if mod.name in LATE}
    missing = [n for n in LATE if n not in late_files]
    if missing:
        raise InputError(f"{cfg.modules_dir} has no {', '.join(missing)}: not a 3.10/4.18 module tree")
    early = [mod for mod in deps if mod.name not in LATE]
    # the helper queues all UDP (clashes at the confirm on reinject) unless the strategy queues itself
    spec = RunSpec(m.strategy, m, nfqueue=m.queue_base is None)
    plan = plan_guest(spec, early, guest.release, cfg.workload, guest.detector is not None)
    # functions of the held-back module are checked (ftrace's enabled_functions) only after it loaded
    late_fns = tuple(f for f in plan.patched if f.startswith("ipv6_"))
    check = _patched_functions_block(dataclasses.replace(plan, patched=late_fns)) if late_fns else ""
    plan = dataclasses.replace(plan, patched=tuple(f for f in plan.patched if f not in late_fns))
    script = render_init(plan)
    if WORKLOAD_ANCHOR not in script:
        raise InputError("the lab's init script changed: no 'taint workload' line to insert the late phases after")
    late = [(n, f"/lib/modules/{guest.release}/{late_files[n].plain_relpath}") for n in LATE]
    script = script.replace(WORKLOAD_ANCHOR, WORKLOAD_ANCHOR + _late_block(late, cfg.workload.rounds, check), 1)
    # every module of the closure is in the initramfs; only the early ones are loaded before the mitigation
    outcome = boot_initramfs(cfg, guest.initramfs(plan, deps, m, init=script), work / m.strategy,
                             f"late-ipv6-{m.strategy}")
    base = RunResult(name=f"{m.strategy}-late-ipv6", repeat=1, kind="mitigation", strategy=m.strategy,
                     module=m.module, nfqueue=True, seconds=round(outcome.seconds, 2), exit_code=outcome.exit_code,
                     guest_exit=outcome.guest_exit, timed_out=outcome.timed_out,
                     corrected_counter=m.corrected_counter)
    apply_results(base, outcome.results)
    base.set_faults(find_faults(outcome.console))
    return LateRun(m.strategy, base, list(LATE))


def run_late_ipv6(config: LabConfig, manifests: list[Manifest], work_dir: Path | None = None) -> list[LateRun]:
    """One boot per strategy with an optional IPv6 target."""
    chosen = [m for m in manifests if m.strategy in STRATEGIES]
    if not chosen:
        raise InputError(f"none of {', '.join(STRATEGIES)} is generated and built")
    with tempfile.TemporaryDirectory(prefix="nqgen-late6-", dir=work_dir) as tmp:
        guest = Guest(config, Path(tmp))
        return [run_one(guest, m, Path(tmp)) for m in chosen]


def late_json(config: LabConfig, runs: list[LateRun]) -> dict[str, Any]:
    return {
        "schema": "nqgen-late-ipv6/1",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "kernel": {"image": str(config.kernel.image), "release": config.kernel.release},
        "workload": {"rounds": config.workload.rounds, "threads": config.workload.threads,
                     "pre6_rounds": PRE6_ROUNDS},
        "runs": [r.to_dict() for r in runs],
    }


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The generated and built out/ tree.")
@click.option("--kernel", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--modules-dir", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--kdir", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--rounds", type=click.IntRange(1, 5000), default=500, show_default=True)
def main(out: Path, kernel: Path, modules_dir: Path, kdir: Path, rounds: int) -> None:
    """Load advance-confirm, ftrace and hook-swap before nf_conntrack_ipv6, then load it and send IPv6."""
    try:
        config = LabConfig(kernel=resolve_image(kernel, default_cache_dir()), modules_dir=modules_dir, kdir=kdir,
                           workload=Workload(rounds=rounds, families="4"), timeout=600, memory="1G",
                           logs_dir=out / "lab-logs")
        runs = run_late_ipv6(config, discover(out))
    except NqgenError as exc:
        click.echo(f"nqgen late-ipv6: {exc}", err=True)
        sys.exit(exc.exit_code)
    data = late_json(config, runs)
    (out / "late-ipv6.json").write_text(json.dumps(data, indent=2) + "\n")
    for r in data["runs"]:
        click.echo(f"{r['strategy']}: problems {r['derived']['problems']}, traffic {r['traffic_by_phase']}, "
                   f"attached {r['attached_lines']}")


if __name__ == "__main__":
    main()
