"""The lab's boots: a baseline, a baseline with NFQUEUE, then one boot per generated strategy."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import InputError, LabError
from . import build
from .guest import MAX_ROUNDS, GuestModule, GuestPlan, Workload, render_init
from .initramfs import Cpio
from .kernel import KernelImage
from .manifest import Manifest
from .modtree import ModuleFile, ModuleTree, modinfo, modinfo_depends, modinfo_softdeps, read_module
from .qemu import QemuConfig, boot
from .results import RunResult, apply_results, find_faults

LAB_ROOTS = ("nf_conntrack", "nf_conntrack_netlink", "nfnetlink_queue")
HELPER_GUEST_PATH = "/nqlab/nqlab_ct.ko"
MAX_FAULT_TEXTS = 5
DEVICE_NODES = (("console", 5, 1), ("null", 1, 3), ("kmsg", 1, 11), ("port", 1, 4), ("ttyS0", 4, 64), ("ttyS1", 4, 65))


@dataclass(frozen=True)
class LabConfig:
    """One lab invocation."""

    kernel: KernelImage
    modules_dir: Path
    kdir: Path
    workload: Workload = field(default_factory=Workload)
    smp: int = 2
    memory: str = "1G"
    timeout: float = 180.0
    baselines: bool = True
    repeat: int = 1  # boots per configuration
    nfqueue_variants: bool = False  # also run each non-queueing strategy with all UDP through NFQUEUE
    busybox: Path = Path("/bin/busybox")
    logs_dir: Path | None = None  # console and result logs per run are copied here
    append: str = ""


@dataclass(frozen=True)
class RunSpec:
    """One boot to do."""

    name: str
    manifest: Manifest | None
    nfqueue: bool  # the helper queues all UDP to queue 0 (baseline with NFQUEUE)
    repeat: int = 1  # 1-based index among the boots of this configuration


@dataclass
class LabRun:
    """The outcome of a whole lab invocation."""

    config: LabConfig
    runs: list[RunResult] = field(default_factory=list)
    date: str = ""

    @property
    def failed(self) -> list[RunResult]:
        """Runs that make the lab fail: mitigations with problems, baselines that could not run."""
        return [r for r in self.runs if _fails_lab(r)]


def _fails_lab(r: RunResult) -> bool:
    """Any problem of a mitigation; a baseline only when it could not run (its own crash is the bug's proof)."""
    if r.kind == "mitigation":
        return bool(r.problems)
    return r.verdict == "incomplete" and not r.run_faults


def plan_runs(
    manifests: list[Manifest], baselines: bool, repeat: int = 1, nfqueue_variants: bool = False
) -> list[RunSpec]:
    """Boots in order: every configuration ``repeat`` times in a row."""
    configs: list[tuple[str, Manifest | None, bool]] = []
    if baselines:
        configs.append(("baseline", None, False))
        configs.append(("baseline-nfqueue", None, True))
    for m in manifests:
        configs.append((m.strategy, m, False))
        if nfqueue_variants and m.queue_base is None:
            configs.append((f"{m.strategy}+nfqueue", m, True))
    return [RunSpec(name, m, q, i) for name, m, q in configs for i in range(1, repeat + 1)]


def _check_static(busybox: Path) -> None:
    if not busybox.is_file():
        raise InputError(f"{busybox} not found (apt-get install busybox-static)")
    with busybox.open("rb") as f:
        head = f.read(1 << 16)
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head:
        raise InputError(f"{busybox} is dynamically linked; the guest needs busybox-static")


def _applets(busybox: Path) -> list[str]:
    proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=False)
    applets = [a for a in proc.stdout.split() if a and "/" not in a and a != "busybox"]
    if not applets:
        raise InputError(f"{busybox} --list printed no applets")
    return applets


def _check_vermagic(ko: Path, release: str, what: str) -> None:
    vermagic = (modinfo(ko).get("vermagic") or [""])[0]
    if vermagic.split(" ", 1)[0] != release:
        raise LabError(f"{what} was built for {vermagic.split(' ', 1)[0] or '?'}, the kernel is {release}")


class _Guest:
    """What every boot's initramfs shares: busybox, guest programs, the kernel's modules, the helper."""

    def __init__(self, config: LabConfig, work: Path) -> None:
        self.config = config
        self.release = config.kernel.release
        _check_static(config.busybox)
        self.applets = _applets(config.busybox)
        self.programs = build.build_programs(work / "programs")
        self.helper = build.build_helper(config.kdir, work / "helper")
        _check_vermagic(self.helper, self.release, f"nqlab_ct.ko (built against {config.kdir})")
        self.tree = ModuleTree.load(config.modules_dir)
        self._module_bytes: dict[str, bytes] = {}

    def closure(self, extra: list[Path], bridge: bool = False) -> list[ModuleFile]:
        roots = list(LAB_ROOTS) + modinfo_depends(self.helper)
        # optional: a tree without them skips the bridge step (the guest reports setup false)
        softdeps: list[str] = list(BRIDGE_MODULES) if bridge else []
        for ko in extra:
            roots += modinfo_depends(ko)
            softdeps += modinfo_softdeps(ko)
        return self.tree.closure(roots, softdeps)

    def module_bytes(self, mod: ModuleFile) -> bytes:
        if mod.relpath not in self._module_bytes:
            self._module_bytes[mod.relpath] = read_module(self.config.modules_dir / mod.relpath)
        return self._module_bytes[mod.relpath]

    def initramfs(
        self,
        plan: GuestPlan,
        deps: list[ModuleFile],
        mitigation: Manifest | None,
        init: str | None = None,
        extra: dict[str, Path] | None = None,
    ) -> bytes:
        """The boot's initramfs; a scenario passes its own ``init`` script and ``extra`` files (guest path -> file)."""
        c = Cpio()
        for d in ("dev", "proc", "sys", "tmp", "root"):
            c.directory(d)
        # devtmpfs is mounted over /dev when the kernel has it; these nodes serve kernels without it
        for node, major, minor in DEVICE_NODES:
            c.char_device(f"dev/{node}", major, minor)
        c.copy("bin/busybox", self.config.busybox, 0o755)
        for applet in self.applets:
            if not c.has(f"bin/{applet}"):
                c.symlink(f"bin/{applet}", "busybox")
        c.symlink("sbin", "bin")
        for name, path in self.programs.items():
            c.copy(f"bin/{name}", path, 0o755)
        moddir = f"lib/modules/{self.release}"
        dep_lines = []
        for mod in deps:
            c.file(f"{moddir}/{mod.plain_relpath}", self.module_bytes(mod))
            dep_lines.append(f"{mod.plain_relpath}:")
        c.file(f"{moddir}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
        c.copy(HELPER_GUEST_PATH.lstrip("/"), self.helper)
        if mitigation is not None:
            c.copy(f"nqlab/{mitigation.module}.ko", mitigation.ko)
        for dest, src in (extra or {}).items():
            c.copy(dest.lstrip("/"), src)
        c.file("init", (render_init(plan) if init is None else init).encode(), 0o755)
        return c.bytes()


BRIDGE_MODULES = ("nf_conntrack_bridge", "dummy")


def _bridge(m: Manifest) -> bool:
    """Bridged traffic is sent where the module patches nf_confirm, which only the bridge's conntrack calls."""
    return "nf_confirm" in m.patched


def _plan(spec: RunSpec, deps: list[ModuleFile], release: str, workload: Workload) -> GuestPlan:
    guest_deps = tuple(
        GuestModule(m.name, f"/lib/modules/{release}/{m.plain_relpath}", "dep", (), m.optional) for m in deps
    )
    m = spec.manifest
    helper_params = (f"queue={0 if spec.nfqueue else -1}", *(("bridge=1",) if m is not None and _bridge(m) else ()))
    helper = GuestModule("nqlab_ct", HELPER_GUEST_PATH, "helper", helper_params)
    queue_base, queue_count = (0, 1) if spec.nfqueue else (None, 0)
    if m is None:
        return GuestPlan(
            run=spec.name,
            deps=guest_deps,
            helper=helper,
            mitigation=None,
            workload=workload,
            queue_base=queue_base,
            queue_count=queue_count,
        )
    return GuestPlan(
        run=spec.name,
        deps=guest_deps,
        helper=helper,
        mitigation=GuestModule(
            m.module, f"/nqlab/{m.module}.ko", "mitigation", tuple(f"{k}={v}" for k, v in m.params.items())
        ),
        workload=workload,
        stats_dir=m.stats_dir,
        counters=m.counters,
        unload=m.unload,
        livepatch_sysfs=m.livepatch_sysfs,
        ftrace_permanent=m.ftrace_permanent,
        patched=m.patched,
        bridge=_bridge(m),
        queue_base=m.queue_base if m.queue_base is not None else queue_base,
        queue_count=m.queue_count if m.queue_base is not None else queue_count,
    )


def run_one(guest: _Guest, spec: RunSpec, work: Path) -> RunResult:
    """Boot once for ``spec`` and return what was measured."""
    cfg = guest.config
    extra = [spec.manifest.ko] if spec.manifest is not None else []
    deps = guest.closure(extra, bridge=spec.manifest is not None and _bridge(spec.manifest))
    plan = _plan(spec, deps, guest.release, cfg.workload)
    tag = spec.name if spec.repeat == 1 else f"{spec.name}.{spec.repeat}"
    run_dir = work / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    initrd = run_dir / "initrd.cpio"
    initrd.write_bytes(guest.initramfs(plan, deps, spec.manifest))
    outcome = boot(
        QemuConfig(
            kernel=cfg.kernel.boot_path,
            initrd=initrd,
            smp=cfg.smp,
            memory=cfg.memory,
            timeout=cfg.timeout,
            append=("kasan_multi_shot " if cfg.kernel.kasan else "") + cfg.append,
        ),
        run_dir,
    )
    m = spec.manifest
    result = RunResult(
        name=spec.name,
        repeat=spec.repeat,
        kind="baseline" if m is None else "mitigation",
        strategy=None if m is None else m.strategy,
        module=None if m is None else m.module,
        nfqueue=spec.nfqueue or (m is not None and m.queue_base is not None),
        seconds=round(outcome.seconds, 2),
        exit_code=outcome.exit_code,
        guest_exit=outcome.guest_exit,
        timed_out=outcome.timed_out,
        corrected_counter=None if m is None else m.corrected_counter,
    )
    apply_results(result, outcome.results)
    if not outcome.console.strip():
        why = outcome.qemu_output.strip().splitlines()[-1:] or [f"qemu exit {outcome.exit_code}"]
        result.errors.append(f"the kernel printed nothing on the console ({cfg.kernel.boot_mode} boot): {why[0]}")
    result.set_faults(find_faults(outcome.console))
    for fault in result.faults[MAX_FAULT_TEXTS:]:
        fault.text = ""  # a KASAN multi-shot run can report hundreds of times: keep titles and frames
    if cfg.logs_dir is not None:
        cfg.logs_dir.mkdir(parents=True, exist_ok=True)
        (cfg.logs_dir / f"{tag}.console.log").write_text(outcome.console)
        (cfg.logs_dir / f"{tag}.results.jsonl").write_text(outcome.results)
    return result


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False)
    return {
        "host": platform.node(),
        "host_kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "qemu": qemu.stdout.splitlines()[0] if qemu.stdout else "",
        "accel": "tcg",
        "python": platform.python_version(),
    }


def run_lab(
    config: LabConfig,
    manifests: list[Manifest],
    progress: Callable[[int, int, RunSpec, RunResult | None], None] | None = None,
    work_dir: Path | None = None,
) -> LabRun:
    """Build the guest once, then boot once per planned run."""
    w = config.workload
    if not 1 <= w.rounds <= MAX_ROUNDS or not 1 <= w.threads <= 16 or w.health_rounds + w.rounds > MAX_ROUNDS + 100:
        raise InputError(f"rounds must be 1..{MAX_ROUNDS} and threads 1..16")
    for m in manifests:
        if not m.ko.is_file():
            raise InputError(f"{m.ko} does not exist (build the module first)")
        _check_vermagic(m.ko, config.kernel.release, f"{m.ko.name} ({m.strategy})")
        name = (modinfo(m.ko).get("name") or [m.module])[0]
        if name != m.module:
            raise InputError(f"{m.ko} is module {name!r}, its manifest says {m.module!r}")
    specs = plan_runs(manifests, config.baselines, config.repeat, config.nfqueue_variants)
    if not specs:
        raise InputError("nothing to run: no baseline and no built strategy")
    lab = LabRun(config=config, date=datetime.now(UTC).isoformat(timespec="seconds"))
    with tempfile.TemporaryDirectory(prefix="nqgen-lab-", dir=work_dir) as tmp:
        work = Path(tmp)
        guest = _Guest(config, work)
        for i, spec in enumerate(specs, 1):
            if progress is not None:
                progress(i, len(specs), spec, None)
            result = run_one(guest, spec, work)
            lab.runs.append(result)
            if progress is not None:
                progress(i, len(specs), spec, result)
    return lab


def lab_json(lab: LabRun) -> dict[str, Any]:
    """The content of out/lab.json."""
    c = lab.config
    w = c.workload
    return {
        "schema": "nqgen-lab/1",
        "date": lab.date,
        "machine": machine_info(),
        "kernel": {
            "image": str(c.kernel.image),
            "release": c.kernel.release,
            "boot_mode": c.kernel.boot_mode,
            "kasan": c.kernel.kasan,
            "modules_dir": str(c.modules_dir),
            "kdir": str(c.kdir),
        },
        "vm": {"smp": c.smp, "memory": c.memory, "timeout": c.timeout, "append": c.append},
        "repeat": c.repeat,
        "workload": {
            "rounds": w.rounds,
            "threads": w.threads,
            "families": ["ipv4" if f == "4" else "ipv6" for f in w.families],
            "queue_delay_us": w.queue_delay_us,
            "health_rounds": w.health_rounds,
            "flows": w.rounds * len(w.families),
            "datagrams": w.rounds * len(w.families) * w.threads,
        },
        "runs": [r.to_dict() for r in lab.runs],
        "ok": not lab.failed,
        "failed": [r.name for r in lab.failed],
    }
