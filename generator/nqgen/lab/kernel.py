"""Which kernel the lab boots: the image (bzImage or ELF vmlinux), its release, and a PVH-bootable vmlinux.

Booting the ELF ``vmlinux`` through its PVH entry skips the in-guest decompression, which under TCG
halves the boot time.  The vmlinux is extracted from the bzImage's compressed payload and cached;
when the kernel has no PVH note or the payload cannot be decompressed here, the bzImage is booted.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from ..errors import InputError

_ELF_MAGIC = b"\x7fELF"
_XEN_ELFNOTE_PHYS32_ENTRY = 18
_MAX_VMLINUX = 1 << 30  # refuse to decompress more than 1 GiB
_RELEASE_RE = re.compile(rb"Linux version (\S+) ")


@dataclass(frozen=True)
class KernelImage:
    """The kernel to boot: what the user named, its release, and what qemu's -kernel gets."""

    image: Path  # what the user named (bzImage/vmlinuz or vmlinux)
    release: str
    boot_path: Path  # passed to qemu -kernel
    boot_mode: str  # "pvh" (ELF vmlinux) or "bzimage"
    kasan: bool = False  # built with KASAN (wants more RAM; reports every bug with kasan_multi_shot)


def image_release(path: Path) -> str:
    """The kernel release (``uname -r``) of a bzImage or an ELF vmlinux."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read kernel image {path}: {exc.strerror}") from exc
    if len(data) > 0x210 and data[0x202:0x206] == b"HdrS":
        off = int.from_bytes(data[0x20E:0x210], "little") + 0x200
        if 0x200 < off < len(data):
            text = data[off : off + 256].split(b"\0", 1)[0]
            if text:
                return text.split()[0].decode("ascii", "replace")
    m = _RELEASE_RE.search(data)
    if m:
        return m.group(1).decode("ascii", "replace")
    raise InputError(f"{path}: no kernel release string found (not a bzImage or vmlinux?)")


def _has_pvh_note(path: Path) -> bool:
    with path.open("rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_NOTE":
                continue
            for note in seg.iter_notes():  # type: ignore[attr-defined]
                if note["n_name"] == "Xen" and note["n_type"] == _XEN_ELFNOTE_PHYS32_ENTRY:
                    return True
    return False


def _decompress_at(data: bytes, off: int) -> bytes | None:
    """Decompress the stream starting at ``off`` if it yields an ELF image, else None."""
    head = data[off : off + 6]
    try:
        if head.startswith(b"\xfd7zXZ\x00"):
            out = lzma.LZMADecompressor().decompress(data[off:], max_length=_MAX_VMLINUX)
        elif head.startswith(b"\x1f\x8b\x08"):
            out = zlib.decompressobj(wbits=31).decompress(data[off:], _MAX_VMLINUX)
        elif head.startswith(b"\x28\xb5\x2f\xfd") and shutil.which("zstd"):
            proc = subprocess.run(
                ["zstd", "-dc"], input=data[off:], capture_output=True, check=False, timeout=120
            )
            out = proc.stdout[:_MAX_VMLINUX]
        else:
            return None
    except (lzma.LZMAError, zlib.error, OSError, EOFError, subprocess.SubprocessError):
        return None
    return out if out.startswith(_ELF_MAGIC) else None



def extract_vmlinux(bzimage: Path, cache_dir: Path) -> Path | None:
    """The ELF vmlinux inside a bzImage (cached by content hash), or None when it cannot be found."""
    data = bzimage.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:24]
    cached = cache_dir / f"vmlinux-{digest}"
    if cached.is_file():
        return cached
    for magic in (b"\xfd7zXZ\x00", b"\x1f\x8b\x08", b"\x28\xb5\x2f\xfd"):
        off = data.find(magic)
        while off >= 0:
            out = _decompress_at(data, off)
            if out is not None:
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".tmp{os.getpid()}")
                tmp.write_bytes(out)
                tmp.replace(cached)
                return cached
            off = data.find(magic, off + 1)
    return None


def _sibling_bzimage(vmlinux: Path, release: str) -> Path | None:
    """The bzImage of the same build next to an ELF vmlinux (kernel build tree layout), if any."""
    candidate = vmlinux.parent / "arch" / "x86" / "boot" / "bzImage"
    if candidate.is_file() and image_release(candidate) == release:
        return candidate
    return None


def resolve_image(image: Path, cache_dir: Path) -> KernelImage:
    """Decide how to boot ``image``: PVH through an (extracted) vmlinux when possible.

    KASAN kernels boot through the bzImage: their PVH entry runs instrumented code before the KASAN
    shadow exists and triple-faults (measured with the 6.1 reference kernel under TCG).
    """
    if not image.is_file():
        raise InputError(f"kernel image {image} does not exist")
    release = image_release(image)
    with image.open("rb") as f:
        is_elf = f.read(4) == _ELF_MAGIC
    if is_elf:
        kasan = is_kasan(image)
        if kasan or not _has_pvh_note(image):
            bzimage = _sibling_bzimage(image, release)
            if bzimage is not None:
                return KernelImage(image, release, bzimage, "bzimage", kasan)
            if not kasan:
                raise InputError(f"{image} is an ELF vmlinux without a PVH entry note (CONFIG_PVH); pass the bzImage")
        return KernelImage(image, release, image, "pvh", kasan)
    vmlinux = extract_vmlinux(image, cache_dir)
    kasan = vmlinux is not None and is_kasan(vmlinux)
    if vmlinux is not None and not kasan and _has_pvh_note(vmlinux):
        return KernelImage(image, release, vmlinux, "pvh", kasan)
    return KernelImage(image, release, image, "bzimage", kasan)


def is_kasan(path: Path) -> bool:
    """Whether an uncompressed kernel image carries KASAN's report format (bzImage payloads are compressed)."""
    with path.open("rb") as f:
        return b"BUG: KASAN: " in f.read()


def _version_key(release: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", release)]


def default_image(release: str | None, boot_dir: Path = Path("/boot")) -> Path:
    """The installed kernel for ``release`` if there is one, else the newest /boot/vmlinuz-*."""
    if release:
        candidate = boot_dir / f"vmlinuz-{release}"
        if candidate.is_file():
            return candidate
    images = sorted(boot_dir.glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
    if not images:
        raise InputError(f"no kernel image in {boot_dir}; pass --kernel")
    return images[-1]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nqgen" / "lab"
