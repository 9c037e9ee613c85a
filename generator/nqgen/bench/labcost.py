"""``make bench`` part 3: the packet-path cost of built strategies in one lab boot each (``nqgen.lab.cost``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nqgen.lab.command import _default_image, _default_modules_dir, _inputs
from nqgen.lab.cost import CostPlan, CostResult, run_cost
from nqgen.lab.kernel import default_cache_dir, resolve_image
from nqgen.lab.manifest import discover
from nqgen.lab.runner import LabConfig


def run_costs(out: Path, strategies: tuple[str, ...], plan: CostPlan, timeout: float = 900.0) -> list[CostResult]:
    """One boot per strategy of a generated and built ``out`` directory, on the kernel it was generated for."""
    inputs: dict[str, Any] = _inputs(out)
    release = inputs.get("release") if isinstance(inputs.get("release"), str) else None
    kdir = Path(str(inputs["kdir"])) if inputs.get("kdir") else None
    image = resolve_image(_default_image(release, kdir), default_cache_dir())
    modules_dir = _default_modules_dir(image.release, inputs)
    config = LabConfig(kernel=image, modules_dir=modules_dir, kdir=kdir or modules_dir / "build", memory="512M",
                       timeout=timeout, logs_dir=out / "lab-logs")  # fmt: skip
    return [run_cost(config, manifest, plan) for manifest in discover(out, strategies)]


def cost_table(results: list[CostResult]) -> str:
    head = (f"{'strategy':<26} {'traffic':<16} {'throughput vs unpatched (range)':>32} {'extra ns/pkt':>12} "
            f"{'unpatched ns/pkt':>16} {'noise':>6}")  # fmt: skip
    rows = [head, "-" * len(head)]
    for res in results:
        if not res.completed or res.faults:
            rows.append(f"{res.strategy:<26} boot did not complete (exit {res.guest_exit}, {len(res.faults)} reports)")
            continue
        for key, r in res.ratios().items():
            if r["median"] is None:
                rows.append(f"{res.strategy:<26} {key:<16} not measured")
                continue
            span = f"{r['median']:.3f} ({r['low']:.3f}-{r['high']:.3f})"
            rows.append(f"{res.strategy:<26} {key:<16} {span:>32} {r['extra_ns_per_packet_median']:>12.0f} "
                        f"{r['unpatched_ns_per_packet']:>16.0f} {r['unpatched_spread']:>6.2f}")  # fmt: skip
        rows.append(f"{'':<26} lost datagrams: {res.lost()}, boot {res.seconds:.0f} s")
    return "\n".join(rows)


def lab_time_table(results: list[CostResult]) -> str:
    """The lab's own time: boots per minute and where each cost boot spent it (guest uptime marks)."""
    rows = [f"{'boot':<26} {'host s':>7} {'kernel to /init':>15} {'modules':>8} {'measuring':>10} "
            f"{'qemu+teardown':>13}"]  # fmt: skip
    total = 0.0
    for res in results:
        st = res.stages()
        total += res.seconds
        if not {"init", "ready", "measured"} <= st.keys():
            rows.append(f"{res.strategy:<26} {res.seconds:>7.1f}  (stages not reported)")
            continue
        rest = res.seconds - st["measured"]
        rows.append(f"{res.strategy:<26} {res.seconds:>7.1f} {st['init']:>15.1f} {st['ready'] - st['init']:>8.1f} "
                    f"{st['measured'] - st['ready']:>10.1f} {rest:>13.1f}")  # fmt: skip
    if results and total > 0:
        rows.append(f"{len(results)} boots in {total:.0f} s: {60 * len(results) / total:.2f} boots per minute")
    return "\n".join(rows)
