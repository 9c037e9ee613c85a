"""The lab's boots: a baseline, a baseline with NFQUEUE, then one boot per generated strategy.

The public "boot one plan" API, shared by the lab's scenarios (cost, hookswap, soak, node):
``check_built`` (a manifest's module exists and fits the kernel), ``Guest`` (what every initramfs shares),
``plan_boot`` (a boot's module closure and guest plan), ``boot_initramfs`` (one qemu boot, logs kept) and
``kernel_json`` / ``machine_info`` (the kernel and machine blocks of a result JSON).
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from ..errors import InputError, LabError
from . import build, guestapi
from .guest import MAX_ROUNDS, GuestModule, GuestPlan, Workload, render_init
from .guestapi import GuestApi
from .initramfs import Cpio
from .kernel import KernelImage
from .manifest import Manifest
from .modtree import ModuleFile, ModuleTree, modinfo, modinfo_depends, modinfo_softdeps, read_module
from .qemu import QemuConfig, QemuOutcome, Watcher, boot
from .results import RunResult, apply_results, find_faults, find_panic

LAB_ROOTS = ("nf_conntrack", "nf_conntrack_netlink", "nfnetlink_queue")
# 3.10 and 4.18 keep the per-family conntrack (and its hooks) in modules of their own
LAB_ROOTS_IF_PRESENT = ("nf_conntrack_ipv4", "nf_conntrack_ipv6")
HELPER_GUEST_PATH = "/nqlab/nqlab_ct.ko"
DETECTOR_GUEST_PATH = "/nqlab/nqlab_detect.ko"
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
    beside: Manifest | None = None  # also run each other strategy with this module loaded first
    busybox: Path = Path("/bin/busybox")
    logs_dir: Path | None = None  # console and result logs per run are copied here
    append: str = ""
    detector: bool = True  # load the stale-use detector where the target allows it


@dataclass(frozen=True)
class RunSpec:
    """One boot to do."""

    name: str
    manifest: Manifest | None
    nfqueue: bool  # the helper queues all UDP to queue 0 (baseline with NFQUEUE)
    repeat: int = 1  # 1-based index among the boots of this configuration
    beside: Manifest | None = None  # another generated module loaded first and left loaded


@dataclass
class LabRun:
    """The outcome of a whole lab invocation."""

    config: LabConfig
    runs: list[RunResult] = field(default_factory=list)
    date: str = ""
    guest_api: GuestApi | None = None

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
    manifests: list[Manifest],
    baselines: bool,
    repeat: int = 1,
    nfqueue_variants: bool = False,
    beside: Manifest | None = None,
) -> list[RunSpec]:
    """Boots in order: every configuration ``repeat`` times in a row. With ``beside``, every other strategy
    also runs once more with that module loaded first (``<strategy>+<beside>``): can the two coexist?"""
    configs: list[tuple[str, Manifest | None, bool, Manifest | None]] = []
    if baselines:
        configs.append(("baseline", None, False, None))
        configs.append(("baseline-nfqueue", None, True, None))
    for m in manifests:
        configs.append((m.strategy, m, False, None))
        if nfqueue_variants and m.queue_base is None:
            configs.append((f"{m.strategy}+nfqueue", m, True, None))
        if beside is not None and m.strategy != beside.strategy:
            configs.append((f"{m.strategy}+{beside.strategy}", m, False, beside))
    return [RunSpec(name, m, q, i, b) for name, m, q, b in configs for i in range(1, repeat + 1)]


def _check_static(busybox: Path) -> None:
    if not busybox.is_file():
        raise InputError(f"{busybox} not found (apt-get install busybox-static)")
    with busybox.open("rb") as f:
        head = f.read(1 << 16)
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head:
        raise InputError(f"{busybox} is dynamically linked; the guest needs busybox-static")


def busybox_applets(busybox: Path) -> list[str]:
    """The applets of a static busybox (refused when it is missing or dynamically linked)."""
    _check_static(busybox)
    proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=False)
    applets = [a for a in proc.stdout.split() if a and "/" not in a and a != "busybox"]
    if not applets:
        raise InputError(f"{busybox} --list printed no applets")
    return applets


def check_vermagic(ko: Path, release: str, what: str) -> None:
    """LabError unless ``ko`` was built for ``release``."""
    vermagic = (modinfo(ko).get("vermagic") or [""])[0]
    if vermagic.split(" ", 1)[0] != release:
        raise LabError(f"{what} was built for {vermagic.split(' ', 1)[0] or '?'}, the kernel is {release}")


def check_built(m: Manifest, release: str) -> None:
    """The manifest's module is built, for this kernel, and is the module the manifest names."""
    if not m.ko.is_file():
        raise InputError(f"{m.ko} does not exist (build the module first)")
    check_vermagic(m.ko, release, f"{m.ko.name} ({m.strategy})")
    name = (modinfo(m.ko).get("name") or [m.module])[0]
    if name != m.module:
        raise InputError(f"{m.ko} is module {name!r}, its manifest says {m.module!r}")


class Guest:
    """What every boot's initramfs shares: busybox, guest programs, the kernel's modules, the helper."""

    def __init__(self, config: LabConfig, work: Path) -> None:
        self.config = config
        self.release = config.kernel.release
        self.applets = busybox_applets(config.busybox)
        self.programs = build.build_programs(work / "programs")
        self.api = guestapi.decide(config.kdir)
        self.helper = build.build_helper(config.kdir, work / "helper", self.api)
        check_vermagic(self.helper, self.release, f"nqlab_ct.ko (built against {config.kdir})")
        self.detector: Path | None = None
        if self.api.detector and config.detector:
            self.detector = build.build_detector(config.kdir, work / "detector", self.api)
            check_vermagic(self.detector, self.release, f"nqlab_detect.ko (built against {config.kdir})")
        self.tree = ModuleTree.load(config.modules_dir)
        self._module_bytes: dict[str, bytes] = {}

    def closure(self, extra: list[Path], bridge: bool = False) -> list[ModuleFile]:
        roots = list(LAB_ROOTS[:1]) + [m for m in LAB_ROOTS_IF_PRESENT if m in self.tree.paths]
        roots += list(LAB_ROOTS[1:]) + modinfo_depends(self.helper)
        if self.detector is not None:
            roots += modinfo_depends(self.detector)
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
        beside: Manifest | None = None,
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
        if self.detector is not None:
            c.copy(DETECTOR_GUEST_PATH.lstrip("/"), self.detector)
        for m in (mitigation, beside):
            if m is not None:
                c.copy(f"nqlab/{m.module}.ko", m.ko)
        for dest, src in (extra or {}).items():
            c.copy(dest.lstrip("/"), src)
        c.file("init", (render_init(plan) if init is None else init).encode(), 0o755)
        return c.bytes()


BRIDGE_MODULES = ("nf_conntrack_bridge", "dummy")


def _bridge(m: Manifest) -> bool:
    """Bridged traffic is sent where the module patches nf_confirm, which only the bridge's conntrack calls."""
    return "nf_confirm" in m.patched


def plan_guest(
    spec: RunSpec, deps: list[ModuleFile], release: str, workload: Workload, detector: bool = False
) -> GuestPlan:
    """The guest plan of one boot, its modules ``deps`` already chosen."""
    guest_deps = tuple(
        GuestModule(m.name, f"/lib/modules/{release}/{m.plain_relpath}", "dep", (), m.optional) for m in deps
    )
    det = GuestModule(build.DETECTOR_MODULE, DETECTOR_GUEST_PATH, "detector", (), True) if detector else None
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
            detector=det,
        )
    b = spec.beside
    return GuestPlan(
        run=spec.name,
        deps=guest_deps,
        helper=helper,
        companion=None if b is None else GuestModule(
            b.module, f"/nqlab/{b.module}.ko", "companion", tuple(f"{k}={v}" for k, v in b.params.items())
        ),
        companion_livepatch_sysfs=None if b is None or b.unload != "livepatch" else (
            b.livepatch_sysfs or f"/sys/kernel/livepatch/{b.module}"
        ),
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
        detector=det,
    )


def plan_boot(
    guest: Guest, spec: RunSpec, extra: Sequence[Path] = (), *, bridge: bool = False, detector: bool = False
) -> tuple[GuestPlan, list[ModuleFile]]:
    """One boot's guest plan and module closure: the kernel modules that the lab, the spec's modules and the
    ``extra`` modules (a scenario's own helper) need; ``bridge`` adds the bridge's, ``detector`` loads the
    stale-use detector."""
    kos = [m.ko for m in (spec.manifest, spec.beside) if m is not None] + list(extra)
    deps = guest.closure(kos, bridge=bridge)
    return plan_guest(spec, deps, guest.release, guest.config.workload, detector), deps


class VmConfig(Protocol):
    """What a boot needs of a lab's configuration (LabConfig, the node scenario's NodeConfig)."""

    @property
    def kernel(self) -> KernelImage: ...
    @property
    def smp(self) -> int: ...
    @property
    def memory(self) -> str: ...
    @property
    def timeout(self) -> float: ...
    @property
    def append(self) -> str: ...
    @property
    def logs_dir(self) -> Path | None: ...


def boot_initramfs(
    config: VmConfig,
    initramfs: bytes,
    run_dir: Path,
    log_tag: str,
    *,
    smp: int | None = None,
    timeout: float | None = None,
    append: str | None = None,
    icount: int | None = None,
    watch: Watcher | None = None,
    accel: str = "tcg",
) -> QemuOutcome:
    """Boot ``config``'s kernel once with ``initramfs`` (kept as ``run_dir/initrd.cpio``). ``smp``, ``timeout``
    and ``append`` replace the config's; ``icount`` runs qemu with ``-icount``; ``accel`` is qemu's ``-accel``
    (``tcg,thread=single``: every vCPU on one host thread); ``watch`` sees the guest's output
    while it runs (``qemu.boot``); a KASAN kernel also gets ``kasan_multi_shot``. The console and the
    result lines are copied to ``config.logs_dir`` as ``<log_tag>.console.log`` and ``<log_tag>.results.jsonl``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    initrd = run_dir / "initrd.cpio"
    initrd.write_bytes(initramfs)
    cmdline = config.append if append is None else append
    outcome = boot(
        QemuConfig(
            kernel=config.kernel.boot_path,
            initrd=initrd,
            smp=config.smp if smp is None else smp,
            memory=config.memory,
            timeout=config.timeout if timeout is None else timeout,
            append=("kasan_multi_shot " if config.kernel.kasan else "") + cmdline,
            icount=icount,
            accel=accel,
        ),
        run_dir,
        watch,
    )
    if config.logs_dir is not None:
        config.logs_dir.mkdir(parents=True, exist_ok=True)
        (config.logs_dir / f"{log_tag}.console.log").write_text(outcome.console)
        (config.logs_dir / f"{log_tag}.results.jsonl").write_text(outcome.results)
    return outcome


def run_one(guest: Guest, spec: RunSpec, work: Path) -> RunResult:
    """Boot once for ``spec`` and return what was measured."""
    cfg = guest.config
    bridge = spec.manifest is not None and _bridge(spec.manifest)
    plan, deps = plan_boot(guest, spec, bridge=bridge, detector=guest.detector is not None)
    tag = spec.name if spec.repeat == 1 else f"{spec.name}.{spec.repeat}"
    initramfs = guest.initramfs(plan, deps, spec.manifest, beside=spec.beside)
    outcome = boot_initramfs(cfg, initramfs, work / tag, tag)
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
    result.panic = find_panic(outcome.console)
    for fault in result.faults[MAX_FAULT_TEXTS:]:
        fault.text = ""  # a KASAN multi-shot run can report hundreds of times: keep titles and frames
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
    for m in [*manifests, *([config.beside] if config.beside is not None else [])]:
        check_built(m, config.kernel.release)
    specs = plan_runs(manifests, config.baselines, config.repeat, config.nfqueue_variants, config.beside)
    if not specs:
        raise InputError("nothing to run: no baseline and no built strategy")
    lab = LabRun(config=config, date=datetime.now(UTC).isoformat(timespec="seconds"))
    with tempfile.TemporaryDirectory(prefix="nqgen-lab-", dir=work_dir) as tmp:
        work = Path(tmp)
        guest = Guest(config, work)
        lab.guest_api = guest.api
        for i, spec in enumerate(specs, 1):
            if progress is not None:
                progress(i, len(specs), spec, None)
            result = run_one(guest, spec, work)
            lab.runs.append(result)
            if progress is not None:
                progress(i, len(specs), spec, result)
    return lab


def kernel_json(kernel: KernelImage, modules_dir: Path, kdir: Path) -> dict[str, Any]:
    """The ``kernel`` block of a lab's result JSON."""
    return {
        "image": str(kernel.image),
        "release": kernel.release,
        "boot_mode": kernel.boot_mode,
        "kasan": kernel.kasan,
        "modules_dir": str(modules_dir),
        "kdir": str(kdir),
    }


def lab_json(lab: LabRun) -> dict[str, Any]:
    """The content of out/lab.json."""
    c = lab.config
    w = c.workload
    return {
        "schema": "nqgen-lab/1",
        "date": lab.date,
        "machine": machine_info(),
        "kernel": kernel_json(c.kernel, c.modules_dir, c.kdir),
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
        "guest": None if lab.guest_api is None else {
            **lab.guest_api.to_json(), "detector_used": lab.guest_api.detector and c.detector
        },
        "runs": [r.to_dict() for r in lab.runs],
        "ok": not lab.failed,
        "failed": [r.name for r in lab.failed],
    }
