"""Packet-path cost of one strategy: one boot alternating phases without and with its module (no NFQUEUE).

In each phase and family the guest sends the same number of UDP datagrams (``nq_udprace``, one thread) first on
new flows (fresh source ports: every datagram creates and confirms a conntrack entry), then again from the same
ports (the entries exist: the confirm path returns early). Each timing is read from ``/proc/uptime`` (10 ms
resolution) around the run. The ratio is taken between the unpatched and patched phase of the same pair, so a
slow-down of the whole boot (a loaded TCG host) cancels out as far as it is steady.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .guest import (
    _PRELUDE,
    EXIT_DEP_FAILED,
    EXIT_DONE,
    EXIT_HELPER_FAILED,
    RESULT_TTY,
    WORKLOAD_DPORT,
    _q,
    patched_block,
    unload_block,
)
from .manifest import Manifest
from .results import Fault, find_faults
from .runner import Guest, LabConfig, RunSpec, boot_initramfs, check_built, plan_boot

SPORT_FIRST = 10000
SPORT_LAST = 65000


@dataclass(frozen=True)
class CostPlan:
    pairs: int = 3  # (without, with) phase pairs
    datagrams: int = 500  # per phase, family and kind (new / established)
    families: tuple[str, ...] = ("4", "6")

    def sport(self, pair: int, state: int, fam: int) -> int:
        """The first source port of one block (pair, state 0/1, family index): blocks never overlap."""
        block = (pair * 2 + state) * len(self.families) + fam
        return SPORT_FIRST + block * self.datagrams

    def check(self) -> None:
        if self.sport(self.pairs, 0, 0) > SPORT_LAST:
            raise InputError(f"{self.pairs} pairs of {self.datagrams} datagrams need more source ports than exist")


def render_init(cp: CostPlan, plan_init: dict[str, str]) -> str:
    """The /init of the cost boot; ``plan_init`` holds the deps/helper lines and the load/unload blocks."""
    lines = [_PRELUDE.replace("__TTY__", RESULT_TTY), "DRAIN=300", "ip link set lo up"]
    lines.append('emit "{\\"type\\":\\"boot\\",\\"run\\":\\"cost\\",\\"release\\":\\"$(uname -r)\\"}"')
    lines.append(plan_init["deps"])
    lines.append(
        "measure() {\n"
        "\tT0=$(cut -d ' ' -f 1 /proc/uptime)\n"
        f"\t/bin/nq_udprace -r {cp.datagrams} -t 1 -f $2 -p {WORKLOAD_DPORT} -s $3 -w $DRAIN -n $1 > /tmp/c.json"
        " 2>/dev/null\n"
        "\tT1=$(cut -d ' ' -f 1 /proc/uptime)\n"
        '\temit "{\\"type\\":\\"cost\\",\\"pair\\":$4,\\"state\\":\\"$5\\",\\"kind\\":\\"$1\\",\\"family\\":\\"$2\\",'
        '\\"t0\\":$T0,\\"t1\\":$T1,\\"traffic\\":$(cat /tmp/c.json | head -n 1)}"\n'
        "}"
    )
    for pair in range(cp.pairs):
        # odd pairs run the patched phase first: an order effect (the guest still busy after boot or an unload,
        # conntrack expiring the previous phase's entries) must not land on one side every time
        order = ((0, "off"), (1, "on")) if pair % 2 == 0 else ((1, "on"), (0, "off"))
        for state, name in order:
            if state:
                lines.append(plan_init["load"])
            for fi, fam in enumerate(cp.families):
                sport = cp.sport(pair, state, fi)
                lines.append(f"measure new {fam} {sport} {pair} {name}")
                lines.append(f"measure established {fam} {sport} {pair} {name}")
            if state:
                lines.append(plan_init["unload"])
    lines.append(f"finish {EXIT_DONE}")
    return "\n".join(lines) + "\n"


@dataclass
class CostResult:
    strategy: str
    release: str
    plan: CostPlan
    seconds: float
    guest_exit: int | None
    records: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        return self.guest_exit == EXIT_DONE

    def _time(self, pair: int, state: str, kind: str, fam: str) -> float | None:
        for r in self.records:
            if (r.get("type"), r.get("pair"), r.get("state"), r.get("kind"), r.get("family")) == (
                "cost", pair, state, kind, fam):  # fmt: skip
                return float(r["t1"]) - float(r["t0"])
        return None

    def ratios(self) -> dict[str, dict[str, Any]]:
        """Per kind and family: throughput with the module / without, per pair, median and range; ns per packet."""
        out: dict[str, dict[str, Any]] = {}
        for kind in ("new", "established"):
            for fam in self.plan.families:
                per_pair, extra_ns = [], []
                for pair in range(self.plan.pairs):
                    off, on = self._time(pair, "off", kind, fam), self._time(pair, "on", kind, fam)
                    if off and on:
                        per_pair.append(off / on)
                        extra_ns.append((on - off) / self.plan.datagrams * 1e9)
                key = f"{kind}/ipv{fam}"
                out[key] = {"throughput_ratio": per_pair,
                            "median": statistics.median(per_pair) if per_pair else None,
                            "low": min(per_pair, default=None), "high": max(per_pair, default=None),
                            "extra_ns_per_packet_median": statistics.median(extra_ns) if extra_ns else None}
        return out

    def lost(self) -> int:
        return sum(int(r["traffic"].get("sent", 0)) - int(r["traffic"].get("received", 0))
                   for r in self.records if r.get("type") == "cost" and isinstance(r.get("traffic"), dict))  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "release": self.release, "pairs": self.plan.pairs,
                "datagrams": self.plan.datagrams, "seconds": self.seconds, "guest_exit": self.guest_exit,
                "completed": self.completed, "lost": self.lost(), "ratios": self.ratios(),
                "faults": [{"kind": f.kind, "title": f.title} for f in self.faults]}  # fmt: skip


def _records(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def run_cost(config: LabConfig, manifest: Manifest, cp: CostPlan, work_dir: Path | None = None) -> CostResult:
    """Boot once, alternating phases without and with ``manifest``'s module."""
    cp.check()
    check_built(manifest, config.kernel.release)
    with tempfile.TemporaryDirectory(prefix="nqgen-cost-", dir=work_dir) as tmp:
        work = Path(tmp)
        guest = Guest(config, work)
        plan, deps = plan_boot(guest, RunSpec(f"cost-{manifest.strategy}", manifest, False))
        assert plan.mitigation is not None
        m = plan.mitigation
        dep_lines = []
        for mod in plan.deps:
            cmd = f"load dep {_q(mod.name)} {_q(mod.path)} {'true' if mod.optional else 'false'}"
            dep_lines.append(cmd if mod.optional else f"{cmd} || finish {EXIT_DEP_FAILED}")
        helper_params = " ".join(_q(p) for p in plan.helper.params)
        dep_lines.append(f"load helper {_q(plan.helper.name)} {_q(plan.helper.path)} false {helper_params}"
                         f" || finish {EXIT_HELPER_FAILED}")  # fmt: skip
        load = f"MIT=0\nload mitigation {_q(m.name)} {_q(m.path)} false {' '.join(_q(p) for p in m.params)} && MIT=1"
        if plan.unload == "livepatch":
            load += "\n" + patched_block(plan)
        init = render_init(cp, {"deps": "\n".join(dep_lines), "load": load, "unload": unload_block(plan)})
        initramfs = guest.initramfs(plan, deps, manifest, init=init)
        outcome = boot_initramfs(config, initramfs, work / "cost", f"cost-{manifest.strategy}",
                                 smp=max(config.smp, 2))  # fmt: skip
    return CostResult(manifest.strategy, config.kernel.release, cp, round(outcome.seconds, 2), outcome.guest_exit,
                      _records(outcome.results), find_faults(outcome.console))  # fmt: skip
