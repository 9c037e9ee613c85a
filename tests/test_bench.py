"""The short form of ``make bench``: the measuring machinery runs and nqgen's answers match binutils'.

No time is asserted here (speed goes to ``make bench`` as ratios); what is checked is that both sides of each
comparison found the same symbols and that the report holds what it claims.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import DebianKernel
from nqgen.bench import fleet, report, symbols, timing, whole
from nqgen.bench.command import run


def test_ratio_is_per_round_median_with_range() -> None:
    r = timing.ratio((2.0, 3.0, 10.0), (1.0, 1.0, 2.0))
    assert (r.median, r.low, r.high) == (3.0, 2.0, 5.0)
    with pytest.raises(ValueError):
        timing.ratio((1.0,), (1.0, 2.0))


def test_side_by_side_runs_every_subject_every_round_in_rotating_order() -> None:
    order: list[str] = []
    series = timing.side_by_side({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert all(len(s.wall) == 3 and len(s.cpu) == 3 for s in series.values())


def test_module_lookup_agrees_with_nm(debian: DebianKernel) -> None:
    if symbols.tools_missing():
        pytest.skip(str(symbols.tools_missing()))
    case = symbols.module_case(debian.nf_conntrack, rounds=1)
    assert case.agree, (case.found_nqgen, case.found_reference)
    assert "nf_confirm" in case.found_nqgen and "ipv4_conntrack_ops" in case.found_nqgen
    assert case.entries > 500


def test_kallsyms_lookup_agrees_with_grep(tmp_path: Path) -> None:
    listing = symbols.capture_kallsyms(tmp_path / "kallsyms.txt")
    if isinstance(listing, str):
        pytest.skip(listing)
    case = symbols.kallsyms_case(listing, rounds=1)
    assert case.agree, (case.found_nqgen, case.found_reference)
    assert case.found_reference, "the running kernel has none of the kernel functions nqgen relies on"


def test_synthetic_elf_lookup_agrees_with_nm(tmp_path: Path) -> None:
    if symbols.tools_missing():
        pytest.skip(str(symbols.tools_missing()))
    case = symbols.vmlinux_case(symbols.synthetic_elf(tmp_path / "elf", count=2000), rounds=1)
    assert case.agree and case.entries > 2000
    assert set(case.found_nqgen) == set(symbols.KERNEL_NAMES[:-1])


def test_capture_refuses_a_short_listing(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("ffffffff81000000 T _stext\n")
    assert "fewer than" in str(symbols.capture_kallsyms(tmp_path / "copy", source=short))
    assert not (tmp_path / "copy").exists()


def test_import_times_attribute_nqgen_and_its_libraries() -> None:
    per_pkg, cpu = whole.import_times(runs=1)
    assert "nqgen" in per_pkg and "click" in per_pkg
    assert cpu > 0


def test_bench_writes_tables_and_json(debian: DebianKernel, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) not installed")
    run(tmp_path, rounds=1, with_whole=False)
    printed = capsys.readouterr().out
    assert "nf_conntrack.ko" in printed and "kallsyms" in printed and "vmlinux" in printed
    doc = json.loads((tmp_path / "bench.json").read_text())
    labels = [c["label"] for c in doc["symbols"]]
    assert labels == ["nf_conntrack.ko", "vmlinux", "elf-107k (synthetic)", "kallsyms"]
    measured = [c for c in doc["symbols"] if "skipped" not in c]
    assert measured and all(c["agree"] for c in measured)
    assert all(c["cpu_ratio"]["low"] <= c["cpu_ratio"]["median"] <= c["cpu_ratio"]["high"] for c in measured)
    assert doc["whole"] == {"label": "whole", "skipped": "not asked for"}
    assert doc["machine"]["cores"] and report.SYMBOL_GOAL == 1.0


def test_fleet_bench_short_form(debian: DebianKernel, tmp_path: Path) -> None:
    """Two targets from the real trees and fixtures found here, with 1 and 2 workers: every one generated, and
    the report says which kernels the targets repeat."""
    bench = fleet.run_fleet_bench(tmp_path, debian.release, count=2, jobs_list=(1, 2))
    assert isinstance(bench, fleet.FleetBench), bench
    labels = [k.label for k in bench.kernels]
    assert labels[0] == f"debian {debian.release}" and any(k.kind == "fixture" for k in bench.kernels), labels
    for jobs in (1, 2):
        run_doc = bench.runs[jobs]
        assert (run_doc["targets"], run_doc["ok"], run_doc["exit_code"]) == (2, 2, 0), run_doc
    doc = bench.to_json()
    assert set(doc["kernels_per_second"]) == {"1", "2"} and doc["first_target_s"] > 0
    assert "repeated under new names" in fleet.fleet_table(bench)
