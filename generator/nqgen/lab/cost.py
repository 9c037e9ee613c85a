"""Packet-path cost of one strategy: one boot alternating phases without and with its module (no consumer queue).

Each phase runs ``nq_pktcost`` once: per family it binds ``datagrams`` UDP sockets to fresh loopback source ports
(untimed), then times with the guest's CLOCK_MONOTONIC, in the sender itself, one datagram from every socket (new
flows: each creates and confirms a conntrack entry) and ``repeat`` more from every socket (established flows: the
entries exist, the confirm returns early). The loopback receive runs in the sender's softirq, so both directions'
hooks are in the time; receiving is outside it. With ``icount`` the boot runs under ``qemu -icount
shift=N,sleep=off``: the guest's clock then counts executed instructions, so a loaded host cannot inflate the
timings; in real time (the default, see CostPlan.icount) a shared 2-core host gave 1-2 ms per datagram with the
unpatched phases spreading 40-175%. ``pairs`` (without, with) phase pairs alternate
their order (ABBA), the module is loaded and unloaded between phases (outside the timing), and the ratio is taken
per pair. The spread of the unpatched
phases among themselves is reported as the noise floor the ratios must be read against.
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
KINDS = ("new", "established")
CT_MAX = 262144  # every phase's entries stay (30 s UDP timeout): the table must not fill during the boot


@dataclass(frozen=True)
class CostPlan:
    pairs: int = 8  # (without, with) phase pairs
    datagrams: int = 500  # sockets (new flows) per phase and family
    repeat: int = 4  # established: datagrams per socket after the first
    families: tuple[str, ...] = ("4", "6")
    # qemu -icount shift (None: real time). With 0 the guest clock advances 1 ns per executed instruction and the
    # sender's timings count the guest's own instructions: a loaded host slows the boot, not the measurement. Off by
    # default: icount TCG ran about 2.7 M instructions per host second on this loaded 2-core host (0.16 s of guest
    # boot in 60 s), far too slow for a boot per strategy here; `make bench BENCH_ARGS=--cost-icount 0` on a
    # machine with time to spare
    icount: int | None = None

    def sport(self, pair: int, state: int) -> int:
        """The first source port of one phase (pair, state 0/1): phases never share a flow."""
        return SPORT_FIRST + (pair * 2 + state) * self.datagrams

    def count(self, kind: str) -> int:
        return self.datagrams * (self.repeat if kind == "established" else 1)

    def check(self) -> None:
        if self.sport(self.pairs, 0) > SPORT_LAST:
            raise InputError(f"{self.pairs} pairs of {self.datagrams} datagrams need more source ports than exist")


def render_init(cp: CostPlan, plan_init: dict[str, str]) -> str:
    """The /init of the cost boot; ``plan_init`` holds the deps/helper lines and the load/unload blocks."""
    lines = [_PRELUDE.replace("__TTY__", RESULT_TTY), "ip link set lo up"]
    lines.append('up() { cut -d " " -f 1 /proc/uptime; }')
    lines.append('emit "{\\"type\\":\\"boot\\",\\"run\\":\\"cost\\",\\"release\\":\\"$(uname -r)\\",'
                 '\\"uptime\\":$(up)}"')
    lines.append(plan_init["deps"])
    lines.append(f"echo {CT_MAX} > /proc/sys/net/netfilter/nf_conntrack_max 2>/dev/null")
    lines.append('emit "{\\"type\\":\\"stage\\",\\"stage\\":\\"ready\\",\\"uptime\\":$(up)}"')
    fams = "".join(cp.families)
    lines.append(
        "measure() {\n"
        f"\t/bin/nq_pktcost -f {fams} -n {cp.datagrams} -e {cp.repeat} -s $1 -p {WORKLOAD_DPORT} > /tmp/c.json"
        " 2>/tmp/c.err\n"
        "\twhile read -r line; do\n"
        '\t\temit "{\\"type\\":\\"cost\\",\\"pair\\":$2,\\"state\\":\\"$3\\",\\"sample\\":$line}"\n'
        "\tdone < /tmp/c.json\n"
        "}"
    )
    for pair in range(cp.pairs):
        # odd pairs run the patched phase first: an order effect (the guest still busy after boot or an unload,
        # conntrack expiring earlier phases' entries) must not land on one side every time
        order = ((0, "off"), (1, "on")) if pair % 2 == 0 else ((1, "on"), (0, "off"))
        for state, name in order:
            if state:
                lines.append(plan_init["load"])
            lines.append(f"measure {cp.sport(pair, state)} {pair} {name}")
            if state:
                lines.append(plan_init["unload"])
    lines.append('emit "{\\"type\\":\\"stage\\",\\"stage\\":\\"measured\\",\\"uptime\\":$(up)}"')
    lines.append(f"finish {EXIT_DONE}")
    return "\n".join(lines) + "\n"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


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

    def _ns(self, pair: int, state: str, kind: str, fam: str) -> float | None:
        for r in self.records:
            sample = r.get("sample")
            if (r.get("type"), r.get("pair"), r.get("state")) != ("cost", pair, state) or not isinstance(sample, dict):
                continue
            if (sample.get("kind"), sample.get("family")) == (kind, f"ipv{fam}"):
                return float(sample["ns"])
        return None

    def ratios(self) -> dict[str, dict[str, Any]]:
        """Per kind and family: throughput with the module / without per pair (off time / on time), median and
        range; extra ns per packet (median of the pairs); unpatched ns per packet and its spread (the noise)."""
        out: dict[str, dict[str, Any]] = {}
        for kind in KINDS:
            n = self.plan.count(kind)
            for fam in self.plan.families:
                per_pair, extra_ns, offs = [], [], []
                for pair in range(self.plan.pairs):
                    off, on = self._ns(pair, "off", kind, fam), self._ns(pair, "on", kind, fam)
                    if off:
                        offs.append(off / n)
                    if off and on:
                        per_pair.append(off / on)
                        extra_ns.append((on - off) / n)
                base = _median(offs)
                noise = (max(offs) - min(offs)) / base if offs and base else None
                out[f"{kind}/ipv{fam}"] = {
                    "throughput_ratio": [round(x, 4) for x in per_pair],
                    "median": _median(per_pair), "low": min(per_pair, default=None),
                    "high": max(per_pair, default=None),
                    "extra_ns_per_packet_median": _median(extra_ns),
                    "unpatched_ns_per_packet": base,
                    "unpatched_spread": noise,
                }  # fmt: skip
        return out

    def lost(self) -> int:
        return sum(int(r["sample"].get("sent", 0)) - int(r["sample"].get("received", 0))
                   for r in self.records if r.get("type") == "cost" and isinstance(r.get("sample"), dict))  # fmt: skip

    def stages(self) -> dict[str, float]:
        """Where the boot spent its time: guest uptime at /init, after the modules, after the measuring."""
        out: dict[str, float] = {}
        for r in self.records:
            if r.get("type") == "boot" and "uptime" in r:
                out["init"] = float(r["uptime"])
            elif r.get("type") == "stage":
                out[str(r.get("stage"))] = float(r["uptime"])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "release": self.release, "pairs": self.plan.pairs,
                "clock": "real time" if self.plan.icount is None else f"qemu -icount shift={self.plan.icount}",
                "datagrams": self.plan.datagrams, "repeat": self.plan.repeat, "seconds": self.seconds,
                "guest_exit": self.guest_exit, "completed": self.completed, "lost": self.lost(),
                "stages_uptime_s": self.stages(), "ratios": self.ratios(),
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
                                 smp=max(config.smp, 2), icount=cp.icount)  # fmt: skip
    return CostResult(manifest.strategy, config.kernel.release, cp, round(outcome.seconds, 2), outcome.guest_exit,
                      _records(outcome.results), find_faults(outcome.console))  # fmt: skip


# --- COMPARISON.md: cost columns from a cost.json (``make bench`` writes one beside the out/ it measured) --------

COST_JSON = "cost.json"


def write_cost_json(out: Path, results: list[CostResult], date: str) -> Path:
    """``out/cost.json``: the measured cost of the strategies of ``out`` (read by ``nqgen.compare``)."""
    doc = {"date": date, "release": results[0].release if results else None,
           "results": [r.to_dict() for r in results]}  # fmt: skip
    path = out / COST_JSON
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _pair(ratios: dict[str, Any], kind: str, key: str, fmt: str) -> str:
    cells = []
    for fam in ("4", "6"):
        value = ratios.get(f"{kind}/ipv{fam}", {}).get(key)
        cells.append("-" if value is None else format(value, fmt))
    return " / ".join(cells)


def cost_columns(doc: dict[str, Any], release: str) -> tuple[dict[str, dict[str, str]], str]:
    """Per strategy the cost cells, and the note that says what they mean (or why there are none)."""
    if doc.get("release") != release:
        return {}, (f"Packet-path cost: the cost.json here was measured on {doc.get('release')}, not on {release}: "
                    "not shown.")  # fmt: skip
    cols: dict[str, dict[str, str]] = {}
    noise: list[float] = []
    pairs = None
    for res in doc.get("results", []):
        if not res.get("completed") or res.get("faults"):
            cols[res["strategy"]] = {"throughput established (v4 / v6)": "boot failed"}
            continue
        ratios = res["ratios"]
        pairs = res.get("pairs")
        noise += [r["unpatched_spread"] for r in ratios.values() if r.get("unpatched_spread") is not None]
        cols[res["strategy"]] = {
            "throughput established (v4 / v6)": _pair(ratios, "established", "median", ".3f"),
            "throughput new (v4 / v6)": _pair(ratios, "new", "median", ".3f"),
            "extra ns/packet new (v4 / v6)": _pair(ratios, "new", "extra_ns_per_packet_median", ".0f"),
        }
    spread = f"{statistics.median(noise):.0%}" if noise else "unknown"
    clock = next((r.get("clock") for r in doc.get("results", []) if r.get("clock")), "real time")
    note = (f"Packet-path cost (measured by `make bench` on {release}, {doc.get('date')}, qemu TCG, guest clock: "
            f"{clock}): throughput with "
            f"the module / without, median of {pairs} alternating pairs of phases in one boot per strategy, timed "
            "by the guest's sender; 1.000 = no cost, below 1 = slower. Goals: at least 0.97 established, 0.90 new. "
            f"The unpatched phases alone spread by {spread} (median over families and kinds): differences smaller "
            "than that are noise. '-': not measured.")  # fmt: skip
    return cols, note
