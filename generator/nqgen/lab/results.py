"""Results of lab boots: dataclasses, the parser for the guest's JSON lines, and fault reports on the console."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

CT_STAT_FIELDS = ("clashres", "insert_failed", "drop", "early_drop", "invalid", "insert", "found", "search_restart")
KERNEL_LOG_TAIL = 20000  # characters of the guest's kernel log kept in lab.json (full logs: out/lab-logs)
TAINT_FAULT_BITS = {5: "B (bad page)", 7: "D (died)", 9: "W (warning)", 14: "L (soft lockup)"}


@dataclass
class ModuleLoad:
    """One insmod in the guest."""

    role: str  # "dep", "helper", "mitigation"
    module: str
    rc: int
    optional: bool
    stderr: str
    dmesg: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def reason(self) -> str:
        """Why it was refused: insmod's message plus the kernel's line, shortened."""
        parts = [self.stderr.strip().splitlines()[-1] if self.stderr.strip() else ""]
        kern = [ln for ln in strip_timestamps(self.dmesg).splitlines() if ln.strip()]
        if kern:
            parts.append(kern[-1].strip())
        return " | ".join(p for p in parts if p)[:300]


@dataclass
class Traffic:
    """Datagrams of one family in one traffic phase."""

    phase: str  # "workload" or "health"
    family: str
    rounds: int
    threads: int
    sent: int
    received: int
    send_errors: int

    @property
    def attempted(self) -> int:
        """Datagrams the senders tried: a send the kernel refused (a hook dropped it) counts as lost."""
        return self.sent + self.send_errors

    @property
    def lost(self) -> int:
        return max(self.attempted - self.received, 0)


@dataclass
class Unload:
    """How the mitigation was removed."""

    method: str  # "rmmod" or "livepatch"
    disable_rc: int
    transition: str  # last value of the livepatch transition file ("gone" once the patch is freed)
    waited_ms: int
    rmmod_rc: int
    still_loaded: bool
    stderr: str
    dmesg: str
    enable_wait_ms: int = 0  # livepatch: time spent waiting for the enable transition before disabling

    @property
    def ok(self) -> bool:
        return self.disable_rc == 0 and self.rmmod_rc == 0 and not self.still_loaded


@dataclass
class Fault:
    """One kernel report found on the console (Oops, BUG, WARNING, KASAN, lockdep, panic, hang)."""

    kind: str
    title: str
    text: str
    frames: list[str] = field(default_factory=list)
    time: float | None = None  # kernel timestamp of the report's first line (s since boot)
    phase: str = "run"  # boot (before init: the kernel's own), setup, load, workload, unload, after; "run" if unknown


@dataclass
class RunResult:
    """Everything measured in one boot."""

    name: str  # "baseline", "baseline-nfqueue", a strategy, or "<strategy>+nfqueue"
    kind: str  # "baseline" or "mitigation"
    strategy: str | None
    module: str | None
    nfqueue: bool
    repeat: int = 1
    seconds: float = 0.0
    exit_code: int | None = None
    guest_exit: int | None = None
    timed_out: bool = False
    completed: bool = False
    release: str | None = None
    loads: list[ModuleLoad] = field(default_factory=list)
    counters: dict[str, dict[str, int | None]] = field(default_factory=dict)
    counters_present: dict[str, bool] = field(default_factory=dict)
    corrected_counter: str | None = None
    traffic: list[Traffic] = field(default_factory=list)
    ct_stat: dict[str, dict[str, int] | None] = field(default_factory=dict)  # phase -> summed counters
    taint: dict[str, int] = field(default_factory=dict)
    uptime: dict[str, float] = field(default_factory=dict)  # guest uptime (s) at boot/before/workload/health
    queue: dict[str, Any] | None = None
    ctevents: dict[str, Any] | None = None
    unload: Unload | None = None
    livepatch: dict[str, Any] | None = None  # state after load: enabled, transition, waited_ms
    patched: dict[str, bool] = field(default_factory=dict)  # function -> the kernel lists it as patched
    ftrace_enabled: dict[str, Any] | None = None  # sysctl kernel.ftrace_enabled=0 tried while loaded
    bridge: dict[str, Any] | None = None  # pings out through a bridge: nf_confirm_calls before and after
    detector: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # phase -> nqlab_detect counts
    faults: list[Fault] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # lab-side problems (helper not ready, bad lines)
    kernel_log: str = ""
    panic: str = ""  # the console's "Kernel panic - not syncing: ..." line, "" when the kernel did not panic

    # ---- derived values -------------------------------------------------------------------
    @property
    def mitigation_load(self) -> ModuleLoad | None:
        return next((x for x in self.loads if x.role == "mitigation"), None)

    @property
    def loaded(self) -> bool | None:
        load = self.mitigation_load
        return None if self.kind == "baseline" else (load is not None and load.ok)

    def sent(self, phase: str = "workload") -> int:
        """Datagrams attempted in ``phase`` (successful sends plus sends the kernel refused)."""
        return sum(t.attempted for t in self.traffic if t.phase == phase)

    def send_errors(self, phase: str = "workload") -> int:
        return sum(t.send_errors for t in self.traffic if t.phase == phase)

    def received(self, phase: str = "workload") -> int:
        return sum(t.received for t in self.traffic if t.phase == phase)

    def ct_delta(self, start: str, end: str) -> dict[str, int] | None:
        a, b = self.ct_stat.get(start), self.ct_stat.get(end)
        if a is None or b is None:
            return None
        return {k: b.get(k, 0) - a.get(k, 0) for k in b}

    @property
    def workload_ct(self) -> dict[str, int] | None:
        return self.ct_delta("before", "workload")

    @property
    def counter_deltas(self) -> dict[str, int | None]:
        """Counter value after the workload minus after load (None when unreadable)."""
        before, after = self.counters.get("loaded", {}), self.counters.get("workload", {})
        out: dict[str, int | None] = {}
        for name, value in after.items():
            start = before.get(name)
            out[name] = None if value is None or start is None else value - start
        return out

    @property
    def corrected_calls(self) -> int | None:
        if not self.corrected_counter:
            return None
        return self.counters.get("workload", {}).get(self.corrected_counter)

    @property
    def healthy(self) -> bool | None:
        """Traffic still flowed after the unload (None when the health phase never ran)."""
        health = [t for t in self.traffic if t.phase == "health"]
        if not health:
            return None
        return all(t.sent > 0 and t.lost == 0 for t in health)

    @property
    def health_flows(self) -> int:
        return sum(t.rounds for t in self.traffic if t.phase == "health")

    @property
    def confirmed_after(self) -> bool | None:
        """Whether conntrack still confirmed new flows after the unload (its table holds them), if measurable."""
        stat = self.ct_stat.get("health")
        if stat is None or "entries" not in stat or self.health_flows == 0:
            return None
        return stat["entries"] >= self.health_flows

    @property
    def detector_loaded(self) -> bool | None:
        """Whether the stale-use detector ran in this boot (None: the lab did not plan it)."""
        load = next((x for x in self.loads if x.role == "detector"), None)
        return None if load is None else load.ok

    def _detector_last(self) -> dict[str, Any] | None:
        for phase in ("end", "workload", "before"):
            counts = self.detector.get(phase)
            if counts is not None:
                return counts
        return None

    @property
    def stale_uses(self) -> int | None:
        """Event deliveries to a released conntrack entry seen by the detector over the whole boot."""
        last = self._detector_last()
        return None if last is None else sum(_ints(last.get("stale")))

    @property
    def stale_by_family(self) -> dict[str, int] | None:
        last = self._detector_last()
        return None if last is None else dict(zip(("ipv4", "ipv6"), _ints(last.get("stale")), strict=False))

    @property
    def detector_clashes(self) -> int | None:
        """Clashes (the skb's entry switched by __nf_conntrack_confirm) during the workload."""
        before, after = self.detector.get("before"), self.detector.get("workload")
        if before is None or after is None:
            return None
        return sum(_ints(after.get("clashes"))) - sum(_ints(before.get("clashes")))

    @property
    def taint_faults(self) -> list[str]:
        last = max(self.taint.values(), default=0)
        first = self.taint.get("boot", 0)
        new = last & ~first
        return [name for bit, name in TAINT_FAULT_BITS.items() if new & (1 << bit)]

    def set_faults(self, faults: list[Fault]) -> None:
        """Take the console's reports and tag each with the phase it happened in (from the guest's uptimes).

        Phases: boot (before init: the kernel's own WARNINGs are not counted), setup (loading the kernel's
        modules, the helper), load (the mitigation's insmod), workload, unload, after (traffic after unload).
        """
        marks = [(p, self.uptime[p]) for p in ("boot", "before", "loaded", "workload", "unloaded")
                 if p in self.uptime]
        names = {"boot": "setup", "before": "load", "loaded": "workload", "workload": "unload", "unloaded": "after"}
        if "loaded" not in self.uptime:
            names["before"] = "workload"
        if "unloaded" not in self.uptime:
            names["workload"] = "after"
        for f in faults:
            if not marks and not self.completed:
                f.phase = "boot"  # init never reported: the kernel failed on its own before any of ours ran
                continue
            if f.time is None or not marks:
                continue
            phase = "boot"
            for mark, t in marks:
                if f.time >= t:
                    phase = names[mark]
            f.phase = phase
        self.faults = faults

    @property
    def run_faults(self) -> list[Fault]:
        """Reports that count: all but those the kernel printed before init started (its own, not ours)."""
        return [f for f in self.faults if f.phase != "boot"]

    @property
    def problems(self) -> list[str]:
        """Why this run fails the lab (empty: it passed)."""
        out: list[str] = []
        if self.stale_uses:
            out.append(f"{self.stale_uses} stale use(s) of released conntrack entries (nqlab_detect)")
        if self.run_faults:
            first = self.run_faults[0]
            out.append(f"{len(self.run_faults)} kernel report(s), first: {first.title}")
        elif self.taint_faults:
            out.append("kernel tainted " + ", ".join(self.taint_faults))
        boot = [f for f in self.faults if f.phase == "boot"]
        if boot and not self.completed:
            out.append(f"the kernel failed before init ({len(boot)} report(s), first: {boot[0].title})")
        if self.timed_out:
            out.append("timed out")
        elif not self.completed:
            out.append("guest did not finish")
        for load in self.loads:
            if not load.ok and (not load.optional or load.role == "detector") and load.role != "mitigation":
                out.append(f"{load.role} {load.module} refused: {load.reason}")
        if self.kind == "mitigation":
            mload = self.mitigation_load
            if mload is None:
                if self.completed:
                    out.append("mitigation was never loaded")
            elif not mload.ok:
                out.append(f"refused: {mload.reason}")
            elif self.unload is None:
                if self.completed:
                    out.append("never unloaded")
            elif not self.unload.ok:
                out.append(f"unload failed ({self.unload.method}: {self.unload.stderr.strip()[:120]})")
        lost = self.sent() - self.received()
        if self.completed and self.sent() == 0:
            out.append("no datagram sent")
        elif lost > 0:
            refused = self.send_errors()
            why = f" ({refused} refused at send)" if refused else ""
            out.append(f"lost {lost} of {self.sent()} datagrams{why}")
        if self.completed and self.healthy is False:
            out.append("traffic failed after unload")
        confirmed = self.confirmed_after
        if confirmed is not None and not confirmed:
            entries = (self.ct_stat.get("health") or {}).get("entries")
            out.append(f"conntrack holds {entries} entries after {self.health_flows} new flows: not confirmed")
        out.extend(self.errors)
        return out

    @property
    def verdict(self) -> str:
        if self.run_faults or self.taint_faults or self.stale_uses:
            return "fault"
        if self.timed_out or not self.completed:
            return "incomplete"
        if self.kind == "mitigation" and self.loaded is False:
            return "refused"
        if self.sent() - self.received() > 0:
            return "loss"
        if self.kind == "mitigation" and (self.unload is None or not self.unload.ok):
            return "unload-failed"
        if self.problems:
            return "problem"
        return "ok"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["derived"] = {
            "verdict": self.verdict,
            "problems": self.problems,
            "loaded": self.loaded,
            "refusal": self.mitigation_load.reason
            if self.mitigation_load is not None and not self.mitigation_load.ok
            else None,
            "sent": self.sent(),
            "received": self.received(),
            "lost": self.sent() - self.received(),
            "send_errors": self.send_errors(),
            "health_sent": self.sent("health"),
            "health_received": self.received("health"),
            "healthy": self.healthy,
            "confirmed_after": self.confirmed_after,
            "workload_ct": self.workload_ct,
            "health_ct": self.ct_delta("workload", "health"),
            "counter_deltas": self.counter_deltas,
            "corrected_calls": self.corrected_calls,
            "unloaded": None if self.unload is None else self.unload.ok,
            "taint_faults": self.taint_faults,
            "fault_count": len(self.run_faults),
            "detector_loaded": self.detector_loaded,
            "stale_uses": self.stale_uses,
            "stale_by_family": self.stale_by_family,
            "detector_clashes": self.detector_clashes,
            "boot_reports": dict(Counter(f.title for f in self.faults if f.phase == "boot").most_common(5)),
            "faults_by_phase": dict(Counter(f.phase for f in self.run_faults)),
            "fault_kinds": sorted({f.kind for f in self.faults}),
            "fault_titles": dict(Counter(f.title for f in self.faults).most_common(5)),
            "workload_seconds": round(self.uptime["workload"] - self.uptime["before"], 2)
            if "workload" in self.uptime and "before" in self.uptime
            else None,
        }
        return d


# ---- parsing ------------------------------------------------------------------------------

_TS_RE = re.compile(r"^\[\s*\d+\.\d+\]\s?", re.MULTILINE)
_TS_VALUE_RE = re.compile(r"^\[\s*(\d+\.\d+)\]\s?")


def strip_timestamps(text: str) -> str:
    return _TS_RE.sub("", text)


def _b64(value: object) -> str:
    if not isinstance(value, str):
        return ""
    try:
        return base64.b64decode(value).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return ""


def parse_ct_stat(text: str) -> dict[str, int]:
    """Sum the per-CPU hex rows of /proc/net/stat/nf_conntrack into one value per column."""
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return {}
    names, totals = lines[0], dict.fromkeys(lines[0], 0)
    for row in lines[1:]:
        for name, value in zip(names, row, strict=False):
            try:
                totals[name] += int(value, 16)
            except ValueError:
                continue
    # "entries" is the same global gauge on every row: keep one value, not the sum
    if "entries" in totals and len(lines) > 1:
        with contextlib.suppress(ValueError, IndexError):
            totals["entries"] = int(lines[1][names.index("entries")], 16)
    return totals


def apply_results(run: RunResult, text: str) -> None:
    """Fill ``run`` from the guest's JSON lines (ttyS1); malformed lines are kept as errors."""
    log: list[str] = []
    for raw in text.splitlines():
        line = raw.strip().strip("\x00")
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            run.errors.append(f"unparsable result line: {line[:80]}")
            continue
        if not isinstance(rec, dict):
            continue
        _apply_record(run, rec, log)
    run.kernel_log = "".join(log)[-KERNEL_LOG_TAIL:]


def _ints(value: object) -> list[int]:
    """The integers of a JSON list (anything else counts as none)."""
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _apply_record(run: RunResult, rec: dict[str, Any], log: list[str]) -> None:
    kind = rec.get("type")
    if kind == "boot":
        run.release = str(rec.get("release", ""))
    elif kind == "log":
        log.append(_b64(rec.get("b64")))
    elif kind == "insmod":
        dmesg = _b64(rec.get("dmesg_b64"))
        log.append(dmesg)
        run.loads.append(
            ModuleLoad(
                role=str(rec.get("role", "")),
                module=str(rec.get("module", "")),
                rc=_int(rec.get("rc"), -1),
                optional=bool(rec.get("optional")),
                stderr=_b64(rec.get("stderr_b64")),
                dmesg=dmesg,
            )
        )
    elif kind == "counters":
        values = rec.get("values") or {}
        run.counters[str(rec.get("phase"))] = {
            str(k): (v if isinstance(v, int) and not isinstance(v, bool) else None) for k, v in values.items()
        }
        run.counters_present[str(rec.get("phase"))] = bool(rec.get("present"))
    elif kind == "ctstat":
        b64 = rec.get("b64")
        run.ct_stat[str(rec.get("phase"))] = None if b64 is None else parse_ct_stat(_b64(b64))
    elif kind == "taint":
        run.taint[str(rec.get("phase"))] = _int(rec.get("value"))
        up = rec.get("uptime")
        if isinstance(up, int | float) and not isinstance(up, bool):
            run.uptime[str(rec.get("phase"))] = float(up)
    elif kind == "traffic":
        run.traffic.append(
            Traffic(
                phase=str(rec.get("name", "")),
                family=str(rec.get("family", "")),
                rounds=_int(rec.get("rounds")),
                threads=_int(rec.get("threads")),
                sent=_int(rec.get("sent")),
                received=_int(rec.get("received")),
                send_errors=_int(rec.get("send_errors")),
            )
        )
    elif kind == "program":
        if _int(rec.get("rc")) != 0:
            run.errors.append(f"{rec.get('name')} exited {rec.get('rc')}: {_b64(rec.get('stderr_b64')).strip()[:120]}")
    elif kind == "unload":
        dmesg = _b64(rec.get("dmesg_b64"))
        log.append(dmesg)
        run.unload = Unload(
            method=str(rec.get("method", "")),
            disable_rc=_int(rec.get("disable_rc"), -1),
            transition=str(rec.get("transition", "")),
            waited_ms=_int(rec.get("waited_ms")),
            enable_wait_ms=_int(rec.get("enable_wait_ms")),
            rmmod_rc=_int(rec.get("rmmod_rc"), -1),
            still_loaded=bool(rec.get("still_loaded")),
            stderr=_b64(rec.get("stderr_b64")),
            dmesg=dmesg,
        )
    elif kind == "livepatch":
        run.livepatch = {k: v for k, v in rec.items() if k != "type"}
        if rec.get("enabled") != "1" or rec.get("transition") != "0":
            pending = f"; tasks not yet switched: {rec['pending']}" if rec.get("pending") else ""
            run.errors.append(f"livepatch not fully applied (enabled {rec.get('enabled')}, "
                              f"transition {rec.get('transition')}{pending})")
    elif kind == "patched":
        run.patched[str(rec.get("function"))] = bool(rec.get("present"))
        if not rec.get("present"):
            run.errors.append(f"{rec.get('function')} is not patched while the module is loaded ({rec.get('how')})")
    elif kind == "ftrace_enabled":
        run.ftrace_enabled = {k: v for k, v in rec.items() if k not in ("type", "stderr_b64")}
        run.ftrace_enabled["refused"] = refused = rec.get("value_after") == "1"
        if rec.get("expect_refused") and not refused:
            run.errors.append("sysctl kernel.ftrace_enabled=0 was accepted while the module is loaded: "
                              "the mitigation was silently off (no FTRACE_OPS_FL_PERMANENT)")
    elif kind == "bridge":
        run.bridge = {k: v for k, v in rec.items() if k not in ("type", "stderr_b64")}
        before, after = rec.get("nf_confirm_before"), rec.get("nf_confirm_after")
        if not rec.get("setup"):
            run.errors.append(f"bridge setup failed: {_b64(rec.get('stderr_b64')).strip()[:160]}")
        elif not (isinstance(before, int) and isinstance(after, int) and after > before):
            run.errors.append(f"bridged packets did not reach the corrected nf_confirm ({before} -> {after})")
    elif kind == "queue":
        run.queue = {k: v for k, v in rec.items() if k != "type"}
        if _int(rec.get("bind_error")) != 0:
            run.errors.append(f"NFQUEUE consumer could not bind (error {rec.get('bind_error')})")
    elif kind == "ctevents":
        run.ctevents = {k: v for k, v in rec.items() if k != "type"}
        if not rec.get("subscribed"):
            run.errors.append(f"ctnetlink listener could not subscribe (error {rec.get('error')})")
    elif kind == "detector":
        counts = rec.get("counts")
        run.detector[str(rec.get("phase"))] = counts if isinstance(counts, dict) else None
    elif kind == "error":
        run.errors.append(f"guest: {rec.get('what')}")
    elif kind == "done":
        run.completed = True


# ---- kernel reports on the console --------------------------------------------------------

_HEADERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("KASAN", re.compile(r"^BUG: KASAN: ")),
    ("lockdep", re.compile(r"^WARNING: (possible (circular|recursive) locking|inconsistent lock state|"
                           r"suspicious RCU usage|bad unlock balance|held lock freed)")),
    ("lockdep", re.compile(r"^(INFO: )?(possible irq lock inversion|inconsistent lock state)")),
    ("UBSAN", re.compile(r"^UBSAN: ")),
    ("hang", re.compile(r"^(watchdog: BUG: soft lockup|NMI watchdog: Watchdog detected hard LOCKUP)")),
    ("BUG", re.compile(r"^(BUG: |kernel BUG at )")),
    ("Oops", re.compile(r"^(Oops: |general protection fault)")),
    ("WARNING", re.compile(r"^WARNING: ")),
    ("hang", re.compile(r"^(INFO: task .* blocked for more than|rcu: INFO: .* detected stalls)")),
    ("panic", re.compile(r"^Kernel panic - not syncing")),
)
_NEW_REPORT_KINDS = ("KASAN", "WARNING", "lockdep", "BUG", "UBSAN", "hang")
_END_RE = re.compile(r"^(---\[ end |={20,}$)")
_FRAME_RE = re.compile(r"^\s*(\?\s+)?([A-Za-z_.][\w.]*\+0x[0-9a-f]+/0x[0-9a-f]+(?: \[\w+\])?)")
_REPORTING_FRAME_RE = re.compile(
    r"^(dump_stack|show_stack|print_report|print_address_description|kasan_|__kasan|__asan_|check_memory_region|"
    r"report_bug|handle_bug|exc_invalid_op|asm_exc_invalid_op|__warn|warn_slowpath|panic|lockdep_|"
    r"print_circular_bug|check_noncircular|__lock_acquire|ubsan_|__ubsan)"
)
_TRACE_END_RE = re.compile(r"^\s*(</TASK>|Allocated by task|Freed by task|The buggy address)")
_RIP_RE = re.compile(r"^RIP: \w+:(\S+(?: \[\w+\])?)")
_MAX_REPORT_LINES = 120


def _classify(line: str) -> str | None:
    for kind, pattern in _HEADERS:
        if pattern.search(line):
            return kind
    return None


def find_panic(console: str) -> str:
    """The first "Kernel panic - not syncing" line of the console ("" if none): with ``oops=panic`` an Oops ends
    the boot there, and ``find_faults`` folds that line into the report it closes, so it is kept apart here."""
    for raw in console.replace("\r", "").splitlines():
        line = strip_timestamps(raw).strip()
        if line.startswith("Kernel panic - not syncing"):
            return line
    return ""


def report_kind(console_line: str) -> str | None:
    """The kind of kernel report a console line starts (KASAN, WARNING, hang, ...), None if it starts none."""
    ts = _TS_VALUE_RE.match(console_line)
    return _classify(console_line[ts.end() :] if ts else console_line)


def find_faults(console: str) -> list[Fault]:
    """Every kernel report on the console, with its text, title and top stack frames."""
    faults: list[Fault] = []
    current: list[str] | None = None
    kind = ""
    start: float | None = None
    for raw in console.replace("\r", "").splitlines():
        ts = _TS_VALUE_RE.match(raw)
        line = raw[ts.end() :] if ts else raw
        if current is not None:
            header = _classify(line)
            if header in _NEW_REPORT_KINDS:
                # a report that never printed its end marker: the next one starts here
                faults.append(_make_fault(kind, current, start))
                current = None
        if current is not None:
            if header == "panic":
                current.append(line)
                faults.append(_make_fault(kind, current, start))
                current = None
                continue
            current.append(line)
            if (_END_RE.search(line) and len(current) > 2) or len(current) >= _MAX_REPORT_LINES:
                faults.append(_make_fault(kind, current, start))
                current = None
            continue
        header = _classify(line)
        if header is not None:
            kind, current, start = header, [line], float(ts.group(1)) if ts else None
            if header == "panic":
                faults.append(_make_fault(kind, current, start))
                current = None
    if current is not None:
        faults.append(_make_fault(kind, current, start))
    # a panic that only closes an earlier report adds nothing of its own
    return [f for f in faults if f.kind != "panic" or len(faults) == 1]


def _make_fault(kind: str, lines: list[str], start: float | None) -> Fault:
    frames: list[str] = []
    in_trace = False
    for line in lines:
        m = _RIP_RE.search(line.strip())
        if m and not frames:
            frames.append(m.group(1))
        if "Call Trace:" in line:
            in_trace = True
            continue
        if in_trace:
            if _TRACE_END_RE.search(line):
                in_trace = False
                continue
            fm = _FRAME_RE.search(line)
            if fm and not fm.group(1) and fm.group(2) not in frames and not _REPORTING_FRAME_RE.search(fm.group(2)):
                frames.append(fm.group(2))
        if len(frames) >= 6:
            break
    return Fault(kind=kind, title=lines[0].strip(), text="\n".join(lines), frames=frames, time=start)
