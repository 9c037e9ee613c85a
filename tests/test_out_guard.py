"""`--out` is replaced whole, so nqgen refuses to replace what it did not create (issue 12 part 3).

A symbolic link, a file, or a non-empty directory without nqgen's marker is refused with one line and exit 3,
and left exactly as it was; ``--force`` replaces it (a link itself, never the directory it points to).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_nqgen
from elffixtures import build_module
from nqgen.bench.command import prepare_out
from nqgen.errors import InputError
from nqgen.generate import OUT_MARKER
from test_generations import CASES
from test_headers import FIXTURES as HEADER_TREES

GENERATION = "5.10"


@pytest.fixture(scope="module")
def module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = CASES[GENERATION]
    return build_module(tmp_path_factory.mktemp("gen"), case.source, case.ko, case.cflags)


def gen(module: Path, out: Path, *extra: str) -> tuple[int, str]:
    """nqgen's exit code and its error lines (warnings about the fixture kernel left out)."""
    args = ["--strategy", "ftrace", "--kdir", str(HEADER_TREES / GENERATION), "--module", str(module)]
    res = run_nqgen([*args, "--out", str(out), *extra], out.parent, env={"XDG_CACHE_HOME": str(out.parent / "c")})
    errors = "".join(line + "\n" for line in res.stderr.splitlines() if not line.startswith("nqgen: warn"))
    return res.returncode, errors


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_symlink_is_refused_and_its_target_kept(module: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me\n")
    link = tmp_path / "out"
    link.symlink_to(precious)
    rc, err = gen(module, link)
    assert rc == 3 and err.count("\n") == 1 and "is a symbolic link; pass --force" in err, err
    assert link.is_symlink() and snapshot(precious) == {"notes.txt": b"keep me\n"}
    rc, err = gen(module, link, "--force")
    assert rc == 0, err
    assert not link.is_symlink() and (link / "ftrace" / "Kbuild").is_file()
    assert snapshot(precious) == {"notes.txt": b"keep me\n"}  # the link was replaced, not what it pointed to


def test_file_is_refused(module: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file\n")
    rc, err = gen(module, out)
    assert rc == 3 and err.count("\n") == 1 and "is not a directory; pass --force" in err, err
    assert out.read_text() == "a file\n"
    rc, err = gen(module, out, "--force")
    assert rc == 0 and (out / "ftrace").is_dir(), err


def test_foreign_directory_is_refused(module: Path, tmp_path: Path) -> None:
    out = tmp_path / "home"
    (out / "src").mkdir(parents=True)
    (out / "src" / "work.c").write_text("int main(void) { return 0; }\n")
    before = snapshot(out)
    rc, err = gen(module, out)
    assert rc == 3 and err.count("\n") == 1 and "was not created by nqgen; pass --force" in err, err
    assert snapshot(out) == before


def test_own_and_empty_directories_are_replaced(module: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    rc, err = gen(module, out)  # empty: nothing to lose
    assert rc == 0, err
    assert (out / ".nqgen-out").is_file()
    (out / "stale-file").write_text("x")
    rc, err = gen(module, out)  # nqgen's own: replaced whole without --force
    assert rc == 0, err
    assert not (out / "stale-file").exists() and (out / "ftrace" / "Kbuild").is_file()


# --- every other command that writes into an --out of its own -----------------------------------------------------


def _foreign(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """An --out that nqgen must not write into: (the path given, the directory whose content must not change)."""
    precious = tmp_path / "precious"
    (precious / "src").mkdir(parents=True)
    (precious / "src" / "work.c").write_text("int main(void) { return 0; }\n")
    (precious / "bench.json").write_text("{}\n")  # names the commands write, so an overwrite would show
    (precious / "lab-logs").mkdir()
    if kind == "symlink":
        (tmp_path / "out").symlink_to(precious)
        return tmp_path / "out", precious
    if kind == "file":
        (tmp_path / "out").write_text("a file\n")
        return tmp_path / "out", precious
    return precious, precious


COMMANDS = {
    "fleet": lambda out, lst: ["--strategy", "ftrace", "--targets", str(lst), "--out", str(out)],
    "bench": lambda out, _l: ["-m", "nqgen.bench", "--out", str(out), "--no-whole", "--no-cost", "--fleet-targets",
                              "0", "--rounds", "1"],
    "lab": lambda out, _l: ["lab", "--out", str(out)],
    "lab-hookswap": lambda out, _l: ["lab-hookswap", "--scenario", "window", "--out", str(out)],
    "soak": lambda out, _l: ["-m", "nqgen.lab.soak", "--out", str(out)],
}


@pytest.mark.parametrize("kind", ["symlink", "file", "foreign"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_writing_command_refuses_what_nqgen_did_not_create(
    module: Path, tmp_path: Path, command: str, kind: str
) -> None:
    out, precious = _foreign(tmp_path, kind)
    before, file_before = snapshot(precious), out.read_bytes() if out.is_file() else None
    lst = tmp_path / "targets"
    lst.write_text(f"k1 --kdir {HEADER_TREES / GENERATION} --module {module}\n")
    args = COMMANDS[command](out, lst)
    if args[0] == "-m":
        cmd = [sys.executable, *args]
        res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    else:
        res = run_nqgen(args, tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "c")})
    errors = [line for line in res.stderr.splitlines() if "warning" not in line]
    assert res.returncode == 3 and len(errors) == 1, (res.returncode, res.stderr)
    expect = {"symlink": "is a symbolic link", "file": "not a directory", "foreign": "not created by nqgen"}[kind]
    assert expect in errors[0] and "Traceback" not in res.stderr, errors
    assert snapshot(precious) == before and (out.read_bytes() if out.is_file() else None) == file_before
    assert out.is_symlink() == (kind == "symlink")


def test_fleet_force_replaces_a_link_not_its_target(module: Path, tmp_path: Path) -> None:
    out, precious = _foreign(tmp_path, "symlink")
    before = snapshot(precious)
    lst = tmp_path / "targets"
    lst.write_text(f"k1 --kdir {HEADER_TREES / GENERATION} --module {module}\n")
    res = run_nqgen(["--strategy", "ftrace", "--targets", str(lst), "--out", str(out), "--force"], tmp_path,
                    env={"XDG_CACHE_HOME": str(tmp_path / "c")})  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert not out.is_symlink() and (out / "k1" / "ftrace" / "Kbuild").is_file() and (out / ".nqgen-out").is_file()
    assert snapshot(precious) == before


def test_bench_out_is_marked_and_reused_and_force_replaces_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out-bench"
    prepare_out(out, force=False)  # created and marked
    (out / "bench.json").write_text("{}\n")
    prepare_out(out, force=False)  # its own: reused
    assert (out / OUT_MARKER).is_file() and (out / "bench.json").is_file()
    other = tmp_path / "file"
    other.write_text("x\n")
    with pytest.raises(InputError, match="not a directory"):
        prepare_out(other, force=False)
    prepare_out(other, force=True)
    assert other.is_dir() and (other / OUT_MARKER).is_file()
