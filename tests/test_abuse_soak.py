"""The soak's attribution of kernel reports (issue 12 part 1), offline: which reports are the reference kernel's own
use-after-free while no mitigation was in force (expected there), which came while it was in force (a failure),
and which are anything else (a failure). The console is the shape the reference kernel prints (KASAN report
header, stack, end marker) around the guest's /dev/kmsg markers."""

from __future__ import annotations

from nqgen.lab.qemu import QemuOutcome
from nqgen.lab.soak import MARK_OFF, MARK_ON, SoakResult, in_force_windows, parse_boot

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
