"""Alternating rounds of several subjects, and ratios with their spread."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Series:
    """One subject's times, one per round, in seconds."""

    label: str
    wall: tuple[float, ...]
    cpu: tuple[float, ...]  # user+sys of this process and of the children it waited for

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)

    def to_json(self) -> dict[str, object]:
        return {"label": self.label, "wall_s": list(self.wall), "cpu_s": list(self.cpu),
                "median_wall_s": self.median_wall, "median_cpu_s": self.median_cpu}  # fmt: skip


@dataclass(frozen=True)
class Ratio:
    """``subject / reference``: the median of the per-round ratios and their range (same round, side by side)."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f})"

    def to_json(self) -> dict[str, float]:
        return {"median": self.median, "low": self.low, "high": self.high}


def _cpu_now() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def side_by_side(subjects: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, Series]:
    """Run every subject once per round, rotating the order each round so none always runs first (warm caches)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    labels = list(subjects)
    walls: dict[str, list[float]] = {label: [] for label in labels}
    cpus: dict[str, list[float]] = {label: [] for label in labels}
    for round_no in range(rounds):
        shift = round_no % len(labels)
        for label in labels[shift:] + labels[:shift]:
            cpu0, wall0 = _cpu_now(), time.perf_counter()
            subjects[label]()
            walls[label].append(time.perf_counter() - wall0)
            cpus[label].append(_cpu_now() - cpu0)
    return {label: Series(label, tuple(walls[label]), tuple(cpus[label])) for label in labels}


def ratio(subject: tuple[float, ...], reference: tuple[float, ...]) -> Ratio:
    """Per-round ratios of two series measured in the same rounds."""
    if len(subject) != len(reference) or not subject:
        raise ValueError("ratio needs two series of the same non-zero length")
    per_round = [s / max(r, 1e-9) for s, r in zip(subject, reference, strict=True)]
    return Ratio(statistics.median(per_round), min(per_round), max(per_round))
