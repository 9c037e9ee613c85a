"""Build small ELF fixtures shaped like kernel modules of other generations, and damaged copies of ELF files.

``build_module`` compiles one C source with gcc the way Kbuild compiles a module's objects on x86_64
(``-mcmodel=kernel -fno-pic``, fentry calls recorded in ``__mcount_loc``); the object is a relocatable ELF,
which is what a ``.ko`` is. Sources live in ``tests/fixtures/elf/``.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "elf"
KERNEL_CFLAGS = (
    "-O2",
    "-fno-pic",
    "-mcmodel=kernel",
    "-fno-ipa-icf",  # keep functions with equal bodies apart, as distinct hooks must stay
    "-fno-asynchronous-unwind-tables",
    "-pg",
    "-mfentry",
    "-mrecord-mcount",
    "-Wall",
    "-Wno-unused-function",
    "-Werror",
)


def gcc() -> str:
    exe = shutil.which("gcc")
    if exe is None:
        pytest.skip("gcc is not installed")
    return exe


def build_module(
    tmp_path: Path, source: str | Path, name: str, cflags: Sequence[str] = (), *, base_flags: bool = True
) -> Path:
    """Compile ``source`` (a file name in tests/fixtures/elf, a path, or C text) to ``tmp_path/name``.

    ``name`` is the output file name (``nf_conntrack_ipv4.ko``); ``cflags`` are added after the kernel-like
    defaults (pass ``base_flags=False`` to drop them, e.g. for ``-m32``).
    """
    if isinstance(source, Path):
        src = source
    elif "\n" not in source and (FIXTURES / source).is_file():
        src = FIXTURES / source
    else:
        src = tmp_path / (Path(name).name.split(".", 1)[0] + "_src.c")
        src.write_text(source)
    out = tmp_path / name
    flags = [*(KERNEL_CFLAGS if base_flags else ()), *cflags]
    proc = subprocess.run([gcc(), "-c", *flags, str(src), "-o", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"gcc failed for {src}:\n{proc.stderr}")
    return out


def link_relocatable(tmp_path: Path, objects: Sequence[Path], name: str) -> Path:
    """``ld -r`` several objects into one, as modpost's final link of a multi-file module does."""
    out = tmp_path / name
    proc = subprocess.run(["ld", "-r", *map(str, objects), "-o", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"ld -r failed:\n{proc.stderr}")
    return out


def compress(path: Path, kind: str) -> Path:
    """A compressed copy next to ``path``: ``kind`` is "xz", "gz" or "zst" (the zst copy needs the zstd CLI)."""
    out = path.with_name(path.name + "." + kind)
    data = path.read_bytes()
    if kind == "xz":
        out.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
    elif kind == "gz":
        out.write_bytes(gzip.compress(data))
    elif kind == "zst":
        exe = shutil.which("zstd")
        if exe is None:
            pytest.skip("the zstd command is not installed")
        subprocess.run([exe, "-q", "-f", str(path), "-o", str(out)], check=True)
    else:
        raise ValueError(kind)
    return out


def patched_copy(path: Path, out: Path, patches: dict[int, bytes]) -> Path:
    """A copy of ``path`` with bytes replaced at the given offsets."""
    data = bytearray(path.read_bytes())
    for offset, value in patches.items():
        data[offset : offset + len(value)] = value
    out.write_bytes(bytes(data))
    return out


def truncated_copy(path: Path, out: Path, size: int) -> Path:
    out.write_bytes(path.read_bytes()[:size])
    return out


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """The ELF vmlinux inside an xz-compressed bzImage (what scripts/extract-vmlinux does for xz)."""
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    while start >= 0:
        try:
            elf = lzma.LZMADecompressor().decompress(data[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            out.write_bytes(elf)
            return out
        start = data.find(b"\xfd7zXZ\x00", start + 1)
    pytest.skip(f"{bzimage} holds no xz-compressed ELF vmlinux")


def link_vmlinux(tmp_path: Path, objects: Sequence[Path], name: str = "vmlinux") -> Path:
    """Link fixture objects with the stubs into a vmlinux-like ET_EXEC (fixtures/elf/vmlinux.lds, --build-id)."""
    stubs = build_module(tmp_path, "vmlinux_stubs.c", "vmlinux_stubs.o", ["-O2", "-fno-pic", "-mcmodel=kernel"],
                         base_flags=False)  # fmt: skip
    out = tmp_path / name
    argv = ["ld", "--build-id=sha1", "-T", str(FIXTURES / "vmlinux.lds"), *map(str, objects), str(stubs), "-o"]
    proc = subprocess.run([*argv, str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"ld failed:\n{proc.stderr}")
    return out
