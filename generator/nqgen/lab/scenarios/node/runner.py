"""The node scenario's boots: baselines with the two kinds of NFQUEUE consumer, then one boot per strategy."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ....errors import BuildError, InputError
from ... import build, guestapi
from ...build import _first_error, guest_source, stage_guest_headers
from ...guest import GuestModule, GuestPlan, Workload
from ...initramfs import Cpio
from ...kernel import KernelImage
from ...manifest import Manifest
from ...modtree import ModuleFile, ModuleTree, modinfo_depends, modinfo_softdeps, read_module
from ...results import RunResult, find_faults
from ...runner import (
    DETECTOR_GUEST_PATH,
    DEVICE_NODES,
    boot_initramfs,
    busybox_applets,
    check_built,
    check_vermagic,
    kernel_json,
    machine_info,
)
from . import kmods, userland
from .results import NodeRun, parse_node
from .script import HOSTS_PATH, TFTP_FILE, NodePlan, NodeWorkload, render_node_init
from .topology import hosts_file

POOL_WORKERS = 2


@dataclass(frozen=True)
class NodeConfig:
    """One ``nqgen lab --scenario node`` invocation."""

    kernel: KernelImage
    modules_dir: Path
    kdir: Path
    workload: NodeWorkload = field(default_factory=NodeWorkload)
    smp: int = 2
    memory: str = "1G"
    timeout: float = 400.0
    baselines: bool = True
    sequential_baseline: bool = True  # also the baseline whose consumer verdicts one packet at a time
    nat_only_baseline: bool = True  # also the baseline without NFQUEUE (NAT only)
    repeat: int = 1
    busybox: Path = Path("/bin/busybox")
    logs_dir: Path | None = None
    append: str = ""
    detector: bool = True  # load the stale-use detector (nqlab_detect) where the kernel allows it


@dataclass(frozen=True)
class NodeSpec:
    """One boot to do."""

    name: str
    manifest: Manifest | None
    workers: int
    queue: bool = True
    repeat: int = 1


def plan_node_runs(config: NodeConfig, manifests: list[Manifest]) -> list[NodeSpec]:
    """Baselines first (no NFQUEUE; a consumer verdicting in order; a worker pool), then each strategy
    with the worker pool, the consumer that lets the race reach the confirm on kernels that resolve
    clashes at reinject."""
    specs: list[tuple[str, Manifest | None, int, bool]] = []
    if config.baselines:
        if config.nat_only_baseline:
            specs.append(("baseline-nat-only", None, 1, False))
        if config.sequential_baseline:
            specs.append(("baseline-nfqueue-inorder", None, 1, True))
        specs.append(("baseline-nfqueue-pool", None, POOL_WORKERS, True))
    for m in manifests:
        specs.append((m.strategy, m, POOL_WORKERS, True))
    return [NodeSpec(n, m, w, q, i) for n, m, w, q in specs for i in range(1, config.repeat + 1)]


def _build_programs(dest: Path) -> tuple[Path, Path]:
    """nq_nfqpool (static) and nq_lookup (dynamic: glibc's resolver is the point)."""
    dest.mkdir(parents=True, exist_ok=True)
    stage_guest_headers(dest)
    out = []
    for name, static in (("nq_nfqpool", True), ("nq_lookup", False)):
        src = dest / f"{name}.c"
        src.write_text(guest_source(f"{name}.c"))
        cmd = ["gcc", *(["-static"] if static else []), "-O2", "-Wall", "-Werror", "-pthread",
               "-o", str(dest / name), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BuildError(f"gcc failed for guest program {name}: {_first_error(proc.stderr)}")
        out.append(dest / name)
    return out[0], out[1]


class NodeGuest:
    """What every node boot's initramfs shares: busybox, Debian's programs, modules, DNS data."""

    def __init__(self, config: NodeConfig, work: Path) -> None:
        self.config = config
        self.release = config.kernel.release
        self.applets = busybox_applets(config.busybox)
        self.nfqpool, lookup = _build_programs(work / "programs")
        self.userland = userland.collect({"usr/bin/nq_lookup": lookup})
        self.tree = ModuleTree.load(config.modules_dir)
        self.extras = kmods.build_extras(self.tree, config.kdir, work / "extras")
        for name, ko in self.extras.extras.items():
            check_vermagic(ko, self.release, f"{name}.ko (built from {config.kdir})")
        # stale uses where KASAN is absent (3.10) and NAT set up on confirmed entries (nqlab_detect)
        self.api = guestapi.decide(config.kdir)
        self.detector: Path | None = None
        if self.api.detector and config.detector:
            self.detector = build.build_detector(config.kdir, work / "detector", self.api)
            check_vermagic(self.detector, self.release, f"nqlab_detect.ko (built against {config.kdir})")
        self._bytes: dict[str, bytes] = {}
        self.hosts = hosts_file(config.workload.names).encode()
        self.blob = bytes((i * 7919 + (i >> 8)) & 0xFF for i in range(16 * 1024))

    def closure(self, extra: list[Path]) -> list[ModuleFile]:
        roots = kmods.tree_roots(self.tree, self.extras)
        softdeps: list[str] = []
        for ko in [*extra, *([self.detector] if self.detector is not None else [])]:
            roots += modinfo_depends(ko)
            softdeps += modinfo_softdeps(ko)
        return self.tree.closure(roots, softdeps)

    def guest_modules(self, deps: list[ModuleFile]) -> tuple[GuestModule, ...]:
        mods = [GuestModule(m.name, f"/lib/modules/{self.release}/{m.plain_relpath}", "dep", (), m.optional)
                for m in deps]
        mods += [GuestModule(n, f"/nqlab/extra/{n}.ko", "dep") for n in self.extras.extras]
        return tuple(mods)

    def initramfs(self, plan: NodePlan, deps: list[ModuleFile], mitigation: Manifest | None) -> bytes:
        c = Cpio()
        for d in ("dev", "proc", "sys", "tmp", "root"):
            c.directory(d)
        for node, major, minor in DEVICE_NODES:
            c.char_device(f"dev/{node}", major, minor)
        c.copy("bin/busybox", self.config.busybox, 0o755)
        for applet in self.applets:
            if not c.has(f"bin/{applet}"):
                c.symlink(f"bin/{applet}", "busybox")
        c.symlink("sbin", "bin")
        c.copy("bin/nq_nfqpool", self.nfqpool, 0o755)
        self.userland.add_to(c)
        for name in ("iptables-save", "ip6tables-save"):
            c.symlink(f"usr/sbin/{name}", "xtables-legacy-multi")
        c.file(HOSTS_PATH.lstrip("/"), self.hosts)
        c.file(f"srv/tftp/{TFTP_FILE}", self.blob)
        moddir = f"lib/modules/{self.release}"
        for mod in deps:
            if mod.relpath not in self._bytes:
                self._bytes[mod.relpath] = read_module(self.config.modules_dir / mod.relpath)
            c.file(f"{moddir}/{mod.plain_relpath}", self._bytes[mod.relpath])
        c.file(f"{moddir}/modules.dep", "".join(f"{m.plain_relpath}:\n" for m in deps).encode())
        for name, ko in self.extras.extras.items():
            c.copy(f"nqlab/extra/{name}.ko", ko)
        if mitigation is not None:
            c.copy(f"nqlab/{mitigation.module}.ko", mitigation.ko)
        if self.detector is not None:
            c.copy(DETECTOR_GUEST_PATH.lstrip("/"), self.detector)
        c.file("init", render_node_init(plan).encode(), 0o755)
        return c.bytes()


def _mitigation_plan(m: Manifest, deps: tuple[GuestModule, ...]) -> GuestPlan:
    return GuestPlan(
        run=m.strategy,
        deps=deps,
        helper=GuestModule("none", "/dev/null", "helper"),
        mitigation=GuestModule(m.module, f"/nqlab/{m.module}.ko", "mitigation",
                               tuple(f"{k}={v}" for k, v in m.params.items())),
        workload=Workload(),
        stats_dir=m.stats_dir,
        counters=m.counters,
        unload=m.unload,
        livepatch_sysfs=m.livepatch_sysfs,
    )


def run_node_one(guest: NodeGuest, spec: NodeSpec, work: Path) -> NodeRun:
    """Boot once for ``spec``."""
    cfg = guest.config
    m = spec.manifest
    deps = guest.closure([m.ko] if m is not None else [])
    gdeps = guest.guest_modules(deps)
    w = replace(cfg.workload, queue=spec.queue, queue_workers=spec.workers)
    plan = NodePlan(
        run=spec.name,
        deps=gdeps,
        workload=w,
        mitigation=_mitigation_plan(m, gdeps) if m is not None else None,
        extra_queues=(m.queue_base, m.queue_count) if m is not None and m.queue_base is not None else None,
        detector=(GuestModule(build.DETECTOR_MODULE, DETECTOR_GUEST_PATH, "detector", (), True)
                  if guest.detector is not None else None),
    )
    tag = spec.name if spec.repeat == 1 else f"{spec.name}.{spec.repeat}"
    outcome = boot_initramfs(cfg, guest.initramfs(plan, deps, m), work / tag, f"node-{tag}")
    base = RunResult(
        name=spec.name, repeat=spec.repeat, kind="baseline" if m is None else "mitigation",
        strategy=None if m is None else m.strategy, module=None if m is None else m.module,
        nfqueue=spec.queue, seconds=round(outcome.seconds, 2), exit_code=outcome.exit_code,
        guest_exit=outcome.guest_exit, timed_out=outcome.timed_out,
        corrected_counter=None if m is None else m.corrected_counter,
    )
    run = NodeRun(base=base, consumer_workers=spec.workers if spec.queue else 0, queue=spec.queue)
    parse_node(run, outcome.results)
    base.set_faults(find_faults(outcome.console))
    for fault in base.faults[5:]:
        fault.text = ""
    return run


@dataclass
class NodeLab:
    """A whole node-scenario invocation."""

    config: NodeConfig
    runs: list[NodeRun] = field(default_factory=list)
    date: str = ""


def run_node_lab(
    config: NodeConfig,
    manifests: list[Manifest],
    progress: Callable[[int, int, NodeSpec, NodeRun | None], None] | None = None,
    work_dir: Path | None = None,
) -> NodeLab:
    """Build the guest once, then boot once per planned run."""
    w = config.workload
    if not 1 <= w.lookups <= w.names or not 1 <= w.health_lookups <= w.names or not 1 <= w.threads <= 64:
        raise InputError(f"lookups and health lookups must be 1..{w.names} (the names dnsmasq serves), threads 1..64")
    for m in manifests:
        check_built(m, config.kernel.release)
    specs = plan_node_runs(config, manifests)
    if not specs:
        raise InputError("nothing to run: no baseline and no built strategy")
    lab = NodeLab(config=config, date=datetime.now(UTC).isoformat(timespec="seconds"))
    with tempfile.TemporaryDirectory(prefix="nqgen-node-", dir=work_dir) as tmp:
        work = Path(tmp)
        guest = NodeGuest(config, work)
        for i, spec in enumerate(specs, 1):
            if progress is not None:
                progress(i, len(specs), spec, None)
            run = run_node_one(guest, spec, work)
            lab.runs.append(run)
            if progress is not None:
                progress(i, len(specs), spec, run)
    return lab


def node_json(lab: NodeLab) -> dict[str, Any]:
    """The content of out/node-lab.json."""
    c = lab.config
    w = c.workload
    return {
        "schema": "nqgen-node-lab/1",
        "date": lab.date,
        "machine": machine_info(),
        "kernel": kernel_json(c.kernel, c.modules_dir, c.kdir),
        "built_from_source": sorted(kmods.missing_roots(ModuleTree.load(c.modules_dir))),
        "guest": {"detector_used": c.detector and guestapi.decide(c.kdir).detector},
        "vm": {"smp": c.smp, "memory": c.memory, "timeout": c.timeout},
        "repeat": c.repeat,
        "workload": vars(w),
        "runs": [r.to_dict() for r in lab.runs],
    }
