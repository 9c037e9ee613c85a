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
    head = f"{'strategy':<28} {'traffic':<18} {'throughput vs unpatched (range)':>32} {'extra ns/packet':>16}"
    rows = [head, "-" * len(head)]
    for res in results:
        if not res.completed or res.faults:
            rows.append(f"{res.strategy:<28} boot did not complete (exit {res.guest_exit}, {len(res.faults)} reports)")
            continue
        for key, r in res.ratios().items():
            if r["median"] is None:
                rows.append(f"{res.strategy:<28} {key:<18} not measured")
                continue
            span = f"{r['median']:.3f} ({r['low']:.3f}-{r['high']:.3f})"
            rows.append(f"{res.strategy:<28} {key:<18} {span:>32} {r['extra_ns_per_packet_median']:>16.0f}")
        rows.append(f"{'':<28} lost datagrams: {res.lost()}, boot {res.seconds:.0f} s")
    return "\n".join(rows)
