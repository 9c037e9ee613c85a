"""What one node-scenario boot measured: the seed lab's common records plus lookups, TFTP and NAT evidence."""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ...results import RunResult, apply_results
from .topology import FAMILIES, Family

_CT_NEW = re.compile(r"\[NEW\]\s+udp\s+\d+\s+\d+\s+src=(\S+) dst=(\S+) sport=\d+ dport=(\d+) .*?src=(\S+) dst=(\S+) ")
_DNS_QUERY = re.compile(r"query\[(A|AAAA)\] \S+ from (\S+)$")


@dataclass
class Lookups:
    """One run of nq_lookup (a phase and a family)."""

    phase: str
    family: str
    planned: int
    started: int
    ok: int
    a_only: int
    aaaa_only: int
    wrong: int
    failed: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    slow_1s: int
    slow_5s: int
    gai_errors: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        """Lookups that did not get both right answers (or never started before the deadline)."""
        return self.planned - self.ok


@dataclass
class NatEvidence:
    """Per family: how the node's conntrack saw the DNS/TFTP flows and whom dnsmasq answered."""

    family: str
    new_flows: int = 0  # conntrack -E [NEW] UDP events from the pod to the server
    masqueraded: int = 0  # ... whose reply tuple points at the node's upstream address
    untranslated: int = 0  # ... whose reply tuple still points at the pod
    queries_from_node: int = 0  # dnsmasq log: queries whose source is the node (translated)
    queries_from_pod: int = 0  # ... whose source is the pod itself (left untranslated)


@dataclass
class NodeRun:
    """Everything measured in one boot of the node scenario."""

    base: RunResult
    consumer_workers: int
    queue: bool
    lookups: list[Lookups] = field(default_factory=list)
    tftp: dict[str, dict[str, Any]] = field(default_factory=dict)  # family -> record
    nat: dict[str, NatEvidence] = field(default_factory=dict)  # during the workload (mitigation loaded)
    nat_all: dict[str, NatEvidence] = field(default_factory=dict)  # the whole boot, lookups after unload too
    setup_errors: list[str] = field(default_factory=list)
    ruleset: str = ""

    def phase(self, phase: str, family: str | None = None) -> list[Lookups]:
        return [x for x in self.lookups if x.phase == phase and (family is None or x.family == family)]

    def answered(self, phase: str = "workload", family: str | None = None) -> tuple[int, int]:
        """(lookups answered with both right addresses, lookups planned)."""
        runs = self.phase(phase, family)
        return sum(x.ok for x in runs), sum(x.planned for x in runs)

    def nat_on_confirmed(self) -> dict[str, dict[str, int]] | None:
        """Per family, over the whole boot: nf_nat_setup_info() and nf_conntrack_alter_reply() calls on an entry
        already confirmed (nqlab_detect), None without the detector. On 3.10 such a call rewrites the reply tuple
        of a hashed entry; on 4.x+ nf_nat_setup_info() returns early (no NAT)."""
        last = next((c for p in ("end", "workload", "before") if (c := self.base.detector.get(p)) is not None), None)
        if last is None:
            return None
        out: dict[str, dict[str, int]] = {}
        for i, fam in enumerate(("ipv4", "ipv6")):
            row = {}
            for key, name in (("nat_confirmed", "nat_setup"), ("alter_confirmed", "alter_reply")):
                vals = last.get(key)
                row[name] = int(vals[i]) if isinstance(vals, list) and len(vals) > i and isinstance(vals[i], int) else 0
            out[fam] = row
        return out

    @property
    def kasan(self) -> int:
        return sum(1 for f in self.base.run_faults if f.kind == "KASAN")

    def to_dict(self) -> dict[str, Any]:
        d = self.base.to_dict()
        d.update(d.pop("derived"))
        # the seed workload's datagram counts do not apply here: lookups are measured instead
        d["problems"] = [p for p in d["problems"] if p != "no datagram sent"]
        for key in ("traffic", "sent", "received", "lost", "send_errors", "health_sent", "health_received",
                    "healthy", "confirmed_after"):
            d.pop(key, None)
        d["scenario"] = "node"
        d["consumer_workers"] = self.consumer_workers
        d["queue"] = self.queue
        d["lookups"] = [vars(x) | {"lost": x.lost} for x in self.lookups]
        d["tftp"] = self.tftp
        d["nat"] = {k: vars(v) for k, v in self.nat.items()}
        d["nat_all"] = {k: vars(v) for k, v in self.nat_all.items()}
        d["setup_errors"] = self.setup_errors
        d["kasan_reports"] = self.kasan
        d["nat_on_confirmed"] = self.nat_on_confirmed()
        d["ruleset"] = self.ruleset
        return d


def _b64(value: object) -> str:
    if not isinstance(value, str):
        return ""
    try:
        return base64.b64decode(value).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return ""


def _gz_b64(value: object) -> str:
    if not isinstance(value, str):
        return ""
    try:
        return gzip.decompress(base64.b64decode(value)).decode("utf-8", "replace")
    except (binascii.Error, ValueError, OSError, EOFError):
        return ""


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _family_of(addr: str) -> Family | None:
    for fam in FAMILIES:
        if addr == fam.pod_addr or addr == fam.node_up_addr:
            return fam
    return None


def nat_evidence(ct_events: str, dns_log: str) -> dict[str, NatEvidence]:
    """Count translated and untranslated flows from ``conntrack -E`` output and dnsmasq's query log."""
    out = {fam.name: NatEvidence(fam.name) for fam in FAMILIES}
    for line in ct_events.splitlines():
        m = _CT_NEW.search(line)
        if not m:
            continue
        src, dst, _dport, _rsrc, rdst = m.groups()
        fam = next((f for f in FAMILIES if src == f.pod_addr and dst == f.server), None)
        if fam is None:
            continue
        ev = out[fam.name]
        ev.new_flows += 1
        if rdst == fam.node_up_addr:
            ev.masqueraded += 1
        elif rdst == fam.pod_addr:
            ev.untranslated += 1
    for line in dns_log.splitlines():
        m = _DNS_QUERY.search(line.strip())
        if not m:
            continue
        fam = _family_of(m.group(2))
        if fam is None:
            continue
        if m.group(2) == fam.node_up_addr:
            out[fam.name].queries_from_node += 1
        else:
            out[fam.name].queries_from_pod += 1
    return out


def parse_node(run: NodeRun, text: str) -> None:
    """Fill ``run`` from the guest's JSON lines: the common records first, then the node's own."""
    apply_results(run.base, text)
    captures: dict[str, str] = {}
    marks: dict[str, int] = {}
    for raw in text.splitlines():
        line = raw.strip().strip("\x00")
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        kind = rec.get("type")
        if kind == "lookups":
            phase, _, family = str(rec.get("tag", "")).rpartition("-")
            lat_rec, err_rec = rec.get("lat_ms"), rec.get("gai_errors")
            lat: dict[str, Any] = lat_rec if isinstance(lat_rec, dict) else {}
            errors: dict[str, Any] = err_rec if isinstance(err_rec, dict) else {}
            run.lookups.append(Lookups(
                phase=phase, family=family, planned=int(_num(rec.get("planned"))),
                started=int(_num(rec.get("started"))), ok=int(_num(rec.get("ok"))),
                a_only=int(_num(rec.get("a_only"))), aaaa_only=int(_num(rec.get("aaaa_only"))),
                wrong=int(_num(rec.get("wrong"))), failed=int(_num(rec.get("failed"))),
                seconds=_num(rec.get("seconds")), p50_ms=_num(lat.get("p50")), p99_ms=_num(lat.get("p99")),
                max_ms=_num(lat.get("max")), slow_1s=int(_num(rec.get("slow_1s"))),
                slow_5s=int(_num(rec.get("slow_5s"))),
                gai_errors={str(k): int(_num(v)) for k, v in errors.items()},
            ))
        elif kind == "tftp":
            fam = str(rec.get("family", ""))
            run.tftp[fam] = {
                "ok": rec.get("rc") == 0 and rec.get("same") is True,
                "rc": rec.get("rc"),
                "seconds": round(_num(rec.get("t1")) - _num(rec.get("t0")), 2),
                "output": _b64(rec.get("b64")).strip()[-200:],
            }
        elif kind == "node":
            run.setup_errors.append(f"{rec.get('step')} (rc {rec.get('rc')}): {_b64(rec.get('b64')).strip()[:200]}")
        elif kind == "ruleset":
            run.ruleset = _b64(rec.get("b64"))
        elif kind == "marks":
            marks = {k: int(v) for k, v in rec.items() if isinstance(v, int) and not isinstance(v, bool)}
        elif kind == "capture":
            captures[str(rec.get("what"))] = _gz_b64(rec.get("gz_b64"))
    ct, dns = captures.get("ctevents", ""), captures.get("dnsmasq", "")
    run.nat_all = nat_evidence(ct, dns)
    if "ctevents" in marks and "dnsmasq" in marks:
        ct = "\n".join(ct.splitlines()[: marks["ctevents"]])
        dns = "\n".join(dns.splitlines()[: marks["dnsmasq"]])
    else:
        run.base.errors.append("no workload marks: NAT evidence covers the whole boot")
    run.nat = nat_evidence(ct, dns)
    if run.setup_errors:
        run.base.errors += [f"node setup: {e}" for e in run.setup_errors]
