"""The node scenario's table (terminal and markdown), its chart, and what makes ``nqgen lab`` fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ....natpath import NAT_BREAKING, NAT_UNPROTECTED
from .topology import FAMILIES

Run = dict[str, Any]


def _lookups(run: Run, phase: str, family: str) -> list[dict[str, Any]]:
    return [x for x in run.get("lookups", []) if x["phase"] == phase and x["family"] == family]


def answered(run: Run, family: str, phase: str = "workload") -> tuple[int, int]:
    xs = _lookups(run, phase, family)
    return sum(int(x["ok"]) for x in xs), sum(int(x["planned"]) for x in xs)


def _answered_cell(run: Run, family: str) -> str:
    ok, planned = answered(run, family)
    xs = _lookups(run, "workload", family)
    if not xs:
        return "-"
    part = sum(int(x["a_only"]) + int(x["aaaa_only"]) for x in xs)
    wrong = sum(int(x["wrong"]) for x in xs)
    extra = []
    if part:
        extra.append(f"{part} one family only")
    if wrong:
        extra.append(f"{wrong} wrong")
    not_started = sum(int(x["planned"]) - int(x["started"]) for x in xs)
    if not_started:
        extra.append(f"{not_started} not started by the deadline")
    return f"{ok}/{planned}" + (f" ({', '.join(extra)})" if extra else "")


def _latency_cell(run: Run) -> str:
    parts = []
    for fam in FAMILIES:
        for x in _lookups(run, "workload", fam.name):
            parts.append(f"{fam.name[-2:]}: {x['p50_ms']:.0f}/{x['max_ms']:.0f} ms, ≥5 s: {x['slow_5s']}")
    return "; ".join(parts) or "-"


def _nat_cell(run: Run) -> str:
    parts = []
    for fam in FAMILIES:
        ev = run.get("nat", {}).get(fam.name)
        if not ev:
            continue
        parts.append(f"{fam.name[-2:]}: {ev['masqueraded']}/{ev['new_flows']} flows NATed, "
                     f"dnsmasq saw {ev['queries_from_node']} node / {ev['queries_from_pod']} pod")
    return "; ".join(parts) or "-"


def _tftp_cell(run: Run) -> str:
    t = run.get("tftp") or {}
    if not t:
        return "-"
    return ", ".join(f"{f[-2:]} {'ok' if v.get('ok') else 'FAILED'}" for f, v in sorted(t.items()))


def _consumer(run: Run) -> str:
    if not run.get("queue"):
        return "none"
    w = int(run.get("consumer_workers") or 1)
    return "in order (1 thread)" if w == 1 else f"pool ({w} threads)"


def _fault_family(frames: list[str]) -> str:
    """The family of the packet a report's stack was handling: ip6_output, nf_nat_ipv6_* ... or ip_output ..."""
    names = [f.split("+", 1)[0] for f in frames]
    if any(n.startswith(("ip6", "ipv6", "nf_nat_ipv6", "__ip6")) for n in names):
        return "ipv6"
    if any(n.startswith(("ip_", "ipv4", "nf_nat_ipv4", "__ip_")) for n in names):
        return "ipv4"
    return "unknown"


def kasan_by_family(run: Run) -> dict[str, int]:
    """KASAN reports of the run by the family their stack shows: not the kernel's own at boot and, for a
    mitigation, not those after its unload."""
    out: dict[str, int] = {}
    mitigation = run.get("kind") != "baseline"
    for f in run.get("faults") or []:
        if f.get("kind") == "KASAN" and f.get("phase") != "boot" and not (mitigation and f.get("phase") == "after"):
            fam = _fault_family(list(f.get("frames") or []))
            out[fam] = out.get(fam, 0) + 1
    return out


def _kasan_cell(run: Run) -> str:
    loaded, after = kasan_split(run)
    by = kasan_by_family(run)
    label = {"ipv4": "v4", "ipv6": "v6", "unknown": "family not in stack"}
    parts = [f"{label[fam]} {by[fam]}" for fam in ("ipv4", "ipv6", "unknown") if by.get(fam)]
    cell = f"{loaded} ({', '.join(parts)})" if loaded and parts else str(loaded)
    return cell + (f" + {after} after unload" if after else "")


def _clashes(run: Run) -> str:
    ct = run.get("workload_ct") or {}
    return str(ct.get("clashres", "-"))


def _detector_cell(run: Run) -> str:
    """nqlab_detect over the boot: stale uses, clashes during the workload, NAT set up on confirmed entries."""
    if run.get("nat_on_confirmed") is None:
        return "-"
    stale = run.get("stale_uses")
    clashes = run.get("detector_clashes")
    return (f"{'-' if stale is None else stale} / {'-' if clashes is None else clashes} / "
            f"{nat_on_confirmed_total(run)}")


def _unload(run: Run) -> str:
    if run.get("kind") == "baseline":
        return "-"
    return {True: "clean", False: "FAILED", None: "-"}[run.get("unloaded")]


def nat_on_confirmed_total(run: Run) -> int:
    """nf_nat_setup_info() plus nf_conntrack_alter_reply() calls on confirmed entries (nqlab_detect), both families."""
    rec = run.get("nat_on_confirmed") or {}
    return sum(int(v) for fam in rec.values() if isinstance(fam, dict) for v in fam.values() if isinstance(v, int))


def _confirm_uaf(fault: dict[str, Any]) -> bool:
    return fault.get("kind") == "KASAN" and "use-after-free" in str(fault.get("title"))


def _excused(run: Run, fault: dict[str, Any]) -> bool:
    """A report that is a measured finding, not a failure of a mitigation run: the unfixed confirm's own
    use-after-free after the module was unloaded (the health lookups run on the unprotected kernel again), or
    under a strategy documented to leave translated flows to the unfixed confirm (every pod flow is masqueraded)."""
    if not _confirm_uaf(fault):
        return False
    return fault.get("phase") == "after" or run.get("strategy") in NAT_UNPROTECTED


def kasan_split(run: Run) -> tuple[int, int]:
    """KASAN reports (not the kernel's own at boot): (with the module loaded or no module, after the unload)."""
    faults = [f for f in run.get("faults") or [] if f.get("kind") == "KASAN" and f.get("phase") != "boot"]
    after = sum(1 for f in faults if f.get("phase") == "after") if run.get("kind") != "baseline" else 0
    return len(faults) - after, after


def problems(run: Run) -> list[str]:
    """Why this run makes the node lab fail (a NAT-breaking strategy may lose lookups: that is its finding)."""
    out = list(run.get("problems") or [])
    if run.get("kind") == "baseline":
        out = [p for p in out if "fault" not in p.lower() and "kasan" not in p.lower() and "stale use" not in p]
        if run.get("kasan_reports") or run.get("stale_uses"):
            return out  # the vulnerable kernel's baseline: the report is the proof, not a lab failure
    faults = [f for f in run.get("faults") or [] if f.get("phase") != "boot"]
    if faults and all(_excused(run, f) for f in faults):
        out = [p for p in out if "kernel report" not in p]
    hashed = nat_on_confirmed_total(run)
    if hashed:
        out.append(f"NAT set up on {hashed} confirmed (hashed) entries (nf_nat_setup_info/nf_conntrack_alter_reply)")
    breaks_nat = run.get("strategy") in NAT_BREAKING
    for fam in FAMILIES:
        ok, planned = answered(run, fam.name)
        if planned and ok < planned and not breaks_nat:
            out.append(f"{fam.name}: {planned - ok} of {planned} lookups not answered correctly")
        t = (run.get("tftp") or {}).get(fam.name)
        if t is not None and not t.get("ok") and not breaks_nat:
            out.append(f"{fam.name}: TFTP through the helper failed")
    if run.get("setup_errors"):
        out.append("node setup failed")
    return out


HEADER = ["configuration", "NFQUEUE consumer", "KASAN reports",
          "detector: stale uses / clashes / NAT on hashed entries", "clash resolutions", "lookups answered IPv4",
          "lookups answered IPv6", "latency p50/max, lookups ≥5 s",
          "MASQUERADE during the workload (conntrack -E, dnsmasq)",
          "TFTP via helper", "corrected confirms", "unload"]


def rows(lab: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in lab["runs"]:
        name = r["name"] + (f" #{r['repeat']}" if lab.get("repeat", 1) > 1 else "")
        calls = r.get("corrected_calls")
        out.append([name, _consumer(r), _kasan_cell(r), _detector_cell(r), _clashes(r),
                    _answered_cell(r, "ipv4"),
                    _answered_cell(r, "ipv6"), _latency_cell(r), _nat_cell(r), _tftp_cell(r),
                    "-" if calls is None else str(calls), _unload(r)])
    return out


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def node_markdown(lab: dict[str, Any]) -> str:
    """The node scenario's section of COMPARISON.md (and NODE.md)."""
    k = lab["kernel"]
    w = lab["workload"]
    built = lab.get("built_from_source") or []
    lines = [
        f"## Measured: a real node (`nqgen lab --scenario node`) on {k['release']}"
        f"{' (KASAN)' if k.get('kasan') else ''}, {lab['date']}",
        "",
        "Real software only in the packet path: a pod namespace behind a veth, an upstream namespace with Debian's "
        "`dnsmasq` (DNS, and TFTP from its built-in server), the node routing between them with an "
        "`iptables-legacy`/`ip6tables-legacy` "
        f"ruleset (MASQUERADE of the pod subnets, `NFQUEUE --queue-balance {w['queue_base']}:"
        f"{w['queue_base'] + w['queue_count'] - 1} --queue-bypass` for forwarded UDP, the TFTP helper through "
        "`-t raw ... -j CT --helper tftp`), `conntrack -E` listening, and the pod resolving with glibc's "
        f"`getaddrinfo(AF_UNSPEC)` ({w['threads']} threads, {w['lookups']} names per family, A and AAAA checked "
        f"against dnsmasq's data; the consumer holds each packet {w['queue_delay_us']} µs). Upstream has no route "
        "back to the pod: an answer only arrives through the MASQUERADE translation.",
        "",
    ]
    if built:
        lines += [f"Modules this kernel does not ship, built from its own source tree: {', '.join(built)}.", ""]
    mach = lab.get("machine") or {}
    if mach:
        vm = lab.get("vm") or {}
        lines += [f"Machine: {mach.get('cpu') or 'unknown CPU'}, {mach.get('cores')} cores, {mach.get('qemu')} "
                  f"({mach.get('accel')}), guest {vm.get('smp')} vCPUs, {vm.get('memory')}; one boot per line "
                  f"unless numbered. KASAN reports are split by the family their stack shows "
                  f"(`ip_output` or `ip6_output`).", ""]
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|" + "---|" * len(HEADER))
    for row in rows(lab):
        lines.append("| " + " | ".join(_md(c) for c in row) + " |")
    lines.append("")
    verdicts = nat_verdicts(lab)
    if verdicts:
        lines += ["NAT verdict for the advance-confirm variants (measured, per family):", "", *verdicts, ""]
    for r in lab["runs"]:
        p = problems(r)
        if p:
            lines.append(f"- {r['name']}: {'; '.join(p)}")
        titles = r.get("fault_titles") or {}
        if titles:
            reports = "; ".join(f"`{t}` x{n}" for t, n in titles.items())
            lines.append(f"- {r['name']} kernel reports: {reports}")
    return "\n".join(lines).rstrip() + "\n"


ADVANCE = ("advance-confirm", "advance-confirm-corrected")


def nat_verdicts(lab: dict[str, Any]) -> list[str]:
    """Per advance-confirm variant and family: is NAT kept, and does the kernel's unfixed confirm still fault?

    Both variants leave entries the NAT hooks have seen unconfirmed (``nat_unconfirmed``): on this node every
    pod flow is masqueraded, so what protects those flows is only what the kernel itself does.
    """
    out: list[str] = []
    for r in lab["runs"]:
        if r.get("strategy") not in ADVANCE:
            continue
        deltas = r.get("counter_deltas") or {}
        by = kasan_by_family(r)
        tag = r["name"] + (f" #{r['repeat']}" if lab.get("repeat", 1) > 1 else "")
        counters = ", ".join(f"{k} {deltas[k]}" for k in ("early_confirms", "nat_unconfirmed", "confirm_calls")
                             if k in deltas)
        for fam in FAMILIES:
            ok, planned = answered(r, fam.name)
            ev = (r.get("nat") or {}).get(fam.name) or {}
            kept = bool(planned) and ok == planned and ev.get("new_flows", 0) > 0 \
                and ev.get("masqueraded") == ev.get("new_flows") and not ev.get("queries_from_pod")
            tftp = (r.get("tftp") or {}).get(fam.name) or {}
            nat = (f"NAT kept ({ok}/{planned} lookups answered, {ev.get('masqueraded', 0)}/{ev.get('new_flows', 0)} "
                   f"flows masqueraded, TFTP helper {'ok' if tftp.get('ok') else 'failed'})" if kept else
                   f"NAT BROKEN ({ok}/{planned} lookups answered, {ev.get('masqueraded', 0)}/"
                   f"{ev.get('new_flows', 0)} flows masqueraded, {ev.get('queries_from_pod', 0)} queries from the "
                   "pod's own address)")
            n = by.get(fam.name, 0)
            prot = (f"**not protected: {n} KASAN report(s)** whose stack shows {fam.name}" if n else
                    f"no KASAN report whose stack shows {fam.name}")
            out.append(f"- `{tag}`, {fam.name}: {nat}; {prot}.")
        if by.get("unknown"):
            out.append(f"- `{tag}`: {by['unknown']} more KASAN report(s) whose stack names no family "
                       "(the confirm called by `nf_reinject` itself: a packet queued in POST_ROUTING, by this module).")
        if counters:
            out.append(f"- `{tag}` counters: {counters} (`nat_unconfirmed`: entries NAT had seen, left to the "
                       "kernel's own confirm).")
    return out


def terminal_table(lab: dict[str, Any]) -> str:
    keep = [0, 1, 2, 3, 4, 5, 6, 9, 11]
    data = [[HEADER[i] for i in keep]] + [[row[i] for i in keep] for row in rows(lab)]
    widths = [max(len(r[i]) for r in data) for i in range(len(keep))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in data)


def write_chart(lab: dict[str, Any], path: Path) -> None:
    """PNG: lookups answered per family, KASAN reports and flows masqueraded per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = lab["runs"]
    names = [r["name"] + (f"#{r['repeat']}" if r.get("repeat", 1) > 1 else "") for r in runs]
    x = list(range(len(runs)))
    fig, axes = plt.subplots(1, 3, figsize=(max(10.0, 2.2 * len(runs)), 4.6))
    for off, fam, color in ((-0.2, "ipv4", "#2a6"), (0.2, "ipv6", "#27c")):
        pct = []
        for r in runs:
            ok, planned = answered(r, fam)
            pct.append(100.0 * ok / planned if planned else 0.0)
        axes[0].bar([i + off for i in x], pct, width=0.4, label=fam, color=color)
    axes[0].set_title("lookups answered correctly (%)")
    axes[0].set_ylim(0, 110)
    axes[0].legend(fontsize=8, loc="lower right")
    kasan = [int(r.get("kasan_reports") or 0) for r in runs]
    clashes = [int((r.get("workload_ct") or {}).get("clashres") or 0) for r in runs]
    axes[1].bar_label(axes[1].bar([i - 0.2 for i in x], clashes, width=0.4, color="#c83", label="clash resolutions"),
                      fontsize=7)
    axes[1].bar_label(axes[1].bar([i + 0.2 for i in x], kasan, width=0.4, color="#c22", label="KASAN reports"),
                      fontsize=7)
    axes[1].set_title("clash resolutions and KASAN reports")
    axes[1].legend(fontsize=8, loc="upper right")
    axes[1].set_ylim(0, max([1, *kasan, *clashes]) * 1.3)
    for off, fam, color in ((-0.2, "ipv4", "#2a6"), (0.2, "ipv6", "#27c")):
        vals = []
        for r in runs:
            ev = r.get("nat", {}).get(fam, {})
            vals.append(100.0 * ev.get("masqueraded", 0) / ev["new_flows"] if ev.get("new_flows") else 0.0)
        axes[2].bar([i + off for i in x], vals, width=0.4, label=fam, color=color)
    axes[2].set_title("pod flows MASQUERADEd during the workload (%)")
    axes[2].set_ylim(0, 110)
    for a in axes:
        a.set_xticks(x)
        a.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    fig.suptitle(f"nqgen node scenario on {lab['kernel']['release']} ({lab['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
