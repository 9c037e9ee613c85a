"""COMPARISON.md's packet-path cost columns come from ``out/cost.json`` (``make bench`` writes it) and say what
they mean; without one, COMPARISON.md says the cost was not measured; one from another kernel is not shown."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import DebianKernel, run_nqgen
from nqgen import compare
from nqgen.lab.cost import COST_JSON, CostPlan, CostResult, write_cost_json


def _result(strategy: str, release: str, off_ns: int, on_ns: int) -> CostResult:
    plan = CostPlan(pairs=2, datagrams=100, repeat=2)
    records = []
    for pair in range(2):
        for state, ns in (("off", off_ns + pair * 1000), ("on", on_ns + pair * 1000)):
            for fam in ("ipv4", "ipv6"):
                for kind, n in (("new", 100), ("established", 200)):
                    sample = {"family": fam, "kind": kind, "datagrams": n, "ns": ns * n, "sent": n, "received": n}
                    records.append({"type": "cost", "pair": pair, "state": state, "sample": sample})
    return CostResult(strategy, release, plan, 60.0, 0, records)


def test_cost_columns_from_cost_json(debian: DebianKernel, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_nqgen(["--strategy", "all", "--kdir", str(debian.kdir), "--module", str(debian.nf_conntrack),
                      "--out", str(out)], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = (out / "COMPARISON.md").read_text()
    assert "Packet-path cost: not measured for this output" in text
    release = json.loads((out / "inputs.json").read_text())["release"]
    # ftrace 1000 ns slower per packet, hold-ref at no measurable cost
    write_cost_json(out, [_result("ftrace", release, 20000, 21000), _result("hold-ref", release, 20000, 20000)],
                    "2026-12-01 17:00 UTC")  # fmt: skip
    compare.refresh(out)
    text = (out / "COMPARISON.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| strategy"))
    assert "throughput established (v4 / v6)" in header and "extra ns/packet new (v4 / v6)" in header
    ftrace = next(line for line in text.splitlines() if line.startswith("| ftrace |"))
    assert "0.953 / 0.953" in ftrace  # median of 20000/21000 and 21000/22000 and "1000 / 1000" in ftrace
    hold = next(line for line in text.splitlines() if line.startswith("| hold-ref |"))
    assert "1.000 / 1.000" in hold
    stop = next(line for line in text.splitlines() if line.startswith("| stop-hook |"))
    assert stop.rstrip(" |").endswith("- | - | -"), stop
    assert "median of 2 alternating pairs" in text and "spread by 5%" in text
    doc = json.loads((out / COST_JSON).read_text())
    doc["release"] = "6.1.0-0-other"
    (out / COST_JSON).write_text(json.dumps(doc))
    compare.refresh(out)
    text = (out / "COMPARISON.md").read_text()
    assert "measured on 6.1.0-0-other, not on" in text and "throughput established" not in text
