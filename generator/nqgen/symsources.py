"""Text symbol sources of a target kernel: System.map, /proc/kallsyms, Module.symvers, .config, the release.

Also :func:`read_capped`, which reads any input file (plain, xz, zstd or gzip) with a cap on its decompressed
size, so a hostile or corrupt input cannot exhaust memory.
"""

from __future__ import annotations

import functools
import lzma
import mmap
import os
import re
import shutil
import subprocess
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from nqgen.errors import InputError
from nqgen.profile import ConfigFlags, Symbol

# Decompressed ELF inputs: a compressed file may expand to max(MAX_DECOMPRESSED, MAX_EXPANSION x its own size), never
# beyond MAX_INPUT. Real kernel inputs compress 2-8x (a debug vmlinux: ~1 GiB that xz packs to ~200 MiB, Debian's
# .ko.xz ~3x), a decompression bomb 1000x and more, so the ratio is what tells them apart; a fixed 256 MiB refused
# every debug vmlinux. NQGEN_MAX_DECOMPRESSED_MIB (or `nqgen --max-decompressed`) replaces the computed cap.
MAX_DECOMPRESSED = 256 * 1024 * 1024
MAX_EXPANSION = 32
MAX_INPUT = 8 * 1024 * 1024 * 1024
CAP_ENV = "NQGEN_MAX_DECOMPRESSED_MIB"
# Text inputs (System.map ~6 MiB, kallsyms ~12 MiB, Module.symvers ~2 MiB, .config ~250 KiB on a distribution
# kernel): a larger one would become millions of Python objects, so it is refused before parsing.
MAX_TEXT = 64 * 1024 * 1024
_MAGIC = {b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zst", b"\x1f\x8b": "gz"}
_SUFFIXES = {".xz": "xz", ".zst": "zst", ".gz": "gz"}
_CHUNK = 1 << 20


def decompression_cap(compressed_size: int) -> int:
    """The most bytes a compressed ELF input of ``compressed_size`` bytes may expand to (see MAX_EXPANSION)."""
    explicit = os.environ.get(CAP_ENV)
    if explicit:
        try:
            mib = int(explicit)
        except ValueError:
            raise InputError(f"{CAP_ENV}={explicit!r}: not a whole number of MiB") from None
        if mib < 1:
            raise InputError(f"{CAP_ENV}={explicit!r}: must be at least 1 MiB")
        return mib << 20
    return min(MAX_INPUT, max(MAX_DECOMPRESSED, MAX_EXPANSION * compressed_size))


def _open_error(path: Path, exc: OSError) -> InputError:
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{path}: no such file")
    if isinstance(exc, IsADirectoryError):
        return InputError(f"{path}: is a directory, not a file")
    return InputError(f"{path}: cannot read: {exc.strerror or exc}")


def _kind(path: Path, head: bytes) -> str | None:
    compression = next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)
    suffix_kind = _SUFFIXES.get(Path(path).suffix)
    if suffix_kind and compression != suffix_kind:
        raise InputError(f"{path}: named .{suffix_kind} but its content is not {suffix_kind}-compressed")
    return compression


def _read_at_most(fh: BinaryIO, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``fh``, in chunks: ``fh.read(limit)`` would allocate ``limit`` bytes at once (8 GiB
    of address space for one small compressed module: a MemoryError where overcommit is strict or RLIMIT_AS is
    set). A regular file is read in one call of its own size (+1, to see one that grew); procfs files
    (/proc/kallsyms, /proc/config.gz) report size 0 and are read in chunks."""
    size = os.fstat(fh.fileno()).st_size
    if size:
        return fh.read(min(size + 1, limit))
    chunks, total = [], 0
    while total < limit:
        chunk = fh.read(min(_CHUNK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_elf_input(path: Path) -> tuple[bytes | mmap.mmap, str | None]:
    """An ELF input for parsing: a plain file mapped read-only (its size is its own, not a bomb: a 1 GiB debug
    vmlinux costs page cache, not heap), a compressed one decompressed up to :func:`decompression_cap`."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            compression = _kind(path, head)
            if compression is None:
                size = os.fstat(fh.fileno()).st_size
                if size == 0:
                    return b"", None
                if size > MAX_INPUT:
                    raise InputError(f"{path}: larger than {MAX_INPUT >> 20} MiB")
                return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), None
            fh.seek(0)
            raw = _read_at_most(fh, MAX_INPUT + 1)
    except OSError as exc:
        raise _open_error(path, exc) from None
    if len(raw) > MAX_INPUT:
        raise InputError(f"{path}: compressed file larger than {MAX_INPUT >> 20} MiB")
    return _decompress(path, raw, compression, decompression_cap(len(raw))), compression


def read_capped(path: Path, cap: int = MAX_DECOMPRESSED) -> tuple[bytes, str | None]:
    """The file's bytes, decompressed when it is xz/zstd/gzip (by magic), and the compression used."""
    try:
        with open(path, "rb") as fh:
            raw = _read_at_most(fh, cap + 1)
    except OSError as exc:
        raise _open_error(path, exc) from None
    compression = _kind(path, raw)
    if compression is None:
        if len(raw) > cap:
            raise InputError(f"{path}: larger than {cap >> 20} MiB")
        return raw, None
    if len(raw) > cap:
        raise InputError(f"{path}: compressed file larger than {cap >> 20} MiB")
    return _decompress(path, raw, compression, cap), compression


def _decompress(path: Path, raw: bytes, compression: str, cap: int) -> bytes:
    try:
        if compression == "xz":
            xz = lzma.LZMADecompressor()
            out = xz.decompress(raw, max_length=cap + 1)
            complete = xz.eof
        elif compression == "gz":
            gz = zlib.decompressobj(wbits=31)
            out = gz.decompress(raw, cap + 1)
            complete = gz.eof
        else:
            complete = True  # the zstd command reports a truncated frame itself
            out = _unzstd(Path(path), cap)
    except (lzma.LZMAError, zlib.error, EOFError) as exc:
        raise InputError(f"{path}: corrupt {compression} data: {exc}") from None
    if len(out) > cap:
        hint = "" if os.environ.get(CAP_ENV) else f" ({MAX_EXPANSION}x its compressed size; raise with {CAP_ENV})"
        raise InputError(f"{path}: decompresses to more than {cap >> 20} MiB{hint}")
    if not complete:
        raise InputError(f"{path}: truncated {compression} data")
    return out


def _unzstd(path: Path, cap: int) -> bytes:
    """zstd through the ``zstd`` command (the python module is not a dependency); at most cap+1 bytes."""
    exe = shutil.which("zstd")
    if exe is None:
        raise InputError(f"{path}: zstd-compressed and no zstd command is installed")
    with subprocess.Popen(
        [exe, "-d", "-c", "-q", "--", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None
        chunks, total = [], 0
        while total <= cap:
            chunk = proc.stdout.read(min(_CHUNK, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            proc.kill()
        rc = proc.wait()
    if total <= cap and rc != 0:
        raise InputError(f"{path}: corrupt zst data (zstd exited {rc})")
    return b"".join(chunks)


def read_text(path: Path, cap: int = MAX_TEXT) -> str:
    data, _ = read_capped(path, cap)
    return data.decode("utf-8", "replace")


# --- System.map and /proc/kallsyms --------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSymbol:
    """One line of System.map or /proc/kallsyms: ``address type name [module]``."""

    address: int
    type: str  # nm letter: T/t text, D/d data, R/r rodata, B/b bss, W/w weak, ...
    name: str
    module: str | None  # "nf_conntrack" for a module symbol in kallsyms; None for vmlinux

    @property
    def exported_hint(self) -> bool:
        """Upper case: a global symbol (not necessarily exported)."""
        return self.type.isupper()

    def to_symbol(self) -> Symbol:
        kind = "FUNC" if self.type in "tT" else "OBJECT" if self.type in "dDbBrRvV" else "NOTYPE"
        binding = "WEAK" if self.type in "wWvV" else "GLOBAL" if self.type.isupper() else "LOCAL"
        return Symbol(self.name, "", self.address, 0, binding, kind)


@dataclass(frozen=True)
class SymbolList:
    """A parsed System.map or kallsyms file.

    Every line was checked when it was parsed; the entries themselves are built only when asked for (a 120 000-line
    kallsyms costs 0.26 s of objects), while :meth:`lookup` finds a name in the text the way ``grep`` would.
    """

    path: str
    text: str = field(repr=False)  # one "address type name[\t[module]]" per line, every line already validated

    @functools.cached_property
    def entries(self) -> tuple[TextSymbol, ...]:
        return tuple(TextSymbol(int(a, 16), t, n, m or None) for a, t, n, m in _STRICT_LINE.findall(self.text))

    @property
    def addresses_hidden(self) -> bool:
        """kallsyms read without privilege shows every address as 0 (kptr_restrict)."""
        return _NONZERO_ADDRESS.search(self.text) is None

    def lookup(self, name: str, module: str | None = None) -> tuple[TextSymbol, ...]:
        """Every entry called ``name``; with ``module``, only that module's ("vmlinux" means no module)."""
        want = None if module == "vmlinux" else module
        found = []
        text, pos = self.text, 0
        while name and (hit := text.find(name, pos)) >= 0:
            pos = hit + len(name)
            if hit == 0 or text[hit - 1] not in " \t" or (pos < len(text) and text[pos] not in " \t\n"):
                continue  # part of a longer name, or not the name column
            start, end = text.rfind("\n", 0, hit) + 1, text.find("\n", pos)
            m = _STRICT_LINE.fullmatch(text, start, len(text) if end < 0 else end)
            if m is not None and m[3] == name and (module is None or (m[4] or None) == want):
                found.append(TextSymbol(int(m[1], 16), m[2], m[3], m[4] or None))
        return tuple(found)

    def lookup_many(self, names: Iterable[str]) -> dict[str, tuple[TextSymbol, ...]]:
        """:meth:`lookup` of several names in one pass over the text (as ``grep -E 'a|b|c'`` does)."""
        names = tuple(names)
        # (a name with a blank is never in the name column; the longest first, though the lookahead decides)
        wanted = sorted({n for n in names if n and not any(c.isspace() for c in n)}, key=lambda n: (-len(n), n))
        found: dict[str, list[TextSymbol]] = {n: [] for n in wanted}
        if wanted:
            text = self.text
            alternatives = "|".join(map(re.escape, wanted))
            # one pass per separator: a pattern that starts with a literal lets the regex engine skip to it
            hits = sorted((hit.start(), hit[1]) for sep in (" ", "\t") if sep in text
                          for hit in re.finditer(sep + "(" + alternatives + r")(?=[ \t\n]|\Z)", text))  # fmt: skip
            for at, name in hits:
                start, end = text.rfind("\n", 0, at) + 1, text.find("\n", at + 1 + len(name))
                m = _STRICT_LINE.fullmatch(text, start, len(text) if end < 0 else end)
                if m is not None and m[3] == name:
                    found[name].append(TextSymbol(int(m[1], 16), m[2], m[3], m[4] or None))
        return {n: tuple(found.get(n, ())) for n in names}


_SYMLINE = re.compile(r"^([0-9a-fA-F]+)\s+(\S)\s+(\S+)(?:\s+\[(\S+)\])?\s*$")
# the same, for the common layout (space/tab separators, \n line ends): checked on the whole text at C speed
_STRICT_LINE = re.compile(r"^([0-9a-fA-F]+)[ \t]+(\S)[ \t]+(\S+)(?:[ \t]+\[(\S+)\])?[ \t]*$", re.M)
_NONZERO_ADDRESS = re.compile(r"^0*[1-9a-fA-F]", re.M)
DEBIAN_PLACEHOLDER = "The real System.map is in"


# The usual layout, checked in one pass over the bytes: ``ADDR " " TYPE " " NAME ["\t[" MODULE "]"] "\n"`` per line,
# printable ASCII words. Each line is an atomic group (a line's match cannot change: no class holds "\n"), so the
# pass keeps no backtracking state and costs a third of _STRICT_LINE.subn; every line it accepts, _STRICT_LINE
# accepts and splits into the same fields (single blanks between words without blanks). Anything else (CRLF,
# other blanks, blank lines, no final newline) takes the regex paths below. (Not possessive repeats: on Python
# 3.11.2, ``(?:...)++`` with an optional group inside accepted a last line without its newline; tests/
# test_symbol_lookup.py checks this pattern against _STRICT_LINE on generated and damaged listings.)
_USUAL_LAYOUT = re.compile(rb"(?>[0-9a-fA-F]+ [!-~] [!-~]+(?:\t\[[!-~]+\])?\n)+")


def parse_symbol_list(path: Path) -> SymbolList:
    """Parse System.map or /proc/kallsyms text; InputError on Debian's placeholder or malformed lines."""
    data, _ = read_capped(path, MAX_TEXT)
    if _USUAL_LAYOUT.fullmatch(data):  # (Debian's placeholder sentence is never in this layout)
        return SymbolList(str(path), data.decode("ascii"))
    text = data.decode("utf-8", "replace")
    if DEBIAN_PLACEHOLDER in text[:300]:
        raise InputError(f"{path}: Debian's placeholder; the real System.map is in the linux-image-*-dbg package")
    rest, count = _STRICT_LINE.subn("", text)
    if count and not rest.strip():
        return SymbolList(str(path), text)
    # another layout (\r\n, other blanks) or a bad line: line by line, as before, into the common layout
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _SYMLINE.match(line)
        if m is None:
            raise InputError(f"{path}:{lineno}: not 'address type name [module]': {line[:80]!r}")
        entries.append(f"{m[1]} {m[2]} {m[3]}" + (f"\t[{m[4]}]" if m[4] else ""))
    if not entries:
        raise InputError(f"{path}: no symbols")
    return SymbolList(str(path), "\n".join(entries) + "\n")


def is_placeholder_system_map(path: Path) -> bool:
    """True for Debian's one-line stand-in ('The real System.map is in the linux-image-<version>-dbg package')."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(300)
    except OSError:
        return False
    return DEBIAN_PLACEHOLDER.encode() in head


# --- Module.symvers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SymversEntry:
    """One exported symbol of Module.symvers."""

    name: str
    crc: int
    module: str  # "vmlinux" or the module path without .ko ("net/netfilter/nf_conntrack")
    export_type: str  # "EXPORT_SYMBOL", "EXPORT_SYMBOL_GPL", ... ("" in the old 3-column layout)
    namespace: str


def parse_symvers(path: Path) -> dict[str, SymversEntry]:
    """Parse Module.symvers (plain or gzipped) in any of its layouts; a duplicated symbol is an InputError.

    Layouts: ``crc sym module`` (old), ``crc sym module export`` (up to 5.3),
    ``crc sym namespace module export`` (5.4-5.8), ``crc sym module export namespace`` (5.9+).
    """
    out: dict[str, SymversEntry] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        entry = _symvers_entry(cols)
        if entry is None:
            raise InputError(f"{path}:{lineno}: not a Module.symvers line: {line[:80]!r}")
        if entry.name in out:
            raise InputError(
                f"{path}:{lineno}: {entry.name} exported twice ({out[entry.name].module} and {entry.module})"
            )
        out[entry.name] = entry
    if not out:
        raise InputError(f"{path}: no exported symbols")
    return out


def _symvers_entry(cols: list[str]) -> SymversEntry | None:
    while len(cols) > 3 and cols[-1] == "" and not (len(cols) == 5 and cols[3].startswith("EXPORT_")):
        cols = cols[:-1]
    try:
        crc = int(cols[0], 16)
    except (ValueError, IndexError):
        return None
    if len(cols) == 3:
        sym, module, export, ns = cols[1], cols[2], "", ""
    elif len(cols) == 4 and cols[3].startswith("EXPORT_"):
        sym, module, export, ns = cols[1], cols[2], cols[3], ""
    elif len(cols) == 5 and cols[4].startswith("EXPORT_"):
        sym, ns, module, export = cols[1], cols[2], cols[3], cols[4]
    elif len(cols) == 5 and cols[3].startswith("EXPORT_"):
        sym, module, export, ns = cols[1], cols[2], cols[3], cols[4]
    else:
        return None
    if not sym or not module:
        return None
    return SymversEntry(sym, crc, module, export, ns)


# --- .config -------------------------------------------------------------------------------------------------

_CONFIG_LINE = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET_LINE = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")

# ConfigFlags field -> the CONFIG_ option that decides it (true when =y or =m)
CONFIG_OPTIONS = {
    "ftrace_with_regs": "DYNAMIC_FTRACE_WITH_REGS",
    "ftrace_with_args": "DYNAMIC_FTRACE_WITH_ARGS",
    "kprobes": "KPROBES",
    "livepatch": "LIVEPATCH",
    "ct_events": "NF_CONNTRACK_EVENTS",
    "ct_procfs": "NF_CONNTRACK_PROCFS",
    "modules": "MODULES",
    "module_sig_force": "MODULE_SIG_FORCE",
    "x86_ibt": "X86_KERNEL_IBT",
    "cfi_clang": "CFI_CLANG",
    "kasan": "KASAN",
}


def parse_config(path: Path) -> dict[str, str]:
    """Every option of a kernel .config (plain or gzipped, e.g. /proc/config.gz); unset ones map to "n"."""
    values: dict[str, str] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        line = line.strip()
        if m := _CONFIG_LINE.match(line):
            values[m[1]] = m[2].strip('"')
        elif m := _UNSET_LINE.match(line):
            values[m[1]] = "n"
        elif line and not line.startswith("#"):
            raise InputError(f"{path}:{lineno}: not a kernel config line: {line[:80]!r}")
    if not values:
        raise InputError(f"{path}: no CONFIG_ options: not a kernel .config")
    return values


def config_flags(path: Path | None) -> ConfigFlags:
    """The flags nqgen cares about; with no config every flag is False and ``known`` is False."""
    if path is None:
        return ConfigFlags(**{name: False for name in CONFIG_OPTIONS}, known=False)
    values = parse_config(path)
    return ConfigFlags(**{name: values.get(opt, "n") in ("y", "m") for name, opt in CONFIG_OPTIONS.items()},
                       known=True)  # fmt: skip


# --- kernel release of a headers tree ---------------------------------------------------------------------

_UTS = re.compile(r'#define\s+UTS_RELEASE\s+"([^"]+)"')


def kernel_release(kdir: Path) -> str:
    """The release a headers/build tree was made for (what ``uname -r`` prints on that kernel).

    ``include/generated/utsrelease.h`` comes first: it is UTS_RELEASE itself. Debian's headers put the upstream
    version ("6.1.192") in ``include/config/kernel.release`` but "6.1.0-56-amd64" in UTS_RELEASE, and only the
    latter names /lib/modules/<release>.
    """
    if not Path(kdir).is_dir():
        raise InputError(f"{kdir}: no such kernel headers directory")
    uts = Path(kdir) / "include/generated/utsrelease.h"
    if uts.is_file():
        m = _UTS.search(read_text(uts))
        if m is None:
            raise InputError(f"{uts}: no UTS_RELEASE definition")
        return _checked_release(uts, m[1])
    rel = Path(kdir) / "include/config/kernel.release"
    if rel.is_file():
        return _checked_release(rel, read_text(rel).strip())
    raise InputError(f"{kdir}: neither include/generated/utsrelease.h nor include/config/kernel.release: "
                     "not a prepared kernel tree")  # fmt: skip


def _checked_release(path: Path, release: str) -> str:
    """What ``uname -r`` can print: 1-64 printable characters without blanks (it names /lib/modules/<release>
    and goes into the generated modules' vermagic and file names)."""
    if not release or len(release) > 64 or not release.isprintable() or any(c.isspace() for c in release) or \
            "/" in release or release in (".", ".."):
        raise InputError(f"{path}: not a kernel release string: {release[:80]!r}")
    return release


def release_version(release: str) -> tuple[int, int, int]:
    """(major, minor, patch) from the start of a release string; informative only."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if m is None:
        raise InputError(f"release {release!r} does not start with a version number")
    return int(m[1]), int(m[2]), int(m[3] or 0)


__all__ = [
    "CAP_ENV",
    "CONFIG_OPTIONS",
    "MAX_DECOMPRESSED",
    "MAX_EXPANSION",
    "MAX_INPUT",
    "MAX_TEXT",
    "SymbolList",
    "SymversEntry",
    "TextSymbol",
    "config_flags",
    "decompression_cap",
    "is_placeholder_system_map",
    "kernel_release",
    "parse_config",
    "parse_symbol_list",
    "parse_symvers",
    "read_capped",
    "read_elf_input",
    "read_text",
    "release_version",
]
