"""``out/COMPARISON.md`` and ``out/comparison.json``: the strategies side by side.

Generation writes the static part (feasible or not, what each touches, needs, covers, how it is undone, its
risks). The lab adds measured columns through ``out/lab.json``; ``refresh`` re-renders both files from what is
in ``out/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .lab import report
from .profile import KernelProfile
from .strategies import STRATEGIES, Feasibility, on_target

COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "COMPARISON.md"
LAB_JSON = "lab.json"
NODE_LAB_JSON = "node-lab.json"  # the lab's node scenario (nqgen.lab.scenarios.node)
COST_JSON = "cost.json"  # the packet-path cost (nqgen.lab.cost, written by `make bench`)


def static_rows(profile: KernelProfile, results: dict[str, Feasibility]) -> list[dict[str, Any]]:
    rows = []
    for s in STRATEGIES:
        if s.name not in results:
            continue
        r = results[s.name]
        rows.append(
            {
                "strategy": s.name,
                "summary": s.summary,
                "feasible": r.feasible,
                "reason": r.reason,
                "covers": list(r.covers),
                "touches": on_target(s.touches, profile),
                "needs": on_target(s.needs, profile),
                "undo": on_target(s.undo, profile),
                "risks": [x for x in (on_target(t, profile) for t in s.risks) if x] + list(r.notes),
            }
        )
    return rows


def write_static(out: Path, profile: KernelProfile, results: dict[str, Feasibility]) -> None:
    data = {
        "kernel": profile.release,
        "fix_present": profile.features.fix_present,
        "generation": profile.features.confirm_generation,
        "strategies": static_rows(profile, results),
    }
    (out / COMPARISON_JSON).write_text(json.dumps(data, indent=2) + "\n")
    refresh(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _covers(row: dict[str, Any]) -> str:
    covers = row["covers"]
    if not row["feasible"]:
        return "-"
    return ", ".join(covers) if covers else "none (narrows the window only)"


def render_markdown(data: dict[str, Any], lab: dict[str, Any] | None, node: dict[str, Any] | None = None,
                    cost: dict[str, Any] | None = None) -> str:
    lines = [f"# nqgen comparison for {data['kernel']}", ""]
    if data["fix_present"]:
        lines += [
            "> **This kernel already carries the upstream fix** (\"netfilter: conntrack: re-fetch conntrack after "
            "insertion\"): no mitigation is needed on it. The modules were generated for testing.",
            "",
        ]
    lines.append(f"Confirm generation: {data['generation']}.")
    lines.append("")
    measured = report.measured_columns(lab) if lab is not None else {}
    cost_note = ("Packet-path cost: not measured for this output (`make bench` measures it in the VM lab and writes "
                 "the columns into its own generated copy).")  # fmt: skip
    if cost is not None:
        from .lab.cost import cost_columns

        per_strategy, cost_note = cost_columns(cost, data["kernel"])
        measured = {n: {**measured.get(n, {}), **per_strategy.get(n, {})} for n in {*measured, *per_strategy}}
    mcols: list[str] = []
    for cols in measured.values():
        for c in cols:
            if c not in mcols:
                mcols.append(c)
    header = ["strategy", "feasible", "covers", "touches", "undone by", *mcols]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in data["strategies"]:
        feas = "yes" if row["feasible"] else "no: " + row["reason"]
        cells = [row["strategy"], feas, _covers(row), row["touches"], row["undo"]]
        cells += [measured.get(row["strategy"], {}).get(c, "-") for c in mcols]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    lines.append(cost_note)
    lines.append("")
    for row in data["strategies"]:
        lines.append(f"## {row['strategy']}")
        lines.append("")
        lines.append(row["summary"] + ".")
        lines.append("")
        lines.append(f"- feasible: {'yes' if row['feasible'] else 'no'} ({row['reason']})")
        lines.append(f"- needs: {row['needs']}")
        lines.append(f"- covers: {_covers(row)}")
        lines.append(f"- undone by: {row['undo']}")
        lines.append("- risks:")
        lines += [f"  - {r}" for r in row["risks"]]
        lines.append("")
    if lab is not None:
        lines.append(report.measured_markdown(lab))
    if node is not None:
        from .lab.scenarios.node.report import node_markdown

        lines.append(node_markdown(node))
    return "\n".join(lines).rstrip() + "\n"


def refresh(out: Path) -> None:
    """Re-render COMPARISON.md (and add the measurements to comparison.json) from what is in ``out``."""
    data = json.loads((out / COMPARISON_JSON).read_text())
    lab_path = out / LAB_JSON
    lab = json.loads(lab_path.read_text()) if lab_path.is_file() else None
    if lab is not None:
        data["measured"] = report.measured_columns(lab)
        (out / COMPARISON_JSON).write_text(json.dumps(data, indent=2) + "\n")
    node_path = out / NODE_LAB_JSON
    node = json.loads(node_path.read_text()) if node_path.is_file() else None
    cost_path = out / COST_JSON
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() else None
    (out / COMPARISON_MD).write_text(render_markdown(data, lab, node, cost))
