"""The decompression cap scales with the compressed input: real kernel inputs pass, bombs are refused (issue 14).

A fixed 256 MiB cap refused every debug vmlinux. Plain ELF files are now mapped (their size is their own), and a
compressed one may expand to 32x its size (at least 256 MiB, at most 8 GiB) or to what
``NQGEN_MAX_DECOMPRESSED_MIB`` says.
"""

from __future__ import annotations

import gzip
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from nqgen import elfread, symsources
from nqgen.bench.symbols import synthetic_elf
from nqgen.errors import InputError

MIB = 1 << 20


def test_cap_floor_scaling_ceiling_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(symsources.CAP_ENV, raising=False)
    assert symsources.decompression_cap(1 * MIB) == symsources.MAX_DECOMPRESSED
    # an xz'd debug vmlinux of ~200 MiB may expand far beyond 256 MiB
    assert symsources.decompression_cap(200 * MIB) == 200 * MIB * symsources.MAX_EXPANSION
    assert symsources.decompression_cap(1 << 40) == symsources.MAX_INPUT
    monkeypatch.setenv(symsources.CAP_ENV, "3000")
    assert symsources.decompression_cap(1 * MIB) == 3000 * MIB
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv(symsources.CAP_ENV, bad)
        with pytest.raises(InputError, match=symsources.CAP_ENV):
            symsources.decompression_cap(MIB)


def _elf(tmp_path: Path) -> Path:
    return synthetic_elf(tmp_path / "vmlinux", count=200)


def _compressible(size: int) -> bytes:
    """Bytes that gzip packs about 3x, like kernel code and debug info (a bomb packs 1000x)."""
    rng = random.Random(49561)
    words = [rng.randbytes(rng.randrange(2, 12)) for _ in range(1024)]
    out = bytearray()
    while len(out) < size:
        out += b"".join(rng.choices(words, k=4096))
    return bytes(out[:size])


def test_ratio_tells_a_real_input_from_a_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the floor lowered to 1 MiB (same code path, small files): a 3x-compressible 8 MiB ELF is read whole,
    8 MiB of zeros (a bomb: ~1000x) is refused, and the explicit cap refuses the real one too."""
    monkeypatch.delenv(symsources.CAP_ENV, raising=False)
    monkeypatch.setattr(symsources, "MAX_DECOMPRESSED", 1 * MIB)
    elf = _elf(tmp_path).read_bytes()
    real = tmp_path / "real.gz"
    real.write_bytes(gzip.compress(elf + _compressible(8 * MIB - len(elf)), 6))
    assert 1 * MIB < real.stat().st_size < 8 * MIB / 2
    image = elfread.load_vmlinux(real)
    assert image.compression == "gz" and image.find("kallsyms_lookup_name")
    bomb = tmp_path / "bomb.gz"
    bomb.write_bytes(gzip.compress(elf + bytes(8 * MIB), 9))
    with pytest.raises(InputError, match="decompresses to more than 1 MiB"):
        elfread.load_vmlinux(bomb)
    monkeypatch.setenv(symsources.CAP_ENV, "4")
    with pytest.raises(InputError, match="decompresses to more than 4 MiB"):
        elfread.load_vmlinux(real)


def test_plain_vmlinux_larger_than_the_old_cap_is_mapped_not_read(tmp_path: Path) -> None:
    """A 300 MiB plain vmlinux (sparse tail) loads in a fresh process whose peak RSS grows by far less than it."""
    path = _elf(tmp_path)
    with open(path, "r+b") as fh:
        fh.truncate(300 * MIB)
    code = (
        "import resource, sys; from pathlib import Path; from nqgen import elfread\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "img = elfread.load_vmlinux(Path(sys.argv[1]))\n"
        "assert img.find('kallsyms_lookup_name') and img.compression is None\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    grown_kib = int(done.stdout.strip())
    assert grown_kib < 64 * 1024, f"peak RSS grew {grown_kib} KiB for a mapped 300 MiB file"


def test_large_zero_padded_gzip_is_a_bomb_unless_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same 300 MiB file gzipped packs >1000x: refused by default, read with NQGEN_MAX_DECOMPRESSED_MIB=400."""
    path = _elf(tmp_path)
    with open(path, "r+b") as fh:
        fh.truncate(300 * MIB)
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    packed = tmp_path / "vmlinux.gz"
    with open(path, "rb") as src, open(packed, "wb") as dst:
        while chunk := src.read(16 * MIB):
            dst.write(comp.compress(chunk))
        dst.write(comp.flush())
    monkeypatch.delenv(symsources.CAP_ENV, raising=False)
    with pytest.raises(InputError, match="decompresses to more than 256 MiB"):
        elfread.load_vmlinux(packed)
    monkeypatch.setenv(symsources.CAP_ENV, "400")
    assert elfread.load_vmlinux(packed).find("kallsyms_lookup_name")
