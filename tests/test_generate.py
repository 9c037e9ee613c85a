"""End to end on the real Debian kernel: generate every strategy, compile it for real, check the result."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import DebianBuilt, DebianKernel, make_jobs, run_nqgen
from nqgen.strategies import NAMES


@pytest.fixture(scope="module")
def built_out(debian_built: DebianBuilt) -> tuple[Path, str]:
    """`nqgen --strategy all` for the Debian kernel and `make -C out` (conftest: one build for the session)."""
    return debian_built.out, debian_built.log


def test_all_strategies_generated_on_debian(built_out: tuple[Path, str]) -> None:
    out, _ = built_out
    for name in NAMES:
        manifest = json.loads((out / name / "nqgen-module.json").read_text())
        assert manifest["strategy"] == name
        assert (out / name / manifest["ko"]).is_file()
    assert (out / "COMPARISON.md").is_file()
    # only the shared C a strategy links is in its tree
    assert not (out / "advance-confirm" / "nq_confirm.c").exists()  # it calls the kernel's own confirm
    assert (out / "advance-confirm-corrected" / "nq_confirm.c").is_file()
    assert not (out / "ftrace" / "nq_hooks.c").exists()  # it registers no netfilter hook
    assert not (out / "livepatch" / "nq_resolve.c").exists()  # livepatch resolves the symbols itself
    comparison = json.loads((out / "comparison.json").read_text())
    assert [row["strategy"] for row in comparison["strategies"]] == list(NAMES)
    inputs = json.loads((out / "inputs.json").read_text())
    assert inputs["generated"] == list(NAMES)
    assert "module" in inputs["sources"] or any("nf_conntrack" in v for v in inputs["sources"].values())


def test_build_has_no_compiler_warnings(built_out: tuple[Path, str]) -> None:
    _, log = built_out
    assert not re.search(r"\bwarning:", log, re.IGNORECASE), log
    assert "ok advance-confirm" in log  # nqgen verify ran as part of `make -C out`


def test_modinfo_shows_params_and_target_vermagic(built_out: tuple[Path, str], debian: DebianKernel) -> None:
    out, _ = built_out
    ko = out / "advance-confirm" / "nq_advance_confirm.ko"
    info = subprocess.run(["/sbin/modinfo", str(ko)], capture_output=True, text=True, check=True).stdout
    assert re.search(rf"^vermagic:\s+{re.escape(debian.release)} ", info, re.MULTILINE), info
    for param in ("queues", "confirm", "bypass"):
        assert re.search(rf"^parm:\s+{param}:", info, re.MULTILINE), info
    target = subprocess.run(
        ["/sbin/modinfo", "-F", "vermagic", str(debian.nf_conntrack)], capture_output=True, text=True, check=True
    ).stdout
    ours = subprocess.run(["/sbin/modinfo", "-F", "vermagic", str(ko)], capture_output=True, text=True, check=True)
    assert ours.stdout == target


def test_profile_json_names_confirm_anchor_and_hooks(debian: DebianKernel, tmp_path: Path) -> None:
    res = run_nqgen(
        ["--profile-only", "--kdir", str(debian.kdir), "--module", str(debian.nf_conntrack)], cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "out").exists()
    profile = json.loads(res.stdout)
    ipv4 = profile["confirm"]["ipv4"]
    assert ipv4["function"] == "ipv4_confirm"
    assert ipv4["anchor"] == "nf_confirm"
    assert ipv4["delta"] == 0x120
    hooks = {(h["hook_name"], h["priority"]) for h in ipv4["hooks"] if h["hook"] == "ipv4_confirm"}
    assert hooks == {("POST_ROUTING", 2147483647), ("LOCAL_IN", 2147483647)}
    assert profile["features"]["fix_present"] is True
    assert profile["release"] == debian.release


@pytest.mark.parametrize("strategy", ["ftrace", "advance-confirm"])
def test_design_card_commands(strategy: str, debian: DebianKernel, tmp_path: Path) -> None:
    # Exactly as the design card writes them; the target comes from NQGEN_KDIR because this machine's
    # running kernel is not the Debian kernel the suite targets.
    res = run_nqgen(["--strategy", strategy], cwd=tmp_path, env={"NQGEN_KDIR": str(debian.kdir)})
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == [strategy]
    assert "already carries the upstream fix" in res.stderr
    make = subprocess.run(
        ["make", *make_jobs(), "-C", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert make.returncode == 0, make.stderr[-2000:]


def test_not_applicable_exit_code(debian: DebianKernel, tmp_path: Path) -> None:
    config = tmp_path / "config"
    text = debian.config.read_text().replace("CONFIG_LIVEPATCH=y", "# CONFIG_LIVEPATCH is not set")
    config.write_text(text)
    args = ["--kdir", str(debian.kdir), "--module", str(debian.nf_conntrack), "--config", str(config)]
    res = run_nqgen(["--strategy", "livepatch", *args], cwd=tmp_path)
    assert res.returncode == 77
    assert res.stderr.strip().splitlines()[-1].startswith("nqgen: error: livepatch cannot work")
    assert not (tmp_path / "out").exists()
    res = run_nqgen(["--strategy", "all", *args], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "skipping livepatch: CONFIG_LIVEPATCH is not set" in res.stdout
    assert not (tmp_path / "out" / "livepatch").exists()
    assert (tmp_path / "out" / "ftrace").is_dir()
