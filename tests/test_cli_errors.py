"""Bad input: one clear line on stderr, a non-zero exit, and no partial out/ (an old out/ stays intact)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import DebianKernel, run_nqgen


def _not_elf(tmp: Path, k: DebianKernel) -> Path:
    p = tmp / "nf_conntrack.ko"
    p.write_text("this is not an ELF file\n")
    return p


def _truncated(tmp: Path, k: DebianKernel) -> Path:
    p = tmp / "nf_conntrack.ko"
    p.write_bytes(k.nf_conntrack.read_bytes()[:4096])
    return p


def _patched_ident(index: int, value: int) -> Callable[[Path, DebianKernel], Path]:
    def make(tmp: Path, k: DebianKernel) -> Path:
        data = bytearray(k.nf_conntrack.read_bytes())
        data[index] = value
        p = tmp / "nf_conntrack.ko"
        p.write_bytes(bytes(data))
        return p

    return make


def _elf32(tmp: Path, k: DebianKernel) -> Path:
    src = tmp / "m.c"
    src.write_text("int ipv4_confirm(void) { return 0; }\n")
    obj = tmp / "nf_conntrack.ko"
    res = subprocess.run(["gcc", "-m32", "-c", str(src), "-o", str(obj)], capture_output=True)
    if res.returncode != 0:  # no 32-bit multilib: the class byte alone makes it a 32-bit ELF header
        return _patched_ident(4, 1)(tmp, k)
    return obj


def _no_symbols(tmp: Path, k: DebianKernel) -> Path:
    src = tmp / "m.c"
    src.write_text('int unrelated_function(int x) { return x + 1; }\nconst char modinfo[] = "vermagic=x";\n')
    obj = tmp / "nf_conntrack.ko"
    subprocess.run(["gcc", "-c", "-O2", str(src), "-o", str(obj)], check=True)
    return obj


BAD_MODULES: dict[str, Callable[[Path, DebianKernel], Path]] = {
    "not-elf": _not_elf,
    "truncated": _truncated,
    "elf32": _elf32,
    "big-endian": _patched_ident(5, 2),
    "no-symbols": _no_symbols,
}


@pytest.mark.parametrize("case", sorted(BAD_MODULES))
def test_bad_module_fails_cleanly(case: str, debian: DebianKernel, tmp_path: Path) -> None:
    module = BAD_MODULES[case](tmp_path, debian)
    old = tmp_path / "out"
    old.mkdir()
    (old / "marker").write_text("previous output\n")
    res = run_nqgen(["--strategy", "all", "--kdir", str(debian.kdir), "--module", str(module)], cwd=tmp_path)
    assert res.returncode == 3, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("nqgen: error: "), lines[0]
    assert "Traceback" not in res.stderr
    assert str(module) in lines[0] or module.name in lines[0], lines[0]
    assert sorted(p.name for p in old.iterdir()) == ["marker"]
    assert not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--module", "/nonexistent/nf_conntrack.ko", "no such file"),
        ("--kdir", "/nonexistent/build", "no such directory"),
        ("--system-map", "/nonexistent/System.map", "no such file"),
        ("--config", "/nonexistent/config", "no such file"),
    ],
)
def test_missing_input(option: str, value: str, needle: str, debian: DebianKernel, tmp_path: Path) -> None:
    args = ["--kdir", str(debian.kdir), "--module", str(debian.nf_conntrack)]
    idx = args.index(option) if option in args else -1
    if idx >= 0:
        args[idx + 1] = value
    else:
        args += [option, value]
    res = run_nqgen(["--strategy", "ftrace", *args], cwd=tmp_path)
    assert res.returncode == 3
    assert res.stderr.count("\n") == 1 and needle in res.stderr and value in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_strategy_suggests(tmp_path: Path) -> None:
    res = run_nqgen(["--strategy", "ftrce"], cwd=tmp_path)
    assert res.returncode == 2
    assert "did you mean ftrace?" in res.stderr
    assert res.stderr.count("\n") == 1


def test_running_kernel_without_tree_lists_installed(debian: DebianKernel, tmp_path: Path) -> None:
    import os

    if Path(f"/lib/modules/{os.uname().release}/build").exists():
        pytest.skip("the running kernel has a build tree here; nothing to refuse")
    res = run_nqgen(["--strategy", "ftrace"], cwd=tmp_path)
    assert res.returncode == 3
    assert debian.release in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "out").exists()
