"""Reports of a lab run, all rendered from the ``out/lab.json`` dict: terminal table, markdown, PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

UNKNOWN = "unknown"


def _d(run: dict[str, Any]) -> dict[str, Any]:
    derived: dict[str, Any] = run.get("derived") or {}
    return derived


def _ct(run: dict[str, Any], key: str) -> str:
    ct = _d(run).get("workload_ct")
    if ct is None:
        return UNKNOWN
    return str(ct.get(key, UNKNOWN))


def _loaded(run: dict[str, Any]) -> str:
    if run.get("kind") == "baseline":
        return "nfqueue" if run.get("nfqueue") else "-"
    loaded = _d(run).get("loaded")
    if loaded:
        return "yes"
    refusal = _d(run).get("refusal")
    return f"refused: {refusal}" if refusal else "no"


def _calls(run: dict[str, Any]) -> str:
    if run.get("kind") == "baseline":
        return "-"
    calls = _d(run).get("corrected_calls")
    if run.get("corrected_counter") is None:
        deltas = {k: v for k, v in (_d(run).get("counter_deltas") or {}).items() if v}
        return ", ".join(f"{k} {v}" for k, v in deltas.items()) or "n/a"
    return UNKNOWN if calls is None else str(calls)


def _delivered(run: dict[str, Any]) -> str:
    d = _d(run)
    return f"{d.get('received', 0)}/{d.get('sent', 0)}"


def _faults(run: dict[str, Any]) -> str:
    d = _d(run)
    count = int(d.get("fault_count") or 0)
    if count == 0:
        return ", ".join(d.get("taint_faults") or []) or "none"
    first = (run.get("faults") or [{}])[0]
    return f"{count}: {first.get('title', '')}"


def _unload(run: dict[str, Any]) -> str:
    if run.get("kind") == "baseline":
        return "-"
    u = run.get("unload")
    if u is None:
        return "not reached"
    if _d(run).get("unloaded"):
        return f"ok ({u['method']})" if u["method"] == "rmmod" else f"ok (livepatch, {u['waited_ms']} ms)"
    return f"failed ({u['method']})"


def _healthy(run: dict[str, Any]) -> str:
    h = _d(run).get("healthy")
    if h is None:
        return "not reached"
    return f"yes ({_d(run).get('health_received')}/{_d(run).get('health_sent')})" if h else "NO"


ROW_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("loaded", _loaded),
    ("corrected confirms", _calls),
    ("delivered", _delivered),
    ("clashres", lambda r: _ct(r, "clashres")),
    ("insert_failed", lambda r: _ct(r, "insert_failed")),
    ("drop", lambda r: _ct(r, "drop")),
    ("faults", _faults),
    ("unload", _unload),
    ("traffic after", _healthy),
    ("verdict", lambda r: _d(r).get("verdict", "?")),
)


def rows(lab: dict[str, Any]) -> list[list[str]]:
    """One row per run: the run's name then every ROW_COLUMNS cell."""
    return [[str(run["name"])] + [str(fn(run)) for _, fn in ROW_COLUMNS] for run in lab.get("runs", [])]


def terminal_table(lab: dict[str, Any], width: int = 48) -> str:
    header = ["run"] + [name for name, _ in ROW_COLUMNS]
    body = [[c if len(c) <= width else c[: width - 1] + "…" for c in row] for row in rows(lab)]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(out)


def measured_columns(lab: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Strategy (or baseline run name) -> measured column -> cell, for COMPARISON.md/json."""
    out: dict[str, dict[str, str]] = {}
    for run in lab.get("runs", []):
        key = run.get("strategy") or run["name"]
        out[key] = {
            "lab: loaded": _loaded(run),
            "lab: corrected confirms": _calls(run),
            "lab: delivered": _delivered(run),
            "lab: clash resolutions": _ct(run, "clashres"),
            "lab: faults": _faults(run),
            "lab: unload": _unload(run),
            "lab: verdict": str(_d(run).get("verdict", "?")),
        }
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def measured_markdown(lab: dict[str, Any]) -> str:
    """A markdown section: how the lab ran, the measured table, and the first lines of every fault."""
    k, w, m = lab.get("kernel", {}), lab.get("workload", {}), lab.get("machine", {})
    lines = ["## Measured in the lab", ""]
    lines.append(
        f"Kernel `{k.get('release')}` ({k.get('image')}, booted as {k.get('boot_mode')}), "
        f"qemu TCG, {lab.get('vm', {}).get('smp')} vCPUs, {lab.get('vm', {}).get('memory')} RAM; "
        f"{lab.get('date')}; host {m.get('cpu')} ({m.get('cores')} cores), {m.get('qemu')}."
    )
    lines.append("")
    lines.append(
        f"Workload per boot: {w.get('rounds')} rounds x {len(w.get('families', []))} families "
        f"({', '.join(w.get('families', []))}): each round {w.get('threads')} threads send the first datagram of a "
        f"new flow from one socket at once ({w.get('datagrams')} datagrams); a ctnetlink event listener is "
        f"subscribed; NFQUEUE consumers accept after {w.get('queue_delay_us')} us. After unloading, "
        f"{w.get('health_rounds')} more rounds check that traffic still flows."
    )
    lines.append("")
    header = ["run"] + [name for name, _ in ROW_COLUMNS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows(lab):
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    lines.append("")
    for run in lab.get("runs", []):
        for i, fault in enumerate(run.get("faults") or []):
            if i >= 3:
                lines.append(f"(and {len(run['faults']) - 3} more reports in {run['name']})")
                lines.append("")
                break
            lines.append(f"**{run['name']}**: {fault['kind']}: `{fault['title']}`")
            if fault.get("frames"):
                lines.append("top frames: " + ", ".join(f"`{f}`" for f in fault["frames"]))
            lines.append("")
            lines.append("```")
            lines += fault["text"].splitlines()[:25]
            lines.append("```")
            lines.append("")
    if lab.get("failed"):
        lines.append("Failed: " + ", ".join(lab["failed"]) + ".")
    else:
        lines.append("Every mitigation loaded, delivered every datagram, raised no kernel report and unloaded.")
    lines.append("")
    return "\n".join(lines)


def write_chart(lab: dict[str, Any], path: Path) -> None:
    """PNG: delivered datagrams, clash resolutions and kernel reports per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = lab.get("runs", [])
    names = [str(r["name"]) for r in runs]
    sent = [int(_d(r).get("sent") or 0) for r in runs]
    received = [int(_d(r).get("received") or 0) for r in runs]
    clashes = [int((_d(r).get("workload_ct") or {}).get("clashres", 0)) for r in runs]
    faults = [int(_d(r).get("fault_count") or 0) for r in runs]
    x = list(range(len(runs)))
    fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 1.6 * len(runs) * 1.5), 4.2))
    ax = axes[0]
    ax.bar([i - 0.2 for i in x], sent, width=0.4, label="sent", color="#9ab")
    ax.bar([i + 0.2 for i in x], received, width=0.4, label="received", color="#2a6")
    ax.set_title("datagrams")
    ax.legend(fontsize=8)
    axes[1].bar(x, clashes, color="#c83")
    axes[1].set_title("clash resolutions (workload)")
    axes[2].bar(x, faults, color="#c22")
    axes[2].set_title("kernel reports")
    for a in axes:
        a.set_xticks(x)
        a.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    axes[2].set_ylim(0, max([1, *faults]) * 1.2)
    k = lab.get("kernel", {})
    fig.suptitle(f"nqgen lab on {k.get('release')} ({lab.get('date', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
