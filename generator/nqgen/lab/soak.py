"""Abuse in the lab: load/unload soak under churn, and loads that must be refused (issue 12 parts 1 and 2).

Soak (one boot per strategy): the guest keeps racing UDP traffic running over IPv4 and IPv6 in chunks, creates
and destroys network namespaces that use conntrack (the nqsoak_ct helper takes conntrack in every netns, so
conntrack registers and unregisters its hooks on demand) and send traffic inside them, starts and kills an NFQUEUE
consumer (queueing with bypass), and keeps a ctnetlink listener subscribed; meanwhile it loads and unloads the
mitigation ``cycles`` times (livepatch: wait for the enable transition to finish, disable, wait for the patch to
go, rmmod). At the end it compares with the state before: nf_conntrack's use count, init_net's hook tables,
``/sys/kernel/tracing/enabled_functions``, and it reads ``/proc/net/stat/nf_conntrack``. A datagram lost in a
traffic chunk that overlaps no unload window is a failure; losses in chunks overlapping an unload are reported.

Steps (refusals): load and unload modules in a given order and record each result and the kernel's lines, with
the same before/after state, e.g. a module built for another nf_conntrack build, or livepatch over ftrace.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import build
from .guest import _PRELUDE, RESULT_TTY
from .initramfs import Cpio
from .manifest import Manifest
from .modtree import ModuleFile
from .qemu import QemuOutcome, Watcher
from .results import Fault, find_faults, parse_ct_stat
from .runner import DEVICE_NODES, Guest, LabConfig, boot_initramfs
from .soakwatch import SoakWatch

SOAK_HELPER = "nqsoak_ct"
MARK_ON = "nqsoak: mitigation in force, cycle"  # written to /dev/kmsg once loaded (livepatch: transition done)
MARK_OFF = "nqsoak: mitigation going, cycle"  # ... just before the unload starts
# The reference kernel's own bug (the unfixed inline confirm on a freed clash loser), as KASAN names it
KNOWN_BUG_RE = re.compile(r"KASAN: use-after-free in (nf_confirm|ipv4_confirm|ipv6_confirm|nf_ct_deliver_cached_events)"
                          r"\+0x[0-9a-f]+/0x[0-9a-f]+ \[nf_conntrack\]")  # fmt: skip
_MARK_RE = re.compile(r"^\[\s*(\d+\.\d+)\].*nqsoak: mitigation (in force|going), cycle (\d+)")
GUEST_DIR = "/nqlab"
EXIT_DONE = 0

_STATE = r"""
state() {
	rc=$(cat /sys/module/nf_conntrack/refcnt 2>/dev/null || echo -1)
	cat /sys/module/nqsoak_ct/parameters/hooks > /tmp/hooks 2>/dev/null
	cat /sys/kernel/tracing/enabled_functions > /tmp/ef 2>/dev/null
	cut -d ' ' -f 1-3 /proc/modules | sort > /tmp/mods
	base64 -w 0 /proc/net/stat/nf_conntrack > /tmp/ct 2>/dev/null
	h="\"hooks_b64\":\"$(b64 /tmp/hooks)\",\"ef_b64\":\"$(b64 /tmp/ef)\",\"mods_b64\":\"$(b64 /tmp/mods)\""
	emit "{\"type\":\"state\",\"phase\":\"$1\",\"refcnt\":$rc,$h,\"ct_b64\":\"$(cat /tmp/ct)\"}"
}
up() { cut -d ' ' -f 1 /proc/uptime; }
lp_wait() {
	i=0
	while [ -e "$1/transition" ] && [ "$(cat "$1/transition" 2>/dev/null)" != 0 ] && [ $i -lt 600 ]; do
		usleep 50000; i=$((i + 1))
	done
	echo $((i * 50))
}
lp_gone() {
	i=0
	while [ -e "$1" ] && [ $i -lt 600 ]; do usleep 50000; i=$((i + 1)); done
	echo $((i * 50))
}
# a step of the current cycle on the console (kernel log): a guest that hangs shows where
mark() { echo "nqsoak: cycle ${c:-0} $1" > /dev/kmsg; }
"""


@dataclass(frozen=True)
class SoakModule:
    """A module the guest may load: its name, file and parameters, how to unload it."""

    name: str
    ko: Path
    params: tuple[str, ...] = ()
    livepatch: bool = False
    file: str = ""  # file name in the guest when two modules share a name (default: the name)

    @staticmethod
    def of(m: Manifest, extra_params: tuple[str, ...] = ()) -> SoakModule:
        params = tuple(f"{k}={v}" for k, v in m.params.items()) + extra_params
        return SoakModule(m.module, m.ko, params, m.unload == "livepatch")

    @property
    def guest_path(self) -> str:
        return f"{GUEST_DIR}/{self.file or self.name}.ko"


def _load_cmd(m: SoakModule) -> str:
    return " ".join(["insmod", shlex.quote(m.guest_path), *map(shlex.quote, m.params)])


def _unload_cmd(m: SoakModule) -> str:
    """Shell that unloads ``m`` and sets DRC (disable), LPW (ms waited for the patch to go), RRC (rmmod)."""
    if m.livepatch:
        lp = f"/sys/kernel/livepatch/{m.name}"
        return (
            f"DRC=0; LPW=0; if [ -e {lp} ]; then mark disable; echo 0 > {lp}/enabled 2>>/tmp/err; DRC=$?; "
            f"LPW=$(lp_gone {lp}); fi; mark rmmod; rmmod {m.name} 2>>/tmp/err; RRC=$?"
        )
    return f"DRC=0; LPW=0; mark rmmod; rmmod {m.name} 2>>/tmp/err; RRC=$?"


def _prologue(helper_params: str | None, deps: list[ModuleFile], release: str) -> list[str]:
    lines = [_PRELUDE.replace("__TTY__", RESULT_TTY), _STATE]
    lines.append("ip link set lo up")
    lines.append("mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null")
    for mod in deps:
        cmd = f"load dep {shlex.quote(mod.name)} /lib/modules/{release}/{mod.plain_relpath} false"
        lines.append(cmd if mod.optional else f"{cmd} || finish 3")
    lines.append("/bin/nq_ctevents -r /tmp/ev.ready > /tmp/ev.json 2>&1 &")
    lines.append("EV=$!")
    lines.append("wait_file /tmp/ev.ready")
    if helper_params is not None:  # None: a boot without the helper (no netns churn, no hook table dump)
        lines.append(f"load helper {SOAK_HELPER} {GUEST_DIR}/{SOAK_HELPER}.ko false {helper_params} || finish 4")
    return lines


def soak_init(
    mod: SoakModule, cycles: int, hold_ms: int, helper_queue: int, queue: tuple[int, int], deps: list[ModuleFile],
    release: str, lp_wait_enable: bool = True,
) -> str:  # fmt: skip
    """The /init of one soak boot."""
    lines = _prologue(f"queue={helper_queue}", deps, release)
    qb, qc = queue
    lp = f"/sys/kernel/livepatch/{mod.name}"
    wait_enable = f"LPE=$(lp_wait {lp})" if mod.livepatch and lp_wait_enable else "LPE=0"
    lines += [
        "state before",
        # racing UDP in chunks, new source ports each chunk (first packets of new flows race)
        "( i=0; while [ ! -e /tmp/stop ]; do s=$(up); "
        "/bin/nq_udprace -r 4 -t 2 -f 46 -p 5000 -s $((20000 + (i % 5000) * 4)) -w 2000 -n c$i > /tmp/t.json "
        "2>/dev/null; e=$(up); "
        'echo "{\\"type\\":\\"chunk\\",\\"i\\":$i,\\"start\\":$s,\\"end\\":$e}" >> /tmp/chunks.jsonl; '
        "cat /tmp/t.json >> /tmp/chunks.jsonl; i=$((i + 1)); done ) &",
        "TR=$!",
        # netns churn: each new netns gets conntrack (nqsoak_ct's pernet init) and a little racing traffic; the
        # count is replaced by a rename, so a cycle record reading it never sees it truncated (one did: "netns":,)
        "( n=0; while [ ! -e /tmp/stop ]; do unshare -n /bin/sh -c 'ip link set lo up; "
        "/bin/nq_udprace -r 4 -t 2 -f 46 -p 6000 -s 40000 -w 200 -n ns > /dev/null 2>&1'; n=$((n + 1)); "
        "echo $n > /tmp/ns.tmp; mv /tmp/ns.tmp /tmp/ns.count; done ) &",
        "NS=$!",
        # an NFQUEUE consumer that comes and goes (the queue has the bypass flag)
        f"( q=0; while [ ! -e /tmp/stop ]; do /bin/nq_queue -b {qb} -c {qc} -d 200 > /dev/null 2>&1 & QP=$!; "
        "usleep 700000; k=$(up); kill -TERM $QP; wait $QP; "
        'echo "{\\"type\\":\\"consumer_exit\\",\\"start\\":$k,\\"end\\":$(up)}" >> /tmp/exits.jsonl; '
        "q=$((q + 1)); echo $q > /tmp/q.tmp; mv /tmp/q.tmp /tmp/q.count; usleep 300000; done ) &",
        "QL=$!",
        "usleep 500000",
        "c=0",
        f"while [ $c -lt {cycles} ]; do",
        "\tc=$((c + 1)); : > /tmp/err; s=$(up)",
        "\tmark load",
        f"\t{_load_cmd(mod)} 2>>/tmp/err; LRC=$?",
        f"\t{wait_enable}",
        # markers in the kernel log: a report between these two lines came while the mitigation was in force
        f'\t[ $LRC = 0 ] && echo "{MARK_ON} $c" > /dev/kmsg',
        f"\tusleep {hold_ms * 1000}",
        f'\techo "{MARK_OFF} $c" > /dev/kmsg',
        "\tu=$(up)",
        f"\t{_unload_cmd(mod)}",
        "\te=$(up)",
        "\tmark done",
        "\tdmesg -c > /dev/null",
        # streamed: the host sees each cycle as it ends (and how far a guest that dies got)
        '\temit "{\\"type\\":\\"cycle\\",\\"c\\":$c,\\"start\\":$s,\\"unload\\":$u,\\"end\\":$e,\\"load_rc\\":$LRC,'
        '\\"lp_enable_ms\\":$LPE,\\"disable_rc\\":$DRC,\\"lp_gone_ms\\":$LPW,\\"rmmod_rc\\":$RRC,'
        '\\"netns\\":$(cat /tmp/ns.count 2>/dev/null || echo 0),\\"err_b64\\":\\"$(b64 /tmp/err)\\"}"',
        "done",
        "touch /tmp/stop",
        "wait $TR; wait $NS; wait $QL",
        "usleep 500000",
        "state after",
        'emit "{\\"type\\":\\"churn\\",\\"netns\\":$(cat /tmp/ns.count 2>/dev/null || echo 0),'
        '\\"queue_consumers\\":$(cat /tmp/q.count 2>/dev/null || echo 0)}"',
        "kill -TERM $EV; wait $EV",
        "cat /tmp/exits.jsonl > $R",
        "cat /tmp/chunks.jsonl > $R",
        "cat /tmp/ev.json > $R",
        f"finish {EXIT_DONE}",
    ]
    return "\n".join(lines) + "\n"


def steps_init(
    steps: list[tuple[str, SoakModule]], deps: list[ModuleFile], release: str,
    consumer: tuple[int, int, int] | None = None, helper: bool = True,
) -> str:  # fmt: skip
    """The /init of a boot that loads/unloads modules in order and records each result.

    Actions: "load", "unload", "unload-busy" (unload while racing traffic runs through the queue; the
    traffic's record is named busy<i>) and "unload-drained" (the same, but first enable=0 and wait until
    /proc/net/netfilter/nfnetlink_queue holds nothing). ``consumer`` = (queue base, count, delay in us) runs an NFQUEUE
    consumer for the whole boot."""
    lines = [*_prologue("queue=-1" if helper else None, deps, release), "state before"]
    if consumer is not None:
        qb, qc, delay = consumer
        lines += [f"/bin/nq_queue -b {qb} -c {qc} -d {delay} -r /tmp/q.ready > /tmp/q.json 2>&1 &", "QC=$!",
                  "wait_file /tmp/q.ready"]  # fmt: skip
    for i, (action, mod) in enumerate(steps):
        cmd = _load_cmd(mod) if action == "load" else _unload_cmd(mod)
        if action in ("unload-busy", "unload-drained"):
            # drained: stop queueing new packets (enable=0), wait until the queues hold nothing, then unload
            drain = (
                f"echo 0 > /sys/module/{mod.name}/parameters/enable; j=0; "
                "while [ \"$(awk '{s += $3} END {print s + 0}' /proc/net/netfilter/nfnetlink_queue)\" != 0 ] "
                "&& [ $j -lt 200 ]; do usleep 50000; j=$((j + 1)); done; "
                if action == "unload-drained"
                else ""
            )
            cmd = (
                f"/bin/nq_udprace -r 40 -t 2 -f 46 -p 5000 -s {50000 + i * 40} -w 3000 -n busy{i} > /tmp/busy.json"
                f" 2>/dev/null & BP=$!; usleep 400000; {drain}{cmd}; wait $BP; cat /tmp/busy.json > $R; true"
            )
        lp = f"/sys/kernel/livepatch/{mod.name}"
        wait = f"LPE=$(lp_wait {lp})" if action == "load" and mod.livepatch else "LPE=0"
        lines += [
            ": > /tmp/err; dmesg -c > /dev/null; LRC=0; DRC=0; LPW=0; RRC=0",
            f"{cmd} 2>>/tmp/err; RC=$?",
            wait,
            "usleep 300000",
            "dmesg -c > /tmp/kmsg",
            f"/bin/nq_udprace -r 20 -t 2 -f 46 -p 5000 -s {20000 + i * 40} -w 500 -n step{i} > /tmp/t.json 2>/dev/null",
            "cat /tmp/t.json > $R",
            f'emit "{{\\"type\\":\\"step\\",\\"i\\":{i},\\"action\\":\\"{action}\\",\\"module\\":\\"{mod.name}\\",'
            '\\"rc\\":$RC,\\"disable_rc\\":$DRC,\\"rmmod_rc\\":$RRC,\\"lp_enable_ms\\":$LPE,'
            '\\"err_b64\\":\\"$(b64 /tmp/err)\\",\\"dmesg_b64\\":\\"$(b64 /tmp/kmsg)\\"}"',
            "state after-step",
        ]
    if consumer is not None:
        lines += ["kill -TERM $QC; wait $QC", "cat /tmp/q.json > $R"]
    lines += ["state after", "kill -TERM $EV", f"finish {EXIT_DONE}"]
    return "\n".join(lines) + "\n"


# --- host side --------------------------------------------------------------------------------------------


@dataclass
class GuestState:
    refcnt: int
    hooks: str
    enabled_functions: str
    modules: str
    ct: dict[str, int] | None


@dataclass
class BootRecord:
    """What one abuse boot sent back."""

    outcome: QemuOutcome
    records: list[dict[str, Any]]
    states: dict[str, GuestState] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    fault_items: list[Fault] = field(default_factory=list)
    in_force: list[tuple[float, float]] = field(default_factory=list)  # kernel-log times, mitigation in force

    def was_in_force(self, t: float | None) -> bool:
        """Whether kernel time ``t`` falls between a cycle's in-force and going markers (unknown time: no)."""
        return t is not None and any(s <= t <= e for s, e in self.in_force)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == kind]

    @property
    def done(self) -> bool:
        return any(r.get("type") == "done" for r in self.records)


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        return ""
    return base64.b64decode(value).decode("utf-8", "replace")


def parse_boot(outcome: QemuOutcome) -> BootRecord:
    records = []
    for line in outcome.results.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    rec = BootRecord(outcome, records)
    for r in rec.of_type("state"):
        ct = _text(r.get("ct_b64"))
        rec.states[str(r.get("phase"))] = GuestState(
            refcnt=int(r.get("refcnt", -1)),
            hooks=_text(r.get("hooks_b64")),
            enabled_functions=_text(r.get("ef_b64")),
            modules=_text(r.get("mods_b64")),
            ct=parse_ct_stat(ct) if ct else None,
        )
    rec.fault_items = find_faults(outcome.console)
    rec.faults = [f"{f.kind}: {f.title}" for f in rec.fault_items]
    rec.in_force = in_force_windows(outcome.console)
    return rec


def in_force_windows(console: str) -> list[tuple[float, float]]:
    """The (start, end) kernel-log times between each cycle's in-force and going markers."""
    windows: list[tuple[float, float]] = []
    start: float | None = None
    for line in console.replace("\r", "").splitlines():
        m = _MARK_RE.match(line)
        if m is None:
            continue
        if m.group(2) == "in force":
            start = float(m.group(1))
        elif start is not None:
            windows.append((start, float(m.group(1))))
            start = None
    return windows


def is_known_bug(fault: Fault) -> bool:
    """The unfixed kernel's own use-after-free (a KASAN report in conntrack's confirm), not one of ours."""
    return any(KNOWN_BUG_RE.search(t) for t in (fault.title, fault.text.split("\n", 1)[0]))


class AbuseLab:
    """A built guest (programs, helper, the kernel's modules) that boots abuse scenarios."""

    def __init__(self, config: LabConfig, work: Path, helper: bool = True) -> None:
        """``helper=False``: no soak helper (it is written for 4.10+'s per-netns hooks): step boots only."""
        self.config = config
        self.work = work
        self.guest = Guest(config, work)
        self.helper = (
            build.build_module(build.guest_source(f"{SOAK_HELPER}.c"), SOAK_HELPER, config.kdir, work / SOAK_HELPER)
            if helper
            else None
        )

    def _initramfs(self, init: str, modules: list[SoakModule], deps: list[ModuleFile]) -> bytes:
        g = self.guest
        c = Cpio()
        for d in ("dev", "proc", "sys", "tmp", "root", GUEST_DIR.lstrip("/")):
            c.directory(d)
        for node, major, minor in DEVICE_NODES:
            c.char_device(f"dev/{node}", major, minor)
        c.copy("bin/busybox", self.config.busybox, 0o755)
        for applet in g.applets:
            if not c.has(f"bin/{applet}"):
                c.symlink(f"bin/{applet}", "busybox")
        c.symlink("sbin", "bin")
        for name, path in g.programs.items():
            c.copy(f"bin/{name}", path, 0o755)
        moddir = f"lib/modules/{g.release}"
        for mod in deps:
            c.file(f"{moddir}/{mod.plain_relpath}", g.module_bytes(mod))
        c.file(f"{moddir}/modules.dep", "".join(f"{m.plain_relpath}:\n" for m in deps).encode())
        if self.helper is not None:
            c.copy(f"{GUEST_DIR.lstrip('/')}/{SOAK_HELPER}.ko", self.helper)
        for m in modules:
            c.copy(m.guest_path.lstrip("/"), m.ko)
        c.file("init", init.encode(), 0o755)
        return c.bytes()

    def deps(self, modules: list[SoakModule]) -> list[ModuleFile]:
        helper = [self.helper] if self.helper is not None else []
        return self.guest.closure([*helper, *(m.ko for m in modules)])

    def boot(
        self, tag: str, init: str, modules: list[SoakModule], deps: list[ModuleFile], timeout: float,
        watch: Watcher | None = None, accel: str = "tcg",
    ) -> BootRecord:  # fmt: skip
        initramfs = self._initramfs(init, modules, deps)
        # no_timer_check: a loaded TCG host can fail the IO-APIC timer check and panic at boot (seen here)
        outcome = boot_initramfs(self.config, initramfs, self.work / tag, tag, timeout=timeout,
                                 append="no_timer_check " + self.config.append, watch=watch,
                                 accel=accel)  # fmt: skip
        return parse_boot(outcome)

    def soak(
        self, mod: SoakModule, cycles: int, *, queue: tuple[int, int] | None, hold_ms: int = 150,
        timeout: float = 3600.0, tolerate_known_bug_in_force: bool = False, stall_s: float = 900.0,
        progress: bool = False, accel: str = "tcg",
    ) -> SoakResult:  # fmt: skip
        """``cycles`` load/unload cycles of ``mod`` under churn; ``queue`` is the module's own (base, count).
        Needs the helper.
        ``tolerate_known_bug_in_force``: the strategy only narrows the window (advance-confirm): the kernel's own
        use-after-free while it is loaded is counted, not a failure.
        Each cycle's record is streamed to ``soak-<module>.cycles.jsonl`` (in the config's logs dir, else the work
        dir) as the guest reports it, with every kernel report and the step it came in; a guest with no new cycle
        for ``stall_s`` seconds (or 180 s after a hang report) is stopped. ``progress``: a line on stderr every
        10 cycles. ``accel``: qemu's ``-accel`` (``tcg,thread=single`` avoids multi-threaded TCG's stale-int3
        hang, see the README's soak section, at the price of interleaving the vCPUs on one host thread)."""
        if self.helper is None:
            raise InputError("the soak needs its helper module (AbuseLab(helper=True))")
        deps = self.deps([mod])
        helper_queue = -1 if queue is not None else 0
        init = soak_init(mod, cycles, hold_ms, helper_queue, queue or (0, 1), deps, self.guest.release)
        tag = f"soak-{mod.name}"
        watch = SoakWatch((self.config.logs_dir or self.work) / f"{tag}.cycles.jsonl", mod.name, cycles,
                          stall_s=stall_s, out=sys.stderr if progress else None)  # fmt: skip
        host: dict[str, Any] = {"started": _utc(), "load_start": _load(), "cpus": os.cpu_count()}
        rec = self.boot(tag, init, [mod], deps, timeout, watch, accel)
        r = SoakResult.of(mod.name, cycles, rec, tolerate_known_bug_in_force)
        r.cycle_log = str(watch.path)
        r.stopped = watch.stopped or r.stopped  # with the cycle and step it stopped after
        r.host = {**host, "ended": _utc(), "load_end": _load()}
        watch.end({"completed": r.completed, "cycles": r.cycles, "reports": len(r.reports),
                   "problems": r.problems})  # fmt: skip
        return r

    def steps(
        self, tag: str, steps: list[tuple[str, SoakModule]], timeout: float = 600.0,
        consumer: tuple[int, int, int] | None = None,
    ) -> BootRecord:  # fmt: skip
        modules = list({m.guest_path: m for _, m in steps}.values())
        deps = self.deps(modules)
        init = steps_init(steps, deps, self.guest.release, consumer, helper=self.helper is not None)
        return self.boot(tag, init, modules, deps, timeout)


@dataclass
class SoakResult:
    """The figures of one strategy's soak."""

    module: str
    cycles_planned: int
    cycles: int = 0
    load_failures: int = 0
    unload_failures: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0
    lost_outside_unload: int = 0  # in chunks that overlap neither: a failure
    lost_in_consumer_exits: int = 0  # in chunks overlapping a consumer exit (the queue drops what it held)
    lost_in_unload_windows: int = 0  # in chunks overlapping an unload (and no consumer exit)
    consumer_exits: int = 0
    chunks: int = 0
    chunks_overlapping_unload: int = 0
    netns_created: int = 0
    queue_consumers: int = 0
    reports: list[str] = field(default_factory=list)  # every kernel report of the boot
    # the unfixed kernel's own use-after-free (reference kernel) while no mitigation was in force: expected there
    known_bug_unmitigated: int = 0
    known_bug_in_force: int = 0  # ... while the mitigation was in force: a failure, except for advance-confirm
    tolerate_known_bug_in_force: bool = False  # advance-confirm still calls the unfixed confirm: it only narrows
    other_reports: list[str] = field(default_factory=list)  # anything else (Oops, WARNING, lockdep, other KASAN)
    in_force_windows: int = 0  # marker pairs found in the kernel log (one per successful load)
    refcnt_before: int = -1
    refcnt_after: int = -1
    hooks_same: bool = False
    enabled_functions_same: bool = False
    module_left_loaded: bool = False
    ct_delta: dict[str, int] = field(default_factory=dict)
    lp_enable_ms_max: int = 0
    lp_gone_ms_max: int = 0
    seconds: float = 0.0
    completed: bool = False
    stopped: str = ""  # why the host stopped the guest (no progress), "" if it did not
    cycle_log: str = ""  # the JSONL the cycles were streamed to
    host: dict[str, Any] = field(default_factory=dict)  # when and under what host load it ran
    errors: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        p = []
        if self.stopped:
            p.append(f"stopped: {self.stopped}")
        elif not self.completed:
            p.append("the boot did not complete")
        if self.cycles != self.cycles_planned:
            p.append(f"{self.cycles}/{self.cycles_planned} cycles")
        if self.load_failures or self.unload_failures:
            p.append(f"{self.load_failures} load and {self.unload_failures} unload failures")
        if self.other_reports:
            p.append(f"{len(self.other_reports)} kernel reports: {'; '.join(self.other_reports[:3])}")
        if self.in_force_windows != self.cycles - self.load_failures:
            p.append(f"{self.in_force_windows} in-force markers for {self.cycles - self.load_failures} loads")
        if self.known_bug_in_force and not self.tolerate_known_bug_in_force:
            p.append(f"{self.known_bug_in_force} use-after-free reports while the mitigation was in force")
        if self.lost_outside_unload:
            p.append(f"{self.lost_outside_unload} datagrams lost outside unload windows")
        if self.refcnt_after != self.refcnt_before:
            p.append(f"nf_conntrack use count {self.refcnt_before} -> {self.refcnt_after}")
        if not self.hooks_same:
            p.append("hook tables differ")
        if not self.enabled_functions_same:
            p.append("ftrace filters differ")
        if self.module_left_loaded:
            p.append("module still loaded")
        if self.ct_delta.get("drop", 0) or self.ct_delta.get("early_drop", 0):
            p.append(f"conntrack drops {self.ct_delta}")
        return p + self.errors

    @staticmethod
    def of(module: str, cycles: int, rec: BootRecord, tolerate_known_bug_in_force: bool = False) -> SoakResult:
        r = SoakResult(module=module, cycles_planned=cycles, seconds=round(rec.outcome.seconds, 1))
        r.completed = rec.done
        r.stopped = rec.outcome.stopped
        r.reports = rec.faults
        r.tolerate_known_bug_in_force = tolerate_known_bug_in_force
        r.in_force_windows = len(rec.in_force)
        for f, text in zip(rec.fault_items, rec.faults, strict=True):
            if not is_known_bug(f):
                r.other_reports.append(text)
            elif rec.was_in_force(f.time):
                r.known_bug_in_force += 1
            else:
                r.known_bug_unmitigated += 1
        cyc = rec.of_type("cycle")
        r.cycles = len(cyc)
        r.load_failures = sum(1 for c in cyc if c.get("load_rc") != 0)
        r.unload_failures = sum(1 for c in cyc if c.get("rmmod_rc") != 0 or c.get("disable_rc") != 0)
        r.lp_enable_ms_max = max((int(c.get("lp_enable_ms", 0)) for c in cyc), default=0)
        r.lp_gone_ms_max = max((int(c.get("lp_gone_ms", 0)) for c in cyc), default=0)
        unloads = [(float(c["unload"]), float(c["end"])) for c in cyc if "unload" in c and "end" in c]
        exits = [(float(c["start"]), float(c["end"])) for c in rec.of_type("consumer_exit")]
        r.consumer_exits = len(exits)

        def overlaps(chunk: dict[str, Any], windows: list[tuple[float, float]]) -> bool:
            return any(float(chunk["start"]) <= e and s <= float(chunk["end"]) for s, e in windows)

        chunk: dict[str, Any] | None = None
        for item in rec.records:
            if item.get("type") == "chunk":
                chunk = item
                r.chunks += 1
                chunk["unload"] = overlaps(chunk, unloads)
                chunk["consumer_exit"] = overlaps(chunk, exits)
                r.chunks_overlapping_unload += chunk["unload"]
            elif item.get("type") == "traffic" and chunk is not None and str(item.get("name", "")).startswith("c"):
                sent = int(item.get("sent", 0))
                got = int(item.get("received", 0))
                r.datagrams_sent += sent
                r.datagrams_received += got
                lost = max(0, sent - got)
                if chunk["consumer_exit"]:  # a consumer's exit drops what it held, whatever the strategy
                    r.lost_in_consumer_exits += lost
                elif chunk["unload"]:
                    r.lost_in_unload_windows += lost
                else:
                    r.lost_outside_unload += lost
        churn = rec.of_type("churn")
        if churn:
            r.netns_created = int(churn[-1].get("netns", 0))
            r.queue_consumers = int(churn[-1].get("queue_consumers", 0))
        before, after = rec.states.get("before"), rec.states.get("after")
        if before is None or after is None:
            r.errors.append("no before/after state")
            return r
        r.refcnt_before, r.refcnt_after = before.refcnt, after.refcnt
        r.hooks_same = bool(before.hooks) and before.hooks == after.hooks
        r.enabled_functions_same = before.enabled_functions == after.enabled_functions
        r.module_left_loaded = any(line.split(" ", 1)[0] == module for line in after.modules.splitlines())
        if before.ct is not None and after.ct is not None:
            r.ct_delta = {k: after.ct.get(k, 0) - before.ct.get(k, 0) for k in after.ct}
        return r

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "problems": self.problems}


def _utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def make_lab(
    config: LabConfig, work_dir: Path | None = None, helper: bool = True
) -> tuple[AbuseLab, tempfile.TemporaryDirectory[str]]:
    if not (config.modules_dir / "modules.dep").is_file():
        raise InputError(f"{config.modules_dir}/modules.dep not found")
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="nqgen-abuse-", dir=work_dir)
    return AbuseLab(config, Path(tmp.name), helper), tmp


def shadow_modules_dir(modules_dir: Path, replace: dict[str, Path], dest: Path) -> Path:
    """A copy of a /lib/modules/<release> tree made of symlinks, with the files in ``replace`` (relative path
    -> file) swapped in: e.g. another build of nf_conntrack.ko for the same release."""
    root = dest / modules_dir.name
    root.mkdir(parents=True)
    on_path = {"."}  # directories holding a replaced file, and their parents: real directories in the copy
    for rel in replace:
        on_path.update(str(p) for p in Path(rel).parents)

    def fill(src_dir: Path, rel_dir: Path) -> None:
        for src in sorted(src_dir.iterdir()):
            rel = rel_dir / src.name
            if str(rel) in replace:
                (root / rel).symlink_to(replace[str(rel)].resolve())
            elif src.is_dir() and not src.is_symlink() and str(rel) in on_path:
                (root / rel).mkdir()
                fill(src, rel)
            else:
                (root / rel).symlink_to(src)

    fill(modules_dir, Path("."))
    return root


# --- make soak --------------------------------------------------------------------------------------------------


def soak_markdown(results: list[SoakResult], kernel: str, cycles: int) -> str:
    head = (
        f"# Soak: {cycles} load/unload cycles per strategy on {kernel}\n\n"
        if all(r.cycles_planned == cycles for r in results)
        else f"# Soak: load/unload cycles per strategy on {kernel}\n\n"
    ) + (
        "Racing UDP (IPv4+IPv6) in chunks, netns churn with conntrack in every netns, an NFQUEUE consumer "
        "started and killed in a loop (queue with bypass), a ctnetlink listener. Losses are attributed to the "
        "traffic chunk they happened in: chunks overlapping a consumer exit (the kernel drops what a consumer "
        "held), else an unload window, else neither (a failure). Reports: the unfixed kernel's own use-after-free "
        "(reference kernel) outside / inside the windows where the mitigation was in force (kernel-log markers), "
        "and any other report (Oops, WARNING, lockdep, other KASAN).\n\n"
        "| strategy | cycles | datagrams | lost: consumer exits / unloads / elsewhere | netns | "
        "reports: own UAF unmitigated / in force / other | "
        "use count before/after | hooks, ftrace filters | conntrack drops | time (s) | ran (UTC), host load | "
        "problems |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        rows.append(
            f"| {r.module} | {r.cycles}/{r.cycles_planned} | {r.datagrams_received}/{r.datagrams_sent} | "
            f"{r.lost_in_consumer_exits} / {r.lost_in_unload_windows} / {r.lost_outside_unload} | "
            f"{r.netns_created} | {r.known_bug_unmitigated} / {r.known_bug_in_force} / {len(r.other_reports)} | "
            f"{r.refcnt_before}/{r.refcnt_after} | "
            f"{'same' if r.hooks_same else 'DIFFER'}, {'same' if r.enabled_functions_same else 'DIFFER'} | "
            f"{r.ct_delta.get('drop', '?')} | {r.seconds} | {_ran(r.host)} | {'; '.join(r.problems) or 'none'} |"
        )
    return head + "\n".join(rows) + "\n"


def _ran(host: dict[str, Any]) -> str:
    if not host:
        return "?"
    loads = [*host.get("load_start", [])[:1], *host.get("load_end", [])[:1]]
    started, ended = str(host.get("started", "?")), str(host.get("ended", "?"))
    return f"{started[:16]} to {ended[11:16]}, load {' to '.join(map(str, loads))}"


def result_of_dict(d: dict[str, Any]) -> SoakResult:
    """A SoakResult back from its report entry (``to_dict``)."""
    names = {f.name for f in fields(SoakResult)}
    return SoakResult(**{k: v for k, v in d.items() if k in names})


def write_report(out: Path, release: str, cycles: int, results: list[SoakResult]) -> str:
    """Write ``soak-<release>.json`` and ``SOAK-<release>.md`` in ``out``: the strategies of this run, and those
    an earlier run left there (one strategy at a time, e.g. ``--strategy``) that this run did not repeat."""
    path = out / f"soak-{release}.json"
    kept: list[SoakResult] = []
    try:
        old = json.loads(path.read_text())
        if old.get("kernel") == release:
            ran = {r.module for r in results}
            kept = [result_of_dict(d) for d in old.get("strategies", []) if d.get("module") not in ran]
    except (OSError, ValueError, TypeError, AttributeError):
        kept = []
    merged = kept + results
    data = {"kernel": release, "cycles": cycles, "strategies": [r.to_dict() for r in merged]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    md = soak_markdown(merged, release, cycles)
    (out / f"SOAK-{release}.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from ..errors import NqgenError
    from .kernel import default_cache_dir, default_image, resolve_image
    from .manifest import discover

    ap = argparse.ArgumentParser(prog="python -m nqgen.lab.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out"), help="generated and built tree (nqgen + make)")
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--strategy", action="append", default=[])
    ap.add_argument("--kernel", type=Path)
    ap.add_argument("--modules-dir", type=Path)
    ap.add_argument("--kdir", type=Path)
    ap.add_argument("--hold-ms", type=int, default=150)
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per boot")
    ap.add_argument("--force", action="store_true", help="use --out even when it is a link or not nqgen's")
    ap.add_argument("--stall", type=float, default=900.0,
                    help="stop a boot that reports no cycle for this many seconds (180 s after a hang report)")
    ap.add_argument("--accel", default="tcg", choices=("tcg", "tcg,thread=single"),
                    help="qemu -accel; tcg,thread=single runs every vCPU on one host thread")
    args = ap.parse_args(argv)
    try:
        from ..generate import check_generated

        check_generated(args.out, args.force)
        inputs = json.loads((args.out / "inputs.json").read_text())
        release = str(inputs["release"])
        kdir: Path = args.kdir or Path(str(inputs["kdir"]))
        image = resolve_image(args.kernel or default_image(release), default_cache_dir())
        config = LabConfig(
            kernel=image,
            modules_dir=args.modules_dir or Path("/lib/modules") / image.release,
            kdir=kdir,
            memory="1G" if image.kasan else "512M",
            logs_dir=args.out / "soak-logs",
        )
        manifests = discover(args.out, tuple(args.strategy))
        lab, tmp = make_lab(config)
        results = []
        with tmp:
            for m in manifests:
                queue = (m.queue_base, m.queue_count) if m.queue_base is not None else None
                r = lab.soak(SoakModule.of(m), args.cycles, queue=queue, hold_ms=args.hold_ms, timeout=args.timeout,
                             tolerate_known_bug_in_force=m.strategy == "advance-confirm", stall_s=args.stall,
                             progress=True, accel=args.accel)  # fmt: skip
                print(f"soak {m.strategy}: {r.cycles}/{r.cycles_planned} cycles, {r.datagrams_received}/"
                      f"{r.datagrams_sent} datagrams, reports {r.known_bug_unmitigated} unmitigated / "
                      f"{r.known_bug_in_force} in force / {len(r.other_reports)} other, {r.seconds} s: "
                      f"{'; '.join(r.problems) or 'ok'}", file=sys.stderr, flush=True)  # fmt: skip
                results.append(r)
                write_report(args.out, image.release, args.cycles, results)  # each strategy as it ends
    except (OSError, KeyError, ValueError) as exc:
        print(f"nqgen soak: error: {exc}", file=sys.stderr)
        return 3
    except NqgenError as exc:
        print(f"nqgen soak: error: {exc}", file=sys.stderr)
        return exc.exit_code
    # one report per kernel: make soak runs the Debian kernel and the reference kernel on their own trees
    print(write_report(args.out, image.release, args.cycles, results))
    return 5 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
