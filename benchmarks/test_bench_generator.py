"""Speed and memory targets of the generator (make bench). Not part of make test.

Targets, on the CI machine's size (2 cores): reading the Debian nf_conntrack.ko plus Module.symvers,
System.map and .config into a profile in under 2 s with under 300 MiB peak Python memory; rendering every
strategy into a fresh out/ in under 5 s.
"""

from __future__ import annotations

import os
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from nqgen.generate import generate
from nqgen.probe import build_profile, default_inputs

PROFILE_SECONDS = 2.0
PROFILE_PEAK_MIB = 300
RENDER_SECONDS = 5.0


def _debian_kdir() -> Path:
    root = Path(__file__).resolve().parents[1]
    release = subprocess.run([str(root / "scripts/debian-kernel")], capture_output=True, text=True).stdout.strip()
    kdir = Path("/lib/modules") / release / "build"
    if not release or not kdir.is_dir():
        pytest.skip("Debian kernel headers not installed (make deps)")
    return kdir


def test_profile_speed_and_memory(benchmark: BenchmarkFixture) -> None:
    os.environ["NQGEN_NO_CACHE"] = "1"
    inputs = default_inputs(kdir=_debian_kdir())
    profile = benchmark.pedantic(build_profile, args=(inputs,), rounds=3, iterations=1)
    assert profile.confirm["ipv4"].function == "ipv4_confirm"
    assert benchmark.stats is not None
    assert benchmark.stats.stats.max < PROFILE_SECONDS
    tracemalloc.start()
    build_profile(inputs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < PROFILE_PEAK_MIB * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB"


def test_render_all_speed(benchmark: BenchmarkFixture, tmp_path: Path) -> None:
    kdir = _debian_kdir()
    profile = build_profile(default_inputs(kdir=kdir))
    out = tmp_path / "out"
    result = benchmark.pedantic(generate, args=(profile, "all", out, str(kdir)), rounds=3, iterations=1)
    assert result.generated
    assert benchmark.stats is not None
    assert benchmark.stats.stats.max < RENDER_SECONDS
