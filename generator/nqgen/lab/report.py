"""Reports of a lab run, all rendered from the ``out/lab.json`` dict: terminal table, markdown, PNG chart.

Boots of one configuration (``--repeat``) are grouped: counts are summed, per-boot measurements are
shown as min..max with the mean, and the worst verdict wins.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"
Run = dict[str, Any]
VERDICT_ORDER = ("fault", "incomplete", "refused", "loss", "unload-failed", "problem", "ok")


def _d(run: Run) -> dict[str, Any]:
    derived: dict[str, Any] = run.get("derived") or {}
    return derived


def groups(lab: dict[str, Any]) -> list[tuple[str, list[Run]]]:
    """Runs grouped by configuration name, in the order they ran."""
    out: dict[str, list[Run]] = {}
    for run in lab.get("runs", []):
        out.setdefault(str(run["name"]), []).append(run)
    return list(out.items())


def _spread(values: list[int]) -> str:
    if not values:
        return UNKNOWN
    if len(values) == 1:
        return str(values[0])
    mean = sum(values) / len(values)
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}..{hi} (mean {mean:.1f})"


def _ct_values(runs: list[Run], key: str) -> list[int] | None:
    values = []
    for run in runs:
        ct = _d(run).get("workload_ct")
        if ct is None:
            return None
        values.append(int(ct.get(key, 0)))
    return values


def _ct(runs: list[Run], key: str) -> str:
    values = _ct_values(runs, key)
    return UNKNOWN if values is None else _spread(values)


def flows(lab: dict[str, Any], runs: list[Run]) -> int:
    per_boot = int(lab.get("workload", {}).get("flows") or 0)
    return per_boot * len([r for r in runs if r.get("completed") or _d(r).get("sent")])


def per_10k(count: int, nflows: int) -> str:
    return "-" if nflows == 0 else f"{count * 10000 / nflows:.1f}"


def _loaded(runs: list[Run]) -> str:
    first = runs[0]
    if first.get("kind") == "baseline":
        return "nfqueue" if first.get("nfqueue") else "-"
    refused = [r for r in runs if not _d(r).get("loaded")]
    if not refused:
        return "yes"
    reason = _d(refused[0]).get("refusal") or "not loaded"
    prefix = "" if len(runs) == 1 else f"{len(refused)}/{len(runs)} "
    return f"{prefix}refused: {reason}"


def _calls(runs: list[Run]) -> str:
    first = runs[0]
    if first.get("kind") == "baseline":
        return "-"
    if first.get("corrected_counter") is None:
        totals: dict[str, int] = {}
        for run in runs:
            for k, v in (_d(run).get("counter_deltas") or {}).items():
                if v:
                    totals[k] = totals.get(k, 0) + int(v)
        return ", ".join(f"{k} {v}" for k, v in totals.items()) or "n/a"
    values = [_d(r).get("corrected_calls") for r in runs]
    known = [int(v) for v in values if v is not None]
    return UNKNOWN if not known else _spread(known)


def _delivered(runs: list[Run]) -> str:
    sent = sum(int(_d(r).get("sent") or 0) for r in runs)
    received = sum(int(_d(r).get("received") or 0) for r in runs)
    return f"{received}/{sent}"


def _faults(runs: list[Run]) -> str:
    counts = [int(_d(r).get("fault_count") or 0) for r in runs]
    total = sum(counts)
    if total == 0:
        taints = sorted({t for r in runs for t in _d(r).get("taint_faults") or []})
        return ", ".join(taints) or "none"
    first = next(f for r in runs for f in r.get("faults") or [] if _counts(f))
    where = "" if len(runs) == 1 else f" in {sum(1 for c in counts if c)}/{len(runs)} boots"
    return f"{total}{where}: {first.get('title', '')}"


def _counts(fault: dict[str, Any]) -> bool:
    """Reports the kernel printed before init (its own, not the module's) are not counted."""
    return fault.get("phase") != "boot"


def _unload(runs: list[Run]) -> str:
    first = runs[0]
    if first.get("kind") == "baseline":
        return "-"
    bad = [r for r in runs if not _d(r).get("unloaded")]
    if not bad:
        u = first["unload"]
        if u["method"] == "livepatch":
            waited = max(int(r["unload"]["waited_ms"]) for r in runs)
            # protection counts from the end of the enable transition, not from insmod
            enabling = max(int((r.get("livepatch") or {}).get("waited_ms", 0)) for r in runs)
            return f"ok (livepatch: protected {enabling} ms after insmod, disabled in {waited} ms)"
        return f"ok ({u['method']})"
    u = bad[0].get("unload")
    what = "not reached" if u is None else f"failed ({u['method']})"
    return what if len(runs) == 1 else f"{len(bad)}/{len(runs)} {what}"


def _healthy(runs: list[Run]) -> str:
    states = [_d(r).get("healthy") for r in runs]
    if any(s is False for s in states):
        return "NO"
    if any(s is None for s in states):
        return "not reached"
    sent = sum(int(_d(r).get("health_sent") or 0) for r in runs)
    received = sum(int(_d(r).get("health_received") or 0) for r in runs)
    return f"yes ({received}/{sent})"


def _verdict(runs: list[Run]) -> str:
    verdicts = [str(_d(r).get("verdict", "problem")) for r in runs]
    worst = min(verdicts, key=lambda v: VERDICT_ORDER.index(v) if v in VERDICT_ORDER else 0)
    if len(runs) > 1 and worst != "ok":
        return f"{worst} ({sum(1 for v in verdicts if v != 'ok')}/{len(runs)})"
    return worst


Cell = Callable[[list[Run]], str]
ROW_COLUMNS: tuple[tuple[str, Cell], ...] = (
    ("loaded", _loaded),
    ("corrected confirms", _calls),
    ("delivered", _delivered),
    ("clashres", lambda rs: _ct(rs, "clashres")),
    ("insert_failed", lambda rs: _ct(rs, "insert_failed")),
    ("drop", lambda rs: _ct(rs, "drop")),
    ("faults", _faults),
    ("unload", _unload),
    ("traffic after", _healthy),
    ("verdict", _verdict),
)


def _label(name: str, runs: list[Run]) -> str:
    return name if len(runs) == 1 else f"{name} x{len(runs)}"


def rows(lab: dict[str, Any]) -> list[list[str]]:
    """One row per configuration: its name then every ROW_COLUMNS cell."""
    return [[_label(name, runs)] + [fn(runs) for _, fn in ROW_COLUMNS] for name, runs in groups(lab)]


def terminal_table(lab: dict[str, Any], width: int = 48) -> str:
    header = ["run"] + [name for name, _ in ROW_COLUMNS]
    body = [[c if len(c) <= width else c[: width - 1] + "…" for c in row] for row in rows(lab)]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in body]
    return "\n".join(out)


def _rates(lab: dict[str, Any], runs: list[Run]) -> tuple[str, str]:
    nflows = flows(lab, runs)
    clashes = _ct_values(runs, "clashres")
    reports = sum(int(_d(r).get("fault_count") or 0) for r in runs)
    return (UNKNOWN if clashes is None else per_10k(sum(clashes), nflows), per_10k(reports, nflows))


def measured_columns(lab: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Strategy (or baseline name) -> measured column -> cell, for COMPARISON.md/json."""
    out: dict[str, dict[str, str]] = {}
    for name, runs in groups(lab):
        clash_rate, report_rate = _rates(lab, runs)
        out[name] = {
            "lab: boots": str(len(runs)),
            "lab: loaded": _loaded(runs),
            "lab: corrected confirms": _calls(runs),
            "lab: delivered": _delivered(runs),
            "lab: clashes per 10k flows": clash_rate,
            "lab: kernel reports": _faults(runs),
            "lab: reports per 10k flows": report_rate,
            "lab: unload": _unload(runs),
            "lab: verdict": _verdict(runs),
        }
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def measured_markdown(lab: dict[str, Any]) -> str:
    """A markdown section: how the lab ran, the measured table, and the first lines of the first faults."""
    k, w, m, vm = lab.get("kernel", {}), lab.get("workload", {}), lab.get("machine", {}), lab.get("vm", {})
    lines = ["## Measured in the lab", ""]
    lines.append(
        f"Kernel `{k.get('release')}` ({k.get('image')}, booted as {k.get('boot_mode')}), qemu TCG, "
        f"{vm.get('smp')} vCPUs, {vm.get('memory')} RAM; {lab.get('date')}; host {m.get('cpu')} "
        f"({m.get('cores')} cores), {m.get('qemu')}."
    )
    lines.append("")
    fams = w.get("families", [])
    lines.append(
        f"Workload per boot: {w.get('rounds')} flows per family ({', '.join(fams)}), each started by "
        f"{w.get('threads')} threads sending its first datagram from one socket at once ({w.get('datagrams')} "
        f"datagrams); a ctnetlink event listener is subscribed; NFQUEUE consumers accept after "
        f"{w.get('queue_delay_us')} us. After the unload, {w.get('health_rounds')} more flows per family check "
        f"that traffic still flows. Boots per configuration: {lab.get('repeat', 1)}."
    )
    lines.append("")
    header = ["run", *[name for name, _ in ROW_COLUMNS], "clashes /10k flows", "reports /10k flows"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for (_, runs), row in zip(groups(lab), rows(lab), strict=True):
        row = [*row, *_rates(lab, runs)]
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    lines.append("")
    for name, runs in groups(lab):
        faults = [f for r in runs for f in r.get("faults") or [] if _counts(f)]
        if not faults:
            continue
        titles: dict[str, int] = {}
        for f in faults:
            titles[f["title"]] = titles.get(f["title"], 0) + 1
        lines.append(f"**{name}**: {len(faults)} kernel report(s): " + "; ".join(
            f"`{t}` x{n}" for t, n in sorted(titles.items(), key=lambda kv: -kv[1])[:3]
        ))
        phases: dict[str, int] = {}
        for f in faults:
            phases[f.get("phase", "run")] = phases.get(f.get("phase", "run"), 0) + 1
        lines.append("")
        lines.append("when: " + ", ".join(f"{p} {n}" for p, n in phases.items()))
        first = faults[0]
        if first.get("frames"):
            lines.append("")
            lines.append("top frames of the first: " + ", ".join(f"`{f}`" for f in first["frames"]))
        if first.get("text"):
            lines.append("")
            lines.append("```")
            lines += first["text"].splitlines()[:30]
            lines.append("```")
        lines.append("")
    if lab.get("failed"):
        lines.append("Failed: " + ", ".join(lab["failed"]) + ".")
    else:
        lines.append("Every mitigation loaded, delivered every datagram, raised no kernel report and unloaded.")
    lines.append("")
    return "\n".join(lines)


def write_chart(lab: dict[str, Any], path: Path) -> None:
    """PNG: delivered datagrams, clash resolutions and kernel reports per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    grouped = groups(lab)
    names = [_label(name, runs) for name, runs in grouped]
    sent = [sum(int(_d(r).get("sent") or 0) for r in runs) for _, runs in grouped]
    received = [sum(int(_d(r).get("received") or 0) for r in runs) for _, runs in grouped]
    clashes = [sum(_ct_values(runs, "clashres") or [0]) for _, runs in grouped]
    faults = [sum(int(_d(r).get("fault_count") or 0) for r in runs) for _, runs in grouped]
    x = list(range(len(grouped)))
    fig, axes = plt.subplots(1, 3, figsize=(max(10.0, 2.4 * len(grouped)), 4.4))
    ax = axes[0]
    ax.bar([i - 0.2 for i in x], sent, width=0.4, label="sent", color="#9ab")
    bars = ax.bar([i + 0.2 for i in x], received, width=0.4, label="received", color="#2a6")
    ax.bar_label(bars, fontsize=7)
    ax.set_title("datagrams")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_ylim(0, max([1, *sent]) * 1.15)
    axes[1].bar_label(axes[1].bar(x, clashes, color="#c83"), fontsize=7)
    axes[1].set_title("clash resolutions")
    axes[1].set_ylim(0, max([1, *clashes]) * 1.15)
    axes[2].bar_label(axes[2].bar(x, faults, color="#c22"), fontsize=7)
    axes[2].set_title("kernel reports")
    axes[2].set_ylim(0, max([1, *faults]) * 1.15)
    for a in axes:
        a.set_xticks(x)
        a.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
    k = lab.get("kernel", {})
    fig.suptitle(f"nqgen lab on {k.get('release')} ({lab.get('date', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
