"""The crash and its absence, on the vulnerable reference kernel (runs when `make repro-kernel` has built it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nqgen import reprokernel
from nqgen.repro import REPRO_MD, run

pytestmark = [pytest.mark.vm, pytest.mark.repro]


@pytest.fixture(scope="module")
def built() -> reprokernel.ReproKernel:
    rk = reprokernel.find_built()
    if rk is None:
        pytest.skip("the vulnerable reference kernel is not built: run `make repro-kernel` (about 15 min on 2 cores)")
    return rk


def test_baseline_crashes_and_replacing_strategies_do_not(built: reprokernel.ReproKernel, tmp_path: Path) -> None:
    out = tmp_path / "out"
    problems = run(out, repeat=1, rounds=500, jobs=2, strategies=("ftrace", "livepatch"), nfqueue_variants=False)
    assert problems == []
    text = (out / REPRO_MD).read_text()
    assert "| no mitigation | no | 1 | 1 |" in text
    assert "use-after-free" in text
    assert "| ftrace | no | 1 | 0 |" in text
    assert "| livepatch | no | 1 | 0 |" in text
