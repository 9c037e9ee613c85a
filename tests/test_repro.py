"""The crash and its absence on vulnerable kernels (each runs when its kernel is built, else skips with why).

The Debian 6.1 reference kernel comes from `make repro-kernel`; the RHEL 7.7 and RHEL 8.1 kernels (and RHEL 8.1
with the conntrack extension freed at once) from the kernel builder (`nqgen kernel build RECIPE`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from nqgen.errors import BuildError
from nqgen.repro import REPRO_MD, Target, find_target, run

pytestmark = [pytest.mark.vm, pytest.mark.repro]


@pytest.fixture(scope="module")
def built() -> Target:
    target = find_target()
    if target is None:
        pytest.skip("the vulnerable reference kernel is not built: run `make repro-kernel` (about 15 min on 2 cores)")
    return target


def _baseline_stale(out: Path) -> int:
    lab = json.loads((out / "lab.json").read_text())
    return sum(int(r["derived"]["stale_uses"] or 0) for r in lab["runs"] if r["kind"] == "baseline")


def test_baseline_crashes_and_replacing_strategies_do_not(built: Target, tmp_path: Path) -> None:
    out = tmp_path / "out"
    problems = run(out, repeat=1, rounds=500, jobs=2, strategies=("ftrace", "livepatch"), nfqueue_variants=False)
    assert problems == []
    text = (out / REPRO_MD).read_text()
    assert "| no mitigation | no | 1 | 1 |" in text
    assert "use-after-free" in text
    assert "| ftrace | no | 1 | 0 |" in text
    assert "| livepatch | no | 1 | 0 |" in text
    # the lab's stale-use detector sees what KASAN sees on this kernel
    assert _baseline_stale(out) > 0


# recipe -> (strategies of the short form, a kernel report title the baseline must show, or None)
RHEL_SHORT = {
    "rhel77": (("ftrace", "livepatch"), None),  # 3.10: no KASAN, the detector is the evidence
    "rhel81": (("ftrace", "livepatch"), None),  # 4.18 KASAN cannot see it (kfree_rcu of the extension)
    "rhel81-kasan-free": (("ftrace",), "BUG: KASAN: use-after-free"),  # extension freed at once: KASAN sees it
}


def _rhel_target(recipe: str) -> Target:
    if importlib.util.find_spec("nqgen.kernels") is None:
        pytest.skip(f"{recipe}: the kernel builder (nqgen.kernels) is not in this tree")
    try:
        target = find_target(recipe)
    except BuildError as exc:
        pytest.skip(f"{recipe}: {exc}")
    if target is None:
        pytest.skip(f"the {recipe} kernel is not built: run `nqgen kernel build {recipe}` (15-45 min on 2 cores)")
    return target


@pytest.mark.parametrize("recipe", sorted(RHEL_SHORT))
def test_rhel_baseline_shows_the_stale_use_and_replacing_strategies_do_not(recipe: str, tmp_path: Path) -> None:
    _rhel_target(recipe)
    strategies, report = RHEL_SHORT[recipe]
    out = tmp_path / "out"
    problems = run(out, repeat=1, rounds=500, jobs=2, strategies=strategies, nfqueue_variants=False, recipe=recipe)
    assert problems == []
    text = (out / REPRO_MD).read_text()
    lab = json.loads((out / "lab.json").read_text())
    assert lab["guest"]["detector"], lab["guest"]["detector_reason"]
    if report is None:
        assert _baseline_stale(out) > 0
    else:
        assert report in text
    for name in strategies:
        assert f"| {name} | no | 1 | 0 |" in text
