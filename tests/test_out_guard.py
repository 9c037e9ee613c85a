"""`--out` is replaced whole, so nqgen refuses to replace what it did not create (issue 12 part 3).

A symbolic link, a file, or a non-empty directory without nqgen's marker is refused with one line and exit 3,
and left exactly as it was; ``--force`` replaces it (a link itself, never the directory it points to).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_nqgen
from elffixtures import build_module
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
