"""Watch a soak boot while it runs (issue 12): every cycle record the guest streams goes to a JSONL file at once,
with the kernel reports and the step the guest was in, so a long run is never a black box; a guest that stops
making progress (no cycle for a long time, or none after a soft lockup, RCU stall or hung task) is stopped
instead of running into the boot's time limit."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from .results import report_kind

# the guest's per-step console markers ("nqsoak: cycle 12 load", "nqsoak: mitigation in force, cycle 12", ...)
_STEP_RE = re.compile(r"^\[\s*(\d+\.\d+)\].*?(nqsoak: (?:mitigation (?:in force|going), )?cycle (\d+).*)$")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class SoakWatch:
    """A ``qemu.boot`` watcher for one soak boot; writes ``path`` (JSONL) as the guest goes."""

    path: Path
    module: str
    cycles: int
    stall_s: float = 900.0  # no new cycle record for this long: stop the guest
    hang_grace_s: float = 180.0  # after a hang report (soft lockup, RCU stall, hung task), no new cycle this long
    every: int = 10  # a progress line on ``out`` every this many cycles (and for every failed step or report)
    out: TextIO | None = field(default_factory=lambda: sys.stderr)
    clock: Callable[[], float] = time.monotonic
    started: float = 0.0
    last_progress: float = 0.0
    last_cycle: int = 0
    step: str = ""  # the last step marker on the console
    step_time: float | None = None  # its kernel time
    step_cycle: int = 0  # the cycle it belongs to
    reports: int = 0
    hang_at: float | None = None  # host time of the first hang report since the last cycle
    stopped: str = ""

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.started = self.last_progress = self.clock()
        self._write({"type": "start", "module": self.module, "cycles": self.cycles, "host_time": _now()})

    def _write(self, rec: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec, sort_keys=False) + "\n")

    def _say(self, text: str) -> None:
        if self.out is not None:
            print(f"soak {self.module}: {text}", file=self.out, flush=True)

    def _elapsed(self) -> float:
        return round(self.clock() - self.started, 1)

    def __call__(self, results: str, console: str) -> str | None:
        now = self.clock()
        for line in console.replace("\r", "").splitlines():
            m = _STEP_RE.match(line)
            if m is not None:
                self.step, self.step_time, self.step_cycle = m.group(2), float(m.group(1)), int(m.group(3))
                continue
            kind = report_kind(line)
            if kind is None or (kind == "panic" and self.reports):
                continue
            self.reports += 1
            if kind == "hang" and self.hang_at is None:
                self.hang_at = now
            # in_cycle: the cycle of the last step marker before it (the guest's console is ahead of its records)
            rec = {"type": "report", "kind": kind, "line": line.strip()[:300], "in_cycle": self.step_cycle,
                   "after_cycle": self.last_cycle, "step": self.step, "step_time": self.step_time,
                   "host_s": self._elapsed()}  # fmt: skip
            self._write(rec)
            self._say(f"{kind} report in cycle {self.step_cycle} (step: {self.step or '-'}): {line.strip()[:160]}")
        for line in results.splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("type") != "cycle":
                continue
            self.last_cycle = int(rec.get("c", self.last_cycle))
            self.last_progress, self.hang_at = now, None
            self._write({**rec, "host_s": self._elapsed()})
            failed = any(rec.get(k) not in (0, None) for k in ("load_rc", "disable_rc", "rmmod_rc"))
            if failed or self.last_cycle % self.every == 0 or self.last_cycle in (1, self.cycles):
                self._say(f"cycle {self.last_cycle}/{self.cycles} at {self._elapsed()} s"
                          + (f" (load {rec.get('load_rc')}, disable {rec.get('disable_rc')}, rmmod "
                             f"{rec.get('rmmod_rc')})" if failed else ""))  # fmt: skip
        reason = None
        if self.hang_at is not None and now - self.hang_at >= self.hang_grace_s:
            reason = f"no cycle for {now - self.hang_at:.0f} s after a hang report"
        elif now - self.last_progress >= self.stall_s:
            reason = f"no cycle for {now - self.last_progress:.0f} s"
        if reason is not None:
            self.stopped = f"{reason}; after cycle {self.last_cycle}/{self.cycles}, last step: {self.step or '-'}"
            self._write({"type": "stopped", "reason": reason, "after_cycle": self.last_cycle, "step": self.step,
                         "step_time": self.step_time, "host_s": self._elapsed(), "host_time": _now()})  # fmt: skip
            self._say(f"stopping the guest: {self.stopped}")
        return reason

    def end(self, summary: dict[str, Any]) -> None:
        self._write({"type": "end", "host_s": self._elapsed(), "host_time": _now(), **summary})
