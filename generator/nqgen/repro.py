"""``make repro``: the crash on the vulnerable reference kernel, and which strategy stops it.

Builds (or takes from the cache) the reference kernel, generates every strategy against its own
nf_conntrack.ko and build tree, builds them, runs the lab on that kernel with and without NFQUEUE in the path,
several boots per configuration, and judges the result: the baseline must reproduce the KASAN report, the
strategies that replace the confirm must show none. ``advance-confirm`` is measured, not judged: it still runs
the unfixed confirm and the comparison says how often it faults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from . import reprokernel
from .errors import BuildError, LabError, NqgenError
from .generate import generate
from .probe import build_profile, default_inputs

# The strategies that must stop the crash: the four that replace the confirm, and hold-ref (keeps the loser alive).
REPLACING = ("ftrace", "hook-swap", "stop-hook", "livepatch", "hold-ref")
REPRO_MD = "REPRO.md"


@dataclass
class ConfigSummary:
    """One configuration (a baseline or a strategy, with or without NFQUEUE) over its repeated boots."""

    name: str
    strategy: str | None
    nfqueue: bool
    boots: int = 0
    boots_with_reports: int = 0
    reports: int = 0
    per_boot_reports: list[int] = field(default_factory=list)
    flows: int = 0
    clashres: list[int] = field(default_factory=list)
    corrected: list[int] = field(default_factory=list)
    lost: int = 0
    unload_failures: int = 0
    first_report: str = ""
    first_frames: list[str] = field(default_factory=list)

    @property
    def reports_per_10k(self) -> float:
        return 10000.0 * self.reports / self.flows if self.flows else math.nan

    def _per_10k(self, counts: list[int]) -> tuple[float, float]:
        """Mean and sample standard deviation over boots of ``counts`` per 10 000 flows."""
        if not counts or not self.flows:
            return (math.nan, math.nan)
        per_boot_flows = self.flows / self.boots
        rates = [10000.0 * c / per_boot_flows for c in counts]
        sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
        return (statistics.fmean(rates), sd)

    def clashes_per_10k(self) -> tuple[float, float]:
        return self._per_10k(self.clashres)

    def reports_per_10k_spread(self) -> tuple[float, float]:
        return self._per_10k(self.per_boot_reports)


def summarize(lab: dict[str, Any]) -> list[ConfigSummary]:
    flows_per_boot = int(lab["workload"]["flows"])
    out: dict[str, ConfigSummary] = {}
    for run in lab["runs"]:
        s = out.setdefault(run["name"], ConfigSummary(run["name"], run.get("strategy"), bool(run["nfqueue"])))
        d = run["derived"]
        s.boots += 1
        s.flows += flows_per_boot
        kasan = [f for f in run["faults"] if f["kind"] in ("KASAN", "BUG", "Oops", "WARNING", "panic")]
        s.reports += len(kasan)
        s.per_boot_reports.append(len(kasan))
        if kasan:
            s.boots_with_reports += 1
            if not s.first_report:
                s.first_report = kasan[0]["title"]
                s.first_frames = list(kasan[0].get("frames", []))[:5]
        ct = d.get("workload_ct") or {}
        if "clashres" in ct:
            s.clashres.append(int(ct["clashres"]))
        if d.get("corrected_calls") is not None:
            s.corrected.append(int(d["corrected_calls"]))
        s.lost += int(d.get("lost") or 0)
        if run["kind"] == "mitigation" and d.get("unloaded") is False:
            s.unload_failures += 1
    return list(out.values())


def judge(summaries: list[ConfigSummary]) -> list[str]:
    """What contradicts the expected result; empty when the comparison shows what it exists for."""
    problems = []
    baseline = [s for s in summaries if s.strategy is None and not s.nfqueue]
    if not baseline or not any(s.reports for s in baseline):
        problems.append("the baseline did not reproduce the use-after-free report: the kernel may not be vulnerable")
    for s in summaries:
        if s.strategy in REPLACING:
            if s.reports:
                problems.append(f"{s.name}: {s.reports} kernel report(s), first: {s.first_report}")
            if s.unload_failures:
                problems.append(f"{s.name}: failed to unload in {s.unload_failures} boot(s)")
        if s.strategy in REPLACING and not any(s.corrected):
            problems.append(f"{s.name}: the corrected confirm never ran")
    return problems


def _fmt(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _machine(lab: dict[str, Any]) -> str:
    m = lab.get("machine", {})
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('qemu', 'qemu')}"


def markdown(summaries: list[ConfigSummary], lab: dict[str, Any], problems: list[str]) -> str:
    w = lab["workload"]
    k = lab["kernel"]
    lines = [
        "## Reproduction on the vulnerable reference kernel",
        "",
        f"Kernel `{k['release']}` (Debian linux-source-6.1 with the re-fetch fix reverted, KASAN), qemu TCG,"
        f" {lab['vm'].get('smp', 2)} vCPUs, {lab['vm'].get('memory', '?')}; {lab['date']}; host: {_machine(lab)}.",
        f"Workload per boot: {w['rounds']} flows per family ({', '.join(w['families'])}), {w['threads']} racing"
        f" senders each, ctnetlink listener subscribed; NFQUEUE consumers hold packets {w['queue_delay_us']} us."
        f" Boots per configuration: {lab['repeat']}.",
        "",
        "| configuration | NFQUEUE | boots | boots with a report | reports per 10k flows (mean ± sd) |"
        " clashes per 10k flows (mean ± sd) | corrected confirms | lost | first report |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        mean, sd = s.clashes_per_10k()
        rmean, rsd = s.reports_per_10k_spread()
        corrected = "-" if not s.corrected else f"{statistics.fmean(s.corrected):.0f}/boot"
        lines.append(
            f"| {s.strategy or 'no mitigation'} | {'yes' if s.nfqueue else 'no'} | {s.boots} | {s.boots_with_reports}"
            f" | {_fmt(rmean)} ± {_fmt(rsd)} | {_fmt(mean)} ± {_fmt(sd)} | {corrected} | {s.lost}"
            f" | {s.first_report.replace('|', '/') or 'none'} |"
        )
    lines.append("")
    for s in summaries:
        if s.first_frames:
            lines.append(f"- {s.name}: `{s.first_report}`; top frames: {', '.join(s.first_frames)}")
    lines.append("")
    if problems:
        lines.append("**Unexpected:** " + "; ".join(problems))
    else:
        lines.append(
            "The baseline reproduces the use-after-free; every strategy that replaces the confirm or holds the loser ("
            + ", ".join(REPLACING)
            + ") shows none over the same workload."
        )
    return "\n".join(lines) + "\n"


def run(
    out: Path,
    repeat: int,
    rounds: int,
    jobs: int,
    strategies: tuple[str, ...] = (),
    nfqueue_variants: bool = True,
    lab_args: tuple[str, ...] = (),
) -> list[str]:
    rk = reprokernel.ensure_built(jobs=jobs)
    modules = sorted((rk.modules_dir / "kernel/net/netfilter").glob("nf_conntrack.ko*"))
    if not modules:
        raise BuildError(f"{rk.modules_dir} has no nf_conntrack.ko: the reference kernel build is incomplete")
    system_map = rk.kdir / "System.map"
    inputs = dataclasses.replace(
        default_inputs(kdir=rk.kdir),
        modules=modules,
        system_map=system_map if system_map.is_file() else None,
        config=rk.kdir / ".config",
    )
    profile = build_profile(inputs)
    if profile.features.fix_present:
        raise BuildError(f"the reference kernel {profile.release} carries the fix: the revert patch did not apply")
    generate(profile, "all", out, str(rk.kdir), argv=("repro",), say=click.echo)
    nqgen = [sys.executable, "-m", "nqgen"]
    make = subprocess.run(["make", "-C", str(out), f"-j{jobs}", "NQGEN=" + " ".join(nqgen)], check=False)
    if make.returncode != 0:
        raise BuildError(f"make -C {out} failed for the reference kernel")
    lab_cmd = [
        *nqgen, "lab", "--out", str(out), "--kernel", str(rk.vmlinux), "--modules-dir", str(rk.modules_dir),
        "--kdir", str(rk.kdir), "--memory", "1G", "--repeat", str(repeat), "--rounds", str(rounds),
        *(["--nfqueue-variants"] if nfqueue_variants else []),
        *(a for name in strategies for a in ("--strategy", name)),
        *lab_args,
    ]
    click.echo("repro: " + " ".join(lab_cmd))
    lab_rc = subprocess.run(lab_cmd, check=False).returncode
    lab_path = out / "lab.json"
    if not lab_path.is_file():
        raise LabError(f"the lab wrote no {lab_path} (exit {lab_rc})")
    lab = json.loads(lab_path.read_text())
    summaries = summarize(lab)
    problems = judge(summaries)
    text = markdown(summaries, lab, problems)
    (out / REPRO_MD).write_text(text)
    click.echo(text)
    return problems


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("out-repro"), show_default=True)
@click.option("--repeat", type=click.IntRange(1, 50), default=3, show_default=True, help="Boots per configuration.")
@click.option("--rounds", type=click.IntRange(1, 40000), default=500, show_default=True, help="Flows per family.")
@click.option("--jobs", type=click.IntRange(1, 64), default=2, show_default=True, help="make -j for the kernel.")
@click.option("--strategy", "strategies", multiple=True, help="Measure only these strategies (repeatable).")
@click.option("--nfqueue-variants/--no-nfqueue-variants", default=True, show_default=True)
@click.argument("lab_args", nargs=-1)
def main(
    out: Path,
    repeat: int,
    rounds: int,
    jobs: int,
    strategies: tuple[str, ...],
    nfqueue_variants: bool,
    lab_args: tuple[str, ...],
) -> None:
    """Build the reference kernel if needed and run the whole crash comparison on it."""
    try:
        problems = run(out, repeat, rounds, jobs, strategies, nfqueue_variants, lab_args)
    except NqgenError as exc:
        click.echo(f"nqgen repro: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    if problems:
        click.echo("nqgen repro: unexpected result: " + "; ".join(problems), err=True)
        sys.exit(LabError.exit_code)


if __name__ == "__main__":
    main()
