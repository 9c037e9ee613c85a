"""Fleet mode (issue 14): ``nqgen --strategy all --targets DIR|LIST`` over real trees and header fixtures.

Real inputs: Debian's amd64 kernel (``/lib/modules/<release>`` as a target directory) and its -rt headers tree
with the amd64 module (as test_generations does: -rt ships no modules here); fixtures: the 5.10 and RHEL 7 early
header trees with modules compiled in their shape. Broken targets sit among them: each must fail alone, with the
exit code the single-target command would give, and leave no directory behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import DebianKernel, run_nqgen
from test_generations import CASES, build_module
from test_headers import FIXTURES

ENV = {"NQGEN_KDIR": ""}


def _fixture_module(tmp: Path, generation: str) -> Path:
    case = CASES[generation]
    d = tmp / f"mod-{generation}"
    d.mkdir()
    return build_module(d, case.source, case.ko, case.cflags)


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its text, inputs.json without its date and command (they differ per run)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        text = p.read_text(errors="replace")
        if p.name == "inputs.json":
            doc = json.loads(text)
            doc.pop("date")
            text = json.dumps(doc, sort_keys=True)
        if p.name != "fleet.json":
            out[str(p.relative_to(root))] = text
    return out


@pytest.fixture(scope="module")
def fleet_list(tmp_path_factory: pytest.TempPathFactory, debian: DebianKernel) -> Path:
    tmp = tmp_path_factory.mktemp("fleet")
    (tmp / "dirs").mkdir()
    os.symlink(debian.modules_dir, tmp / "dirs" / "debian-amd64")
    rt = Path(f"/usr/src/linux-headers-{debian.release.rsplit('-', 1)[0]}-rt-amd64")
    g510 = _fixture_module(tmp, "5.10")
    early = _fixture_module(tmp, "rhel7-early")
    lines = [
        "# name, then nqgen's input options (or a target directory)",
        "debian-amd64 dirs/debian-amd64",
        f"fixture-5.10 --kdir {FIXTURES / '5.10'} --module {g510}",
        "missing-module --kdir " + str(FIXTURES / "5.10") + " --module /nonexistent/nf_conntrack.ko",
        f"not-elf --kdir {FIXTURES / '5.10'} --module {tmp / 'list.txt'}",
        f"rhel7-early --kdir {FIXTURES / 'rhel7-early'} --module {early}",
    ]
    if (rt / "Makefile").is_file():
        lines.insert(2, f"debian-rt --kdir {rt} --module {debian.nf_conntrack}")
    (tmp / "list.txt").write_text("\n".join(lines) + "\n")
    return tmp / "list.txt"


def _fleet(args: list[str], cwd: Path) -> tuple[int, str, str]:
    proc = run_nqgen(args, cwd, env={**ENV, "XDG_CACHE_HOME": str(cwd / "cache")})
    return proc.returncode, proc.stdout, proc.stderr


def test_one_bad_target_fails_alone_and_leaves_nothing(fleet_list: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, stdout, stderr = _fleet(["--strategy", "ftrace", "--targets", str(fleet_list), "--out", str(out), "-j", "2"],
                                tmp_path)  # fmt: skip
    doc = json.loads((out / "fleet.json").read_text())
    status = {r["name"]: (r["status"], r["exit_code"]) for r in doc["results"]}
    assert status["debian-amd64"] == ("ok", 0), stdout + stderr
    assert status["fixture-5.10"] == ("ok", 0)
    assert status["missing-module"] == ("failed", 3)
    assert status["not-elf"] == ("failed", 3)
    # ftrace cannot work on early RHEL 7 (no faithful corrected confirm): 77, as `nqgen --strategy ftrace` says
    assert status["rhel7-early"] == ("not-applicable", 77)
    if "debian-rt" in status:
        assert status["debian-rt"] == ("ok", 0)
    assert rc == 3, "exit code of the first target that failed, in list order"
    made = sorted(p.name for p in out.iterdir())
    assert made == sorted([n for n, (s, _) in status.items() if s == "ok"] + ["fleet.json", ".nqgen-out"])
    assert not [p for p in tmp_path.rglob(".*tmp-*")], "a staging directory was left behind"
    for name, (state, _) in status.items():
        if state == "ok":
            inputs = json.loads((out / name / "inputs.json").read_text())
            assert inputs["generated"] == ["ftrace"] and (out / name / "ftrace" / "Kbuild").exists()
            assert "--kdir" in inputs["command"]
    assert "missing-module" in stdout and "exit 3" in stdout


def test_two_workers_write_what_one_writes(fleet_list: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    rc1, out1, err1 = _fleet(["--strategy", "all", "--targets", str(fleet_list), "--out", str(one), "-j", "1"],
                             tmp_path)  # fmt: skip
    rc2, _, err2 = _fleet(["--strategy", "all", "--targets", str(fleet_list), "--out", str(two), "-j", "2"], tmp_path)
    assert rc1 == rc2 == 3, err1 + err2
    assert _tree(one) == _tree(two)
    pids = {r["worker"] for r in json.loads((two / "fleet.json").read_text())["results"] if r["status"] == "ok"}
    assert len(pids) == 2, "both workers took targets"
    assert (one / "fixture-5.10" / "advance-confirm").is_dir() and "6.1.0" in out1


def test_bad_target_list_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".nqgen-out").write_text("")
    (out / "keep").write_text("earlier run")
    cases = {
        "dup": ("a --kdir x --module y\na --kdir z --module w\n", "given twice"),
        "opt": ("a --kdir x --modul y\n", "list:1: unknown option '--modul'"),
        "name": ("../a --kdir x --module y\n", "not a plain file name"),
    }
    for label, (text, message) in cases.items():
        lst = tmp_path / "list"
        lst.write_text(text)
        rc, _, stderr = _fleet(["--strategy", "all", "--targets", str(lst), "--out", str(out)], tmp_path)
        assert rc == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, (label, stderr)
    rc, _, stderr = _fleet(["--targets", str(lst), "--kdir", str(tmp_path), "--out", str(out)], tmp_path)
    assert rc == 2 and "drop --kdir" in stderr
    assert (out / "keep").read_text() == "earlier run"
