"""The crash comparison's table: per configuration over its boots, from a lab.json, and what it must show.

Evidence of the bug in a boot is either a kernel report (KASAN where the kernel has it and can see the
stale use; any Oops/BUG/panic) or a stale use counted by the lab's detector (``nqlab_detect``: an event
delivery to a conntrack entry whose refcount is 0), the two counted alike.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from .errors import InputError

# The strategies that must stop the crash: the four that replace the confirm, and hold-ref (keeps the loser alive).
REPLACING = ("ftrace", "hook-swap", "stop-hook", "livepatch", "hold-ref")
REPORT_KINDS = ("KASAN", "BUG", "Oops", "WARNING", "panic")


@dataclass
class ConfigSummary:
    """One configuration (a baseline or a strategy, with or without NFQUEUE) over its repeated boots."""

    name: str
    strategy: str | None
    nfqueue: bool
    boots: int = 0
    boots_with_reports: int = 0
    boots_with_evidence: int = 0  # a kernel report or a stale use
    reports: int = 0
    per_boot_reports: list[int] = field(default_factory=list)
    per_boot_stale: list[int] = field(default_factory=list)  # only boots where the detector ran
    stale_by_family: dict[str, int] = field(default_factory=dict)
    flows: int = 0
    clashres: list[int] = field(default_factory=list)  # the detector's clashes where it ran, else clashres
    clash_source: str = ""
    corrected: list[int] = field(default_factory=list)
    died: int = 0  # boots that never finished (panic, hang, timeout)
    panics: int = 0  # boots whose kernel panicked ("Kernel panic - not syncing")
    timeouts: int = 0  # boots the lab stopped at its time limit
    lost: int = 0
    sent: int = 0
    received: int = 0
    # livepatch boots whose enable transition had not finished when the lab's wait ended, and the longest wait
    transition_pending: int = 0
    transition_wait_ms: int = 0
    lab_flags: dict[str, int] = field(default_factory=dict)  # the lab's problems per run, counted over boots
    unload_failures: int = 0
    first_report: str = ""
    first_frames: list[str] = field(default_factory=list)

    @property
    def stale(self) -> int:
        return sum(self.per_boot_stale)

    @property
    def evidence(self) -> int:
        return self.reports + self.stale


def _flag_key(problem: str) -> str:
    """A lab problem without its per-boot figures, so the same problem of several boots counts as one kind."""
    return re.sub(r"\d+", "N", problem)


def summarize(lab: dict[str, Any]) -> list[ConfigSummary]:
    flows_per_boot = int(lab["workload"]["flows"])
    out: dict[str, ConfigSummary] = {}
    for run in lab["runs"]:
        s = out.setdefault(run["name"], ConfigSummary(run["name"], run.get("strategy"), bool(run["nfqueue"])))
        d = run["derived"]
        s.boots += 1
        s.flows += flows_per_boot
        reports = [f for f in run["faults"] if f["kind"] in REPORT_KINDS and f.get("phase") != "boot"]
        s.reports += len(reports)
        s.per_boot_reports.append(len(reports))
        # a boot that died before the detector's workload count left no count (not a count of 0)
        counted = run.get("completed") or any((run.get("detector") or {}).get(p) for p in ("workload", "end"))
        stale = d.get("stale_uses") if counted else None
        if stale is not None:
            s.per_boot_stale.append(int(stale))
            for fam, n in (d.get("stale_by_family") or {}).items():
                s.stale_by_family[fam] = s.stale_by_family.get(fam, 0) + int(n)
        if reports:
            s.boots_with_reports += 1
            if not s.first_report:
                s.first_report = reports[0]["title"]
                s.first_frames = list(reports[0].get("frames", []))[:5]
        if reports or stale:
            s.boots_with_evidence += 1
        if d.get("detector_clashes") is not None and counted:
            s.clashres.append(int(d["detector_clashes"]))
            s.clash_source = "detector"
        elif "clashres" in (d.get("workload_ct") or {}):
            s.clashres.append(int(d["workload_ct"]["clashres"]))
            s.clash_source = s.clash_source or "clashres"
        if d.get("corrected_calls") is not None:
            s.corrected.append(int(d["corrected_calls"]))
        if not run.get("completed"):
            s.died += 1
        if run.get("panic"):
            s.panics += 1
        if run.get("timed_out"):
            s.timeouts += 1
        s.lost += int(d.get("lost") or 0)
        s.sent += int(d.get("sent") or 0)
        s.received += int(d.get("received") or 0)
        lp = run.get("livepatch") or {}
        if lp and str(lp.get("transition")) != "0":
            s.transition_pending += 1
            s.transition_wait_ms = max(s.transition_wait_ms, int(lp.get("waited_ms") or 0))
        for problem in d.get("problems") or []:
            key = _flag_key(str(problem))
            s.lab_flags[key] = s.lab_flags.get(key, 0) + 1
        if run["kind"] == "mitigation" and d.get("unloaded") is False:
            s.unload_failures += 1
    return list(out.values())


def judge(summaries: list[ConfigSummary], need_baseline: bool = True) -> list[str]:
    """What contradicts the expected result; empty when the comparison shows what it exists for.

    ``need_baseline=False``: the run booted no baseline (a short form), so none is asked to show the bug.
    """
    problems = []
    baselines = [s for s in summaries if s.strategy is None]
    if need_baseline and not any(s.evidence for s in baselines):
        problems.append("no baseline showed the bug (no kernel report, no stale use): the kernel may not be vulnerable")
    for s in summaries:
        if s.strategy not in REPLACING:
            continue
        if s.reports:
            problems.append(f"{s.name}: {s.reports} kernel report(s), first: {s.first_report}")
        if s.stale:
            problems.append(f"{s.name}: {s.stale} stale use(s) of released conntrack entries")
        if s.unload_failures:
            problems.append(f"{s.name}: failed to unload in {s.unload_failures} boot(s)")
        if s.died:
            # a boot that never finished shows nothing either way: it must not pass as a clean one
            problems.append(f"{s.name}: {s.died} boot(s) did not finish ({s.panics} panic(s), {s.timeouts} timeout(s))")
        if not any(s.corrected):
            problems.append(f"{s.name}: the corrected confirm never ran")
        if not s.nfqueue and s.clashres and not any(s.clashres):
            # unqueued, the race must happen for "no stale use" to mean anything (queued, a kernel may resolve
            # every clash at reinject before the confirm: 4.18)
            problems.append(f"{s.name}: no clash in {len(s.clashres)} boot(s): the race was not exercised")
    return problems


def _machine(lab: dict[str, Any]) -> str:
    m = lab.get("machine", {})
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('qemu', 'qemu')}"


def _detector_line(lab: dict[str, Any]) -> str:
    guest = lab.get("guest") or {}
    if not guest:
        return ""
    if not guest.get("detector_used", True):
        return "The stale-use detector was not loaded (--no-detector)."
    if guest.get("detector"):
        return ("Stale uses: the lab's detector `nqlab_detect` (kretprobe on `__nf_conntrack_confirm`: a clash is"
                " NF_ACCEPT with the skb's entry switched; kprobe on `nf_ct_deliver_cached_events`: a call on an"
                " entry whose refcount is 0).")
    return f"No stale-use detector on this kernel: {guest.get('detector_reason')}."


def _per_boot(counts: list[int], boots: int) -> str:
    """``total (a/b/c)`` over the boots that gave the count, ``-`` when none did."""
    if not counts:
        return "-"
    text = str(sum(counts))
    if boots > 1 or len(counts) > 1:
        text += f" ({'/'.join(str(c) for c in counts)})"
    return text


def _did_not_finish(s: ConfigSummary) -> str:
    if not s.died:
        return "0"
    why = [f"{n} {what}" for n, what in ((s.panics, "panic"), (s.timeouts, "timeout")) if n]
    return f"{s.died} ({', '.join(why)})" if why else str(s.died)


def _shown(flag: str) -> bool:
    """Lab problems the table's columns already show."""
    return any(w in flag for w in ("stale use", "kernel report", "timed out", "guest did not finish",
                                   "livepatch not fully applied"))


def markdown(summaries: list[ConfigSummary], lab: dict[str, Any], problems: list[str], title: str) -> str:
    w = lab["workload"]
    k = lab["kernel"]
    lines = [
        f"## {title}",
        "",
        f"Kernel `{k['release']}`{' (KASAN)' if k.get('kasan') else ' (no KASAN)'}, qemu TCG,"
        f" {lab['vm'].get('smp', 2)} vCPUs, {lab['vm'].get('memory', '?')}; {lab['date']}; host: {_machine(lab)}.",
        f"Workload per boot: {w['rounds']} flows per family ({', '.join(w['families'])}), {w['threads']} racing"
        f" senders each, ctnetlink listener subscribed; NFQUEUE consumers hold packets {w['queue_delay_us']} us."
        f" Boots per configuration: {lab['repeat']}; {len(lab['runs'])} boots took"
        f" {sum(float(r.get('seconds') or 0) for r in lab['runs']) / 60:.1f} min of wall time in all.",
    ]
    if detector := _detector_line(lab):
        lines.append(detector)
    lines += [
        "",
        "| configuration | NFQUEUE | boots | boots with evidence | stale uses (detector) | kernel reports |"
        " clashes | corrected confirms | panics | did not finish | delivered | first report |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.strategy or 'no mitigation'} | {'yes' if s.nfqueue else 'no'} | {s.boots} | {s.boots_with_evidence}"
            f" | {_per_boot(s.per_boot_stale, s.boots)} | {_per_boot(s.per_boot_reports, s.boots)}"
            f" | {_per_boot(s.clashres, s.boots)} | {_per_boot(s.corrected, s.boots)} | {s.panics}"
            f" | {_did_not_finish(s)} | {s.received}/{s.sent} | {s.first_report.replace('|', '/') or 'none'} |"
        )
    lines += [
        "",
        "Cells with several boots give the total and, in parentheses, each boot's count; a count the lab could not"
        " read in a boot (it died first) is missing from its list. Evidence of the bug: a stale use or a kernel"
        " report. Corrected confirms: the module's own counter (`hold-ref`: references it held).",
    ]
    queued_clean = [s.name for s in summaries if s.nfqueue and s.clashres and not any(s.clashres) and not s.evidence]
    if queued_clean:
        lines.append(
            f"- {', '.join(queued_clean)}: no clash reached the confirm with every packet queued (a kernel that"
            " resolves queued clashes at reinject, like 4.18's `nf_conntrack_update`, swaps the queued packet's"
            " entry for the winner before the confirm): these rows show the module in the queued path (delivery,"
            " no stale use, unload), not a clash it resolved."
        )
    for s in summaries:
        if s.transition_pending:
            lines.append(
                f"- {s.name}: the livepatch enable transition was still in progress (`transition` 1) when the"
                f" lab's wait ended ({s.transition_wait_ms / 1000:.0f} s) in {s.transition_pending} of {s.boots}"
                " boot(s); its counts above were taken with the transition pending."
            )
        flags = [f"{k} ({n}/{s.boots})" for k, n in s.lab_flags.items() if not _shown(k)]
        if flags:
            lines.append(f"- {s.name}: the lab also flagged: " + "; ".join(flags))
    sources = {s.clash_source for s in summaries if s.clash_source}
    if sources:
        lines.append("- Clashes: " + ("the detector's count (the skb's entry switched)" if sources == {"detector"}
                                      else "the detector's count where it ran, else conntrack's clashres") + ".")
    for s in summaries:
        if s.stale:
            fams = ", ".join(f"{fam} {n}" for fam, n in s.stale_by_family.items())
            lines.append(f"- {s.name}: {s.stale} stale use(s) over {s.boots} boot(s) ({fams})")
        if s.first_frames:
            lines.append(f"- {s.name}: `{s.first_report}`; top frames: {', '.join(s.first_frames)}")
    lines.append("")
    if problems:
        lines.append("**Unexpected:** " + "; ".join(problems))
    else:
        shown = "The baseline shows the bug; every" if any(s.strategy is None for s in summaries) else (
            "No baseline was booted (a short form); every")
        lines.append(
            f"{shown} strategy that replaces the confirm ("
            + ", ".join(s for s in REPLACING if any(x.strategy == s for x in summaries))
            + ") shows no stale use and no report over the same workload."
        )
    return "\n".join(lines) + "\n"


def merge(labs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several lab.json of the same kernel and workload as one (their boots pooled per configuration), so boots
    added by a later run count with the earlier ones; ValueError when kernel or workload differ."""
    first = labs[0]
    for other in labs[1:]:
        for key in ("kernel", "workload"):
            if other[key] != first[key]:
                raise ValueError(f"cannot pool lab runs with different {key}: {first[key]} / {other[key]}")
    merged = dict(first)
    merged["runs"] = [run for lab in labs for run in lab["runs"]]
    merged["date"] = "; ".join(str(lab["date"]) for lab in labs)
    merged["repeat"] = "see the boots column" if len(labs) > 1 else first["repeat"]
    return merged


@click.command()
@click.option("--title", default="Crash comparison", show_default=True)
@click.argument("labs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def main(title: str, labs: tuple[Path, ...]) -> None:
    """Print the comparison table of one or more lab.json (boots of the same kernel and workload pooled)."""
    try:
        lab = merge([json.loads(p.read_text()) for p in labs])
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        click.echo(f"nqgen reprotable: error: {exc}", err=True)
        sys.exit(InputError.exit_code)
    summaries = summarize(lab)
    click.echo(markdown(summaries, lab, judge(summaries, need_baseline=any(s.strategy is None for s in summaries)),
                        title), nl=False)


if __name__ == "__main__":
    main()
