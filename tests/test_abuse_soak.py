"""The soak's attribution of kernel reports (issue 12 part 1), offline: which reports are the reference kernel's own
use-after-free while no mitigation was in force (expected there), which came while it was in force (a failure),
and which are anything else (a failure). The console is the shape the reference kernel prints (KASAN report
header, stack, end marker) around the guest's /dev/kmsg markers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from nqgen.lab.qemu import QemuOutcome, Tail, run_watched
from nqgen.lab.soak import MARK_OFF, MARK_ON, SoakResult, in_force_windows, parse_boot, write_report
from nqgen.lab.soakwatch import SoakWatch

RULE = "=" * 66


def _kasan(t: float, where: str) -> list[str]:
    return [
        f"[{t:12.6f}] {RULE}",
        f"[{t:12.6f}] BUG: KASAN: use-after-free in {where}",
        f"[{t:12.6f}] Read of size 1 at addr ffff88800a1b2c3d by task nq_udprace/91",
        f"[{t:12.6f}] Call Trace:",
        f"[{t:12.6f}]  <TASK>",
        f"[{t:12.6f}]  nf_hook_slow+0x62/0x100",
        f"[{t:12.6f}]  </TASK>",
        f"[{t:12.6f}] {RULE}",
    ]


def _console() -> str:
    lines = [
        "[   10.000000] Run /init as init process",
        *_kasan(11.0, "nf_confirm+0x406/0x430 [nf_conntrack]"),  # before cycle 1: unmitigated
        f"[   12.000000] {MARK_ON} 1",
        *_kasan(12.5, "nf_confirm+0x406/0x430 [nf_conntrack]"),  # in force: a failure
        f"[   13.000000] {MARK_OFF} 1",
        *_kasan(13.5, "ipv6_confirm+0x12/0x300 [nf_conntrack]"),  # between cycles: unmitigated
        f"[   14.000000] {MARK_ON} 2",
        "[   14.100000] ------------[ cut here ]------------",
        "[   14.100000] WARNING: CPU: 1 PID: 77 at net/netfilter/core.c:123 nf_hook_entry_head+0x1/0x2",
        "[   14.100000] ---[ end trace 0000000000000000 ]---",
        f"[   15.000000] {MARK_OFF} 2",
        *_kasan(16.0, "nq_confirm+0x10/0x200 [nq_ftrace]"),  # ours, not the kernel's confirm: other
    ]
    return "\n".join(lines) + "\n"


def _cycle(c: int, s: float, e: float) -> str:
    return (f'{{"type":"cycle","c":{c},"start":{s},"unload":{e - 0.2},"end":{e},"load_rc":0,"lp_enable_ms":0,'
            f'"disable_rc":0,"lp_gone_ms":0,"rmmod_rc":0,"err_b64":""}}')  # fmt: skip


def test_markers_give_the_in_force_windows() -> None:
    assert in_force_windows(_console()) == [(12.0, 13.0), (14.0, 15.0)]


def test_reports_are_attributed_to_the_windows() -> None:
    results = "\n".join([_cycle(1, 11.9, 13.2), _cycle(2, 13.9, 15.2), '{"type":"done"}']) + "\n"
    rec = parse_boot(QemuOutcome(exit_code=0, timed_out=False, console=_console(), results=results, seconds=9.0,
                                 command=()))  # fmt: skip
    r = SoakResult.of("nq_ftrace", 2, rec)
    assert (r.known_bug_unmitigated, r.known_bug_in_force, r.in_force_windows) == (2, 1, 2)
    assert len(r.other_reports) == 2 and any("WARNING" in o for o in r.other_reports)
    assert any("nq_confirm" in o for o in r.other_reports)
    assert any("use-after-free reports while the mitigation was in force" in p for p in r.problems)
    assert any(p.startswith("2 kernel reports") for p in r.problems)
    tolerated = SoakResult.of("nq_advance_confirm", 2, rec, tolerate_known_bug_in_force=True)
    assert not any("in force" in p for p in tolerated.problems)  # advance-confirm only narrows the window
    assert tolerated.known_bug_in_force == 1


# --- streaming: the host sees each cycle while the guest runs ------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_watch_streams_each_cycle_with_the_reports_and_the_step(tmp_path: Path) -> None:
    clock = _Clock()
    log = tmp_path / "soak-nq_livepatch.cycles.jsonl"
    w = SoakWatch(log, "nq_livepatch", 200, out=None, clock=clock)
    assert w(_cycle(1, 11.9, 13.2) + "\n", f"[   11.800000] nqsoak: cycle 1 load\n[   12.0] {MARK_ON} 1\n") is None
    clock.t += 5
    # the guest's second cycle hangs in its disable: the console says where, the cycle log says how far it got
    console = (f"[   13.900000] nqsoak: cycle 2 load\n[   14.000000] {MARK_ON} 2\n[   14.200000] {MARK_OFF} 2\n"
               "[   14.300000] nqsoak: cycle 2 disable\n"
               "[   40.000000] watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [nq_udprace:19084]\n"
               "[   40.000100] RIP: 0010:nf_confirm+0x0/0x120 [nf_conntrack]\n")  # fmt: skip
    assert w("", console) is None
    clock.t += 179
    assert w("", "[   60.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n") is None
    clock.t += 2
    reason = w("", "")
    assert reason is not None and "after a hang report" in reason
    recs = _jsonl(log)
    assert [r["type"] for r in recs] == ["start", "cycle", "report", "report", "stopped"]
    assert recs[1]["c"] == 1 and recs[1]["host_s"] == 0.0
    assert recs[2]["kind"] == "hang" and recs[2]["after_cycle"] == 1 and recs[2]["in_cycle"] == 2
    assert recs[2]["step"] == "nqsoak: cycle 2 disable"
    assert recs[4]["after_cycle"] == 1 and recs[4]["step"] == "nqsoak: cycle 2 disable"
    assert "after cycle 1/200, last step: nqsoak: cycle 2 disable" in w.stopped


def test_the_watch_stops_a_guest_that_reports_no_cycle(tmp_path: Path) -> None:
    clock = _Clock()
    w = SoakWatch(tmp_path / "c.jsonl", "nq_ftrace", 5, stall_s=900, out=None, clock=clock)
    clock.t += 899
    assert w(_cycle(1, 1.0, 2.0) + "\n", "") is None  # progress resets the stall clock
    clock.t += 899
    assert w("", "") is None
    clock.t += 2
    assert w("", "") == "no cycle for 901 s"


def test_a_watched_boot_sees_lines_while_the_process_runs(tmp_path: Path) -> None:
    """The real polling loop against a real process that writes its result port line by line (qemu's serial
    file): the watcher sees the first line long before the process would end, and stops it."""
    results, console = tmp_path / "results.jsonl", tmp_path / "console.log"
    script = f"echo one > {results}; echo '[ 1.0] nqsoak: cycle 1 load' > {console}; sleep 30; echo two >> {results}"
    seen: list[str] = []

    def watch(res: str, con: str) -> str | None:
        seen.extend(res.splitlines() + con.splitlines())
        return "enough" if "one" in seen else None

    proc = subprocess.Popen(["sh", "-c", script])
    timed_out, reason = run_watched(proc, 60.0, watch, console, results, poll=0.1)
    assert (timed_out, reason) == (False, "enough") and proc.returncode is not None
    assert seen[:2] == ["one", "[ 1.0] nqsoak: cycle 1 load"] and "two" not in seen


def test_partial_lines_wait_for_their_end(tmp_path: Path) -> None:
    f = tmp_path / "r"
    f.write_text('{"type":"cy')
    t = Tail(f)
    assert t.read() == ""
    with f.open("a") as out:
        out.write('cle"}\n{"x"')
    assert t.read() == '{"type":"cycle"}\n'


def test_runs_of_one_strategy_add_up_in_the_report(tmp_path: Path) -> None:
    """``--strategy X`` runs one at a time into the same tree: the report keeps the strategies an earlier run left
    and replaces the one re-run."""
    first = SoakResult("nq_ftrace", 200, cycles=200, completed=True, host={"started": "2026-12-01 20:05:00 UTC"})
    write_report(tmp_path, "6.1.0-57-amd64", 200, [first])
    lp = SoakResult("nq_livepatch", 200, cycles=57, stopped="no cycle for 901 s")
    write_report(tmp_path, "6.1.0-57-amd64", 200, [lp])
    lp2 = SoakResult("nq_livepatch", 200, cycles=200, completed=True)
    md = write_report(tmp_path, "6.1.0-57-amd64", 200, [lp2])
    data = json.loads((tmp_path / "soak-6.1.0-57-amd64.json").read_text())
    assert [(d["module"], d["cycles"]) for d in data["strategies"]] == [("nq_ftrace", 200), ("nq_livepatch", 200)]
    assert data["strategies"][0]["host"]["started"].startswith("2026-12-01 20:05")
    assert "| nq_livepatch | 200/200 |" in md and "| nq_ftrace | 200/200 |" in md
    assert (tmp_path / "SOAK-6.1.0-57-amd64.md").read_text() == md
