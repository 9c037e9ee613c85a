"""The lab's hook-swap scenarios, on kernels with per-netns ``nf_hook_entries`` tables (4.16+).

``race``: registrations of a no-op hook loop in init_net while hook-swap is unloaded, each held between
the copy of the table (conntrack's confirm slot included) and its publication by a SCHED_FIFO spinner
(the guest boots with ``preempt=full``; Debian's PREEMPT_DYNAMIC kernel takes it). After every unload
the helper checks that no hook table of init_net points at an address no symbol covers (freed module
text); a health flow then runs through POST_ROUTING, where such a pointer is executed.

``window``: from a fresh network namespace the helper enables conntrack (the first conntrack rule of a
new container) and measures how long the new confirm slot still calls the original confirm, for IPv4 and
IPv6; it then puts conntrack back (its hooks are unregistered) and enables it again in the same namespace:
the hooks re-registered on demand are measured as well.

``unmatched``: conntrack is loaded but not enabled in init_net, and the helper registers a no-op hook at the
confirm priority there (what a kernel whose confirm slots hold unrecognisable addresses, CFI, shows): the module
must say it swapped nothing and count it.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import InputError
from . import build
from .guest import (
    _PRELUDE,
    EXIT_DEP_FAILED,
    EXIT_DONE,
    EXIT_HELPER_FAILED,
    HEALTH_DPORT,
    RESULT_TTY,
    SPORT_BASE,
    GuestModule,
    _q,
)
from .manifest import Manifest
from .results import Fault, find_faults
from .runner import Guest, LabConfig, RunSpec, boot_initramfs, check_built, plan_boot

Kind = Literal["race", "window", "unmatched"]
HELPER = "nqlab_hookrace"
HELPER_GUEST = f"/nqlab/{HELPER}.ko"
PARAMS = f"/sys/module/{HELPER}/parameters"
APPEND = "preempt=full no_timer_check"  # no_timer_check: a loaded TCG host can fail the IO-APIC timer check
_PASSES_RE = re.compile(r"restored in (\d+) slot\(s\), (\d+) pass\(es\)")


@dataclass(frozen=True)
class Scenario:
    """What one hook-swap scenario boot does."""

    kind: Kind
    cycles: int = 3  # race: load/unload cycles (the boot stops at the first stale pointer)
    race_ms: int = 600  # race: registrations run this long before each unload
    delay_ms: int = 300  # race: each registration is held this long between copy and publish
    samples: int = 8  # window: rounds of fresh namespaces (one per family, each measured twice: new and again)
    params: tuple[str, ...] = ()  # the module's parameters (default: none, its own interval_ms)
    # window: disarm every kprobe after the load (debugfs kprobes/enabled = 0), so the module's kretprobe on
    # nf_hook_entries_grow never fires: what a kernel without kretprobes, or a missed one, leaves to the rescan
    kprobes_off: bool = False


@dataclass
class ScenarioResult:
    """What the guest reported for one scenario boot."""

    kind: Kind
    module: str
    release: str
    params: tuple[str, ...]
    seconds: float
    guest_exit: int | None
    timed_out: bool
    records: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        return self.guest_exit == EXIT_DONE and any(r.get("type") == "done" for r in self.records)

    @property
    def cycles(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == "hookrace"]

    @property
    def windows_us(self) -> list[int | None]:
        return [r.get("window_us") for r in self.records if r.get("type") == "window"]

    @property
    def windows_by_kind(self) -> dict[str, list[int | None]]:
        """window: the measured windows per "IPv<family> <phase>" (new namespace / registered again there)."""
        out: dict[str, list[int | None]] = {}
        for r in self.records:
            if r.get("type") == "window":
                out.setdefault(f"IPv{r.get('family', 4)} {r.get('phase', 'new')}", []).append(r.get("window_us"))
        return out

    @property
    def problems(self) -> list[str]:
        """Why this boot shows the mitigation wrong (empty: it passed)."""
        out: list[str] = []
        if self.faults:
            out.append(f"{len(self.faults)} kernel report(s): {self.faults[0].title}")
        if not self.completed:
            out.append("the guest did not finish" + (" (timed out)" if self.timed_out else ""))
        if self.kind == "race":
            stale = sum(int(c.get("stale") or 0) for c in self.cycles)
            if stale:
                out.append(f"{stale} stale hook pointer(s) in init_net after unload")
            if any(c.get("rmmod_rc") != 0 for c in self.cycles):
                out.append("rmmod failed")
        elif self.kind == "window":
            w = self.windows_us
            if not w or any(x is None or x < 0 for x in w):
                out.append("a new registration was never swapped (or not measured)")
        else:
            if not self.unmatched:
                out.append("the module did not count the unrecognised confirm-priority hook (unmatched = 0)")
            if not self.warned:
                out.append("the module did not warn that it swapped nothing")
        return out

    @property
    def unmatched(self) -> int:
        """unmatched: the module's counter after load."""
        return sum(int(r.get("unmatched") or 0) for r in self.records if r.get("type") == "unmatched")

    @property
    def warned(self) -> bool:
        """unmatched: the module's load printed the warning."""
        for r in self.records:
            if r.get("type") == "insmod" and r.get("role") == "mitigation":
                text = base64.b64decode(str(r.get("dmesg_b64") or "")).decode("utf-8", "replace")
                return "none calls a known confirm function" in text
        return False

    @property
    def exercised(self) -> bool:
        """race: registrations were held across an unload (otherwise the boot proves nothing)."""
        return any(int(c.get("held") or 0) > 0 for c in self.cycles)

    def to_dict(self) -> dict[str, Any]:
        w = [x for x in self.windows_us if isinstance(x, int) and x >= 0]
        return {
            "scenario": self.kind,
            "module": self.module,
            "release": self.release,
            "params": list(self.params),
            "kprobes_enabled": next((r.get("enabled") for r in self.records if r.get("type") == "kprobes"), None),
            "append": APPEND,
            "seconds": self.seconds,
            "guest_exit": self.guest_exit,
            "timed_out": self.timed_out,
            "completed": self.completed,
            "cycles": [{k: v for k, v in c.items() if k not in ("type", "dmesg_b64")} for c in self.cycles],
            "windows_us": self.windows_us,
            "windows_by_kind": self.windows_by_kind,
            "window_ms_max": round(max(w) / 1000, 1) if w else None,
            "window_ms_mean": round(sum(w) / len(w) / 1000, 1) if w else None,
            "exercised": self.exercised if self.kind == "race" else None,
            "unmatched": self.unmatched if self.kind == "unmatched" else None,
            "warned": self.warned if self.kind == "unmatched" else None,
            "faults": [{"kind": f.kind, "title": f.title, "frames": f.frames} for f in self.faults],
            "problems": self.problems,
        }


def render_init(sc: Scenario, deps: tuple[GuestModule, ...], helper: GuestModule, mitigation: GuestModule) -> str:
    """The /init of one scenario boot (the lab's prelude: load, log, emit, traffic, finish)."""
    m = _q(mitigation.name)
    params = " ".join(_q(p) for p in mitigation.params)
    lines = [_PRELUDE.replace("__TTY__", RESULT_TTY)]
    lines += ["FAMILIES=4", "DRAIN=500", f"P={PARAMS}", "ip link set lo up"]
    lines.append(
        f'emit "{{\\"type\\":\\"boot\\",\\"run\\":\\"hook-swap-{sc.kind}\\",\\"release\\":\\"$(uname -r)\\"}}"'
    )
    for mod in deps:
        cmd = f"load dep {_q(mod.name)} {_q(mod.path)} {'true' if mod.optional else 'false'}"
        lines.append(cmd if mod.optional else f"{cmd} || finish {EXIT_DEP_FAILED}")
    helper_params = " ".join(_q(p) for p in helper.params)
    if sc.kind != "unmatched":  # there conntrack stays off in init_net: only the look-alike hook is there
        lines.append(
            f"load helper {_q(helper.name)} {_q(helper.path)} false {helper_params} || finish {EXIT_HELPER_FAILED}"
        )
    race_params = f"delay_ms={sc.delay_ms}" + (" fake_confirm=1" if sc.kind == "unmatched" else "")
    if sc.kind == "window":
        race_params += " limit_ms=15000"  # the rescan fallback takes up to interval_ms; a loaded host adds more
    lines.append(f"load helper {HELPER} {HELPER_GUEST} false {race_params} || finish {EXIT_HELPER_FAILED}")
    load = f"load mitigation {m} {_q(mitigation.path)} false {params}"
    if sc.kind == "race":
        lines.append(
            "i=1\n"
            f"while [ $i -le {sc.cycles} ]; do\n"
            f"\t{load} || break\n"
            '\techo 1 > $P/race || emit "{\\"type\\":\\"error\\",\\"what\\":\\"race-start\\"}"\n'
            f"\tusleep {sc.race_ms * 1000}\n"
            "\tlog before-unload\n"
            f"\trmmod {m} 2>/tmp/unload.err\n"
            "\tRRC=$?\n"
            "\tdmesg -c > /tmp/kmsg 2>/dev/null\n"
            "\techo 0 > $P/race\n"
            "\tST=$(cat $P/stale); RD=$(cat $P/rounds); HD=$(cat $P/held); WA=$(cat $P/watched)\n"
            '\temit "{\\"type\\":\\"hookrace\\",\\"cycle\\":$i,\\"rmmod_rc\\":$RRC,\\"stale\\":$ST,\\"watched\\":$WA,'
            '\\"rounds\\":$RD,\\"held\\":$HD,\\"dmesg_b64\\":\\"$(b64 /tmp/kmsg)\\"}"\n'
            "\tlog after-check\n"
            '\t[ "$ST" = 0 ] || break\n'
            "\ti=$((i + 1))\n"
            "done"
        )
        # one flow through POST_ROUTING: a stale slot there is executed
        lines.append(f"traffic health 20 {HEALTH_DPORT} {SPORT_BASE} 1")
    elif sc.kind == "unmatched":
        lines.append(f"{load} || finish {EXIT_HELPER_FAILED}")
        lines.append(f"U=$(cat {_q(f'/sys/kernel/{mitigation.name}/unmatched')} 2>/dev/null)")
        lines.append("case \"$U\" in ''|*[!0-9]*) U=null;; esac")
        lines.append('emit "{\\"type\\":\\"unmatched\\",\\"unmatched\\":$U}"')
        lines.append(f"log before-unload\nrmmod {m}")
    else:
        lines.append(f"{load} || finish {EXIT_HELPER_FAILED}")
        if sc.kprobes_off:
            lines.append(
                "mount -t debugfs none /sys/kernel/debug 2>/dev/null\n"
                "echo 0 > /sys/kernel/debug/kprobes/enabled || finish " + str(EXIT_HELPER_FAILED) + "\n"
                'emit "{\\"type\\":\\"kprobes\\",\\"enabled\\":$(cat /sys/kernel/debug/kprobes/enabled)}"'
            )
        # per sample and family, one fresh namespace: conntrack's hooks registered there for the first time
        # ("new"), then, after the helper put conntrack back (hooks unregistered), registered again ("again")
        lines.append(
            "i=1\n"
            f"while [ $i -le {sc.samples} ]; do\n"
            "\tfor fam in 4 6; do\n"
            "\t\techo $fam > $P/family\n"
            '\t\tW=$(unshare -n sh -c "echo 1 > $P/measure && cat $P/window_us && echo 1 > $P/measure && '
            'cat $P/window_us" 2>/tmp/m.err)\n'
            "\t\tset -- $W\n"
            "\t\tfor phase in new again; do\n"
            "\t\t\tW=$1; shift 2>/dev/null\n"
            "\t\t\tcase \"$W\" in ''|*[!0-9-]*) W=null;; esac\n"
            '\t\t\temit "{\\"type\\":\\"window\\",\\"sample\\":$i,\\"family\\":$fam,\\"phase\\":\\"$phase\\",'
            '\\"window_us\\":$W,\\"stderr_b64\\":\\"$(b64 /tmp/m.err)\\"}"\n'
            "\t\tdone\n"
            "\tdone\n"
            "\tusleep $(( (i * 137) % 500 * 1000 ))\n"
            "\ti=$((i + 1))\n"
            "done"
        )
        lines.append(f"log before-unload\nrmmod {m}")
    lines.append(f"finish {EXIT_DONE}")
    return "\n".join(lines) + "\n"


def _records(text: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("type") == "hookrace" and isinstance(rec.get("dmesg_b64"), str):
            dmesg = base64.b64decode(rec["dmesg_b64"]).decode("utf-8", "replace")
            m = _PASSES_RE.search(dmesg)
            rec["restored"], rec["passes"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
        out.append(rec)
    return out


def run_scenario(config: LabConfig, manifest: Manifest, sc: Scenario, work_dir: Path | None = None) -> ScenarioResult:
    """Boot once for scenario ``sc`` with the hook-swap module of ``manifest``."""
    if manifest.strategy != "hook-swap":
        raise InputError(f"the hook-swap scenarios need the hook-swap module, not {manifest.strategy}")
    check_built(manifest, config.kernel.release)
    with tempfile.TemporaryDirectory(prefix="nqgen-hookswap-", dir=work_dir) as tmp:
        work = Path(tmp)
        guest = Guest(config, work)
        race_ko = build.build_module(build.guest_source(f"{HELPER}.c"), HELPER, config.kdir, work / HELPER)
        plan, deps = plan_boot(guest, RunSpec(f"hook-swap-{sc.kind}", manifest, False), [race_ko])
        assert plan.mitigation is not None
        mitigation = GuestModule(plan.mitigation.name, plan.mitigation.path, "mitigation", sc.params)
        init = render_init(sc, plan.deps, plan.helper, mitigation)
        initramfs = guest.initramfs(plan, deps, manifest, init=init, extra={HELPER_GUEST: race_ko})
        outcome = boot_initramfs(
            config,
            initramfs,
            work / "boot",
            f"hook-swap-{sc.kind}",
            smp=max(config.smp, 2),
            append=f"{APPEND} {config.append}".strip(),
        )
    return ScenarioResult(
        kind=sc.kind,
        module=manifest.module,
        release=config.kernel.release,
        params=sc.params,
        seconds=round(outcome.seconds, 2),
        guest_exit=outcome.guest_exit,
        timed_out=outcome.timed_out,
        records=_records(outcome.results),
        faults=find_faults(outcome.console),
    )
