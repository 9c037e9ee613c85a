"""Read the symbols, exports, modinfo and traceable sites of a kernel module or vmlinux.

pyelftools parses the ELF header and the section table; the symbol table, relocations and notes are then read
in bulk from the file's bytes with ``struct`` (about 20x faster than pyelftools' per-entry objects, and every
offset is bounds-checked first, so hostile input raises :class:`ElfFormatError` instead of looping).
Only x86_64 little-endian ELF is accepted: nqgen targets nothing else.

A linked image's symbol table (a vmlinux has 100 000 and more entries) is validated in bulk when the file is parsed,
then left in the file's bytes: :meth:`ElfImage.find` looks a name up the way ``nm | grep`` does (the name in
.strtab, then the entries pointing at it), and the full tuple, the exports and the ftrace sites of a linked image
are built the first time they are asked for. A module (about 1 000 symbols) is read whole when parsed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import mmap
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, cast

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from nqgen.errors import ElfFormatError, SymbolError
from nqgen.profile import NFPROTO_NAMES, HookEntry, Symbol
from nqgen.symsources import read_elf_input

ImageKind = Literal["module", "vmlinux"]
# a plain file is mapped (slicing it yields bytes), a decompressed one is held
ElfData = bytes | mmap.mmap

EM_X86_64 = 62
SHT_NOBITS = 8
SHT_RELA = 4
SHT_SYMTAB = 2
SHT_NOTE = 7
SHN_UNDEF = 0
SHN_LORESERVE = 0xFF00
SHN_ABS = 0xFFF1
SHN_COMMON = 0xFFF2
NT_GNU_BUILD_ID = 3
ENDBR64_SIZE = 4  # an IBT kernel's functions start with endbr64; the fentry call follows it

_BINDINGS = {0: "LOCAL", 1: "GLOBAL", 2: "WEAK", 10: "GNU_UNIQUE"}
_KINDS = {0: "NOTYPE", 1: "OBJECT", 2: "FUNC", 3: "SECTION", 4: "FILE", 5: "COMMON", 6: "TLS"}
_SYM = struct.Struct("<IBBHQQ")  # st_name, st_info, st_other, st_shndx, st_value, st_size
_RELA = struct.Struct("<QQq")  # r_offset, r_info, r_addend
_TRACE_SECTIONS = ("__mcount_loc", "__patchable_function_entries")


@dataclass(frozen=True)
class Section:
    """One section header, with its name resolved."""

    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int


@dataclass(frozen=True)
class Reloc:
    """One RELA entry of a section, with its target symbol already resolved to (section, offset)."""

    offset: int  # where in the relocated section
    type: int
    symbol: Symbol  # the symbol named by the entry (a section symbol is named after its section)
    addend: int

    @property
    def target(self) -> tuple[str, int]:
        """The (section, offset) the entry points at: symbol value plus addend."""
        return self.symbol.section, self.symbol.value + self.addend


@dataclass(frozen=True)
class ElfImage:
    """What nqgen needs from one kernel module (``kind == "module"``) or vmlinux image.

    ``symbols``, ``exports`` and ``traceable_sites`` are computed once, when first used (eagerly for a module);
    a damaged table of a linked image is found when the file is parsed, except for __ksymtab (read with exports).
    """

    path: str
    kind: ImageKind
    compression: str | None  # None, "xz", "zst" or "gz"
    sections: tuple[str, ...]
    modinfo: dict[str, tuple[str, ...]]  # key -> every value, in file order (alias repeats)
    build_id: str | None
    _data: ElfData = field(repr=False, compare=False, default=b"")
    _sections: tuple[Section, ...] = field(repr=False, compare=False, default=())
    _table: _SymbolTable | None = field(repr=False, compare=False, default=None)
    _linked_sites: tuple[bytes, ...] = field(repr=False, compare=False, default=())  # address tables of a vmlinux

    @functools.cached_property
    def symbols(self) -> tuple[Symbol, ...]:
        """Every entry of .symtab after the null one, duplicates kept, in table order."""
        if self._table is None:
            return ()
        with _malformed(self.path):
            return self._table.all()

    @functools.cached_property
    def exports(self) -> frozenset[str]:
        """Names the image exports (``__ksymtab`` symbols, entries and their relocations)."""
        with _malformed(self.path):
            return _read_exports(self)

    @functools.cached_property
    def traceable_sites(self) -> frozenset[tuple[str, int]]:
        """(section, offset/address) of every fentry/patchable site."""
        with _malformed(self.path):
            return _read_trace_sites(self)

    def info(self, key: str) -> str | None:
        """The first .modinfo value of ``key``, or None."""
        values = self.modinfo.get(key)
        return values[0] if values else None

    @property
    def name(self) -> str:
        """The module name (from .modinfo, else the file name without ``.ko*``)."""
        return self.info("name") or Path(self.path).name.split(".", 1)[0].replace("-", "_")

    def find(self, name: str, *, defined: bool = True) -> tuple[Symbol, ...]:
        """Every symbol called ``name`` (only defined ones unless ``defined`` is False), in table order."""
        return tuple(s for s in self._named(name) if s.section or not defined)

    def _named(self, name: str) -> tuple[Symbol, ...]:
        # a section symbol is named after its section, whatever its st_name says: those names take the long way
        if self._table is None or not name or name in self.sections or name == "*COM*" or "\ufffd" in name:
            return tuple(s for s in self.symbols if s.name == name)
        try:
            wanted = name.encode()
        except UnicodeEncodeError:  # a lone surrogate: no decoded name can equal it
            return ()
        with _malformed(self.path):
            found = self._table.named(wanted)
        return found if found is not None else tuple(s for s in self.symbols if s.name == name)

    def function_at(self, section: str, offset: int) -> Symbol | None:
        """The FUNC symbol starting exactly at ``offset`` of ``section`` (a global one when several)."""
        hits = [s for s in self.symbols if s.kind == "FUNC" and s.section == section and s.value == offset]
        hits.sort(key=lambda s: s.binding != "GLOBAL")
        return hits[0] if hits else None

    def is_traceable(self, sym: Symbol) -> bool:
        """True when ftrace has a call site at the symbol's start (or just past an ENDBR64)."""
        return any((sym.section, sym.value + delta) in self.traceable_sites for delta in (0, ENDBR64_SIZE))

    def section(self, name: str) -> Section:
        for sec in self._sections:
            if sec.name == name:
                return sec
        raise ElfFormatError(f"{self.path}: no section {name}")

    def section_bytes(self, name: str) -> bytes:
        """The file bytes of section ``name``; ElfFormatError for a section without any (.bss)."""
        sec = self.section(name)
        if sec.type == SHT_NOBITS:
            raise ElfFormatError(f"{self.path}: section {name} has no data in the file (NOBITS)")
        return self._data[sec.offset : sec.offset + sec.size]

    def relocations(self, name: str) -> tuple[Reloc, ...]:
        """The RELA entries that apply to section ``name`` (empty for a linked image)."""
        return tuple(_relocations_for(self, self.section(name).index))


def load_module(path: Path) -> ElfImage:
    """A relocatable kernel module (``.ko``, ``.ko.xz``, ``.ko.zst``, ``.ko.gz``)."""
    return load_elf(path, expect="module")


def load_vmlinux(path: Path) -> ElfImage:
    """A linked kernel image with its symbol table (an ELF ``vmlinux``, not a bzImage)."""
    return load_elf(path, expect="vmlinux")


def load_elf(path: Path, *, expect: ImageKind | None = None) -> ElfImage:
    """Read ``path`` (decompressing it when needed); ``expect`` checks relocatable vs linked."""
    data, compression = read_elf_input(path)
    return parse_elf(data, str(path), compression=compression, expect=expect)


def parse_elf(data: ElfData, path: str, *, compression: str | None = None, expect: ImageKind | None = None) -> ElfImage:
    """Parse an in-memory ELF; ``path`` only names the file in messages."""
    _check_ident(data, path)
    with _malformed(path):
        image = _parse(data, path, compression, expect)
    if image.kind == "module":  # small: read whole now, so every error shows here
        _ = image.symbols, image.exports, image.traceable_sites
    return image


# what pyelftools (or struct on a damaged table) raises on hostile input; converted to ElfFormatError
_PARSER_ERRORS = (
    ELFError,
    struct.error,
    ValueError,
    IndexError,
    KeyError,
    UnicodeDecodeError,
    AttributeError,
    OverflowError,
    TypeError,
    AssertionError,
)


@contextlib.contextmanager
def _malformed(path: str) -> Iterator[None]:
    try:
        yield
    except _PARSER_ERRORS as exc:
        raise ElfFormatError(f"{path}: malformed ELF: {type(exc).__name__}: {exc}") from None


def _parse(data: ElfData, path: str, compression: str | None, expect: ImageKind | None) -> ElfImage:
    # a mapping reads like a file (seek/read/tell); BytesIO of it would copy the whole image
    elf = ELFFile(cast(IO[bytes], data) if isinstance(data, mmap.mmap) else io.BytesIO(data))
    kind: ImageKind = "module" if elf.header["e_type"] == "ET_REL" else "vmlinux"
    if expect is not None and kind != expect:
        want = "a relocatable module (ET_REL)" if expect == "module" else "a linked image"
        raise ElfFormatError(f"{path}: not {want}: e_type is {elf.header['e_type']}")
    sections = _read_sections(elf, data, path)
    bare = ElfImage(
        path=path,
        kind=kind,
        compression=compression,
        sections=tuple(s.name for s in sections),
        modinfo={},
        build_id=None,
        _data=data,
        _sections=sections,
        _table=_symbol_table(sections, data, path, required=kind == "module"),
    )
    return dataclasses.replace(
        bare,
        modinfo=_read_modinfo(bare),
        build_id=_read_build_id(bare),
        _linked_sites=_linked_site_tables(bare) if kind == "vmlinux" else (),
    )


def _check_ident(data: ElfData, path: str) -> None:
    if len(data) < 4 or data[:4] != b"\x7fELF":
        raise ElfFormatError(f"{path}: not an ELF file")
    if len(data) < 64:
        raise ElfFormatError(f"{path}: truncated ELF: {len(data)} bytes, shorter than an ELF64 header")
    if data[4] != 2:
        raise ElfFormatError(f"{path}: ELF class {data[4]} is not ELF64: nqgen targets x86_64 only")
    if data[5] != 1:
        raise ElfFormatError(f"{path}: big-endian or unknown byte order ({data[5]}): nqgen targets x86_64 only")
    machine = struct.unpack_from("<H", data, 18)[0]
    if machine != EM_X86_64:
        raise ElfFormatError(f"{path}: e_machine {machine} is not x86_64 (62)")
    (shoff,) = struct.unpack_from("<Q", data, 40)
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    if shoff == 0 or shnum == 0:
        raise ElfFormatError(f"{path}: no section header table")
    if shentsize != 64 or shoff + shnum * 64 > len(data):
        raise ElfFormatError(f"{path}: truncated ELF: section headers end past the file's {len(data)} bytes")


def _read_sections(elf: ELFFile, data: ElfData, path: str) -> tuple[Section, ...]:
    out = []
    for index in range(elf.num_sections()):
        sec = elf.get_section(index)
        hdr = sec.header
        stype = hdr["sh_type"]
        type_num = stype if isinstance(stype, int) else _SH_TYPES.get(stype, -1)
        if type_num != SHT_NOBITS and hdr["sh_offset"] + hdr["sh_size"] > len(data):
            raise ElfFormatError(f"{path}: truncated ELF: section {sec.name or index} ends past the file end")
        out.append(
            Section(
                index=index,
                name=sec.name,
                type=type_num,
                flags=hdr["sh_flags"],
                addr=hdr["sh_addr"],
                offset=hdr["sh_offset"],
                size=hdr["sh_size"],
                link=hdr["sh_link"],
                info=hdr["sh_info"],
            )
        )
    return tuple(out)


_SH_TYPES = {"SHT_NULL": 0, "SHT_PROGBITS": 1, "SHT_SYMTAB": SHT_SYMTAB, "SHT_STRTAB": 3, "SHT_RELA": SHT_RELA,
             "SHT_HASH": 5, "SHT_DYNAMIC": 6, "SHT_NOTE": SHT_NOTE, "SHT_NOBITS": SHT_NOBITS, "SHT_REL": 9,
             "SHT_DYNSYM": 11}  # fmt: skip


def _symtab(sections: tuple[Section, ...]) -> Section | None:
    tabs = [s for s in sections if s.type == SHT_SYMTAB]
    return tabs[0] if tabs else None


def _symbol_table(sections: tuple[Section, ...], data: ElfData, path: str, *, required: bool) -> _SymbolTable | None:
    """The .symtab, checked; None for a stripped vmlinux (its exports still come from __ksymtab)."""
    tab = _symtab(sections)
    if tab is None:
        if not required:
            return None
        raise ElfFormatError(f"{path}: no symbol table (.symtab): stripped file")
    if tab.link >= len(sections) or tab.size % _SYM.size:
        raise ElfFormatError(f"{path}: malformed .symtab header")
    strsec = sections[tab.link]
    table = _SymbolTable(path, data, tab, strsec, tuple(s.name for s in sections))
    table.check()
    return table


class _SymbolTable:
    """The entries of a .symtab and the names of its .strtab, left in the file's bytes until asked for."""

    def __init__(self, path: str, data: ElfData, tab: Section, strsec: Section, section_names: tuple[str, ...]):
        self.path = path
        self.data = data
        self.lo = tab.offset + _SYM.size  # after the null entry
        self.count = max(0, tab.size // _SYM.size - 1)
        # (sliced as the whole-table read slices it: a .strtab past the file's end is cut short, not an error)
        self.str_lo = min(strsec.offset, len(data))
        self.str_hi = max(self.str_lo, min(strsec.offset + strsec.size, len(data)))
        self.section_names = section_names
        raw = data[self.lo : self.lo + self.count * _SYM.size]
        self.name_column = memoryview(raw).cast("I")[0 :: _SYM.size // 4].tobytes()  # every st_name, u32 LE
        self.shndx_values = set(memoryview(raw).cast("H")[3 :: _SYM.size // 2])
        self._decoded: dict[int, Symbol] = {}

    def check(self) -> None:
        """Raise what reading every entry would raise, without building them: bad section indexes, names
        outside .strtab (both are rare: the full read then runs to give the exact error)."""
        nsec = len(self.section_names)
        bad_index = any(
            v not in (SHN_UNDEF, SHN_ABS, SHN_COMMON) and not (v < nsec and v < SHN_LORESERVE)
            for v in self.shndx_values
        )
        last_nul = self.data.rfind(b"\0", self.str_lo, self.str_hi)
        top_name = max(memoryview(self.name_column).cast("I"), default=0)
        if bad_index or (self.count and top_name > last_nul - self.str_lo):
            self.all()  # raises (a section symbol's name is never read, so a bad offset there is no error)

    def _symbol(self, st_name: int, info: int, shndx: int, value: int, size: int, name_at: Callable[[int], str]
                ) -> Symbol:  # fmt: skip
        kind = _KINDS.get(info & 0xF, str(info & 0xF))
        if shndx == SHN_UNDEF:
            sec = ""
        elif shndx == SHN_ABS:
            sec = "*ABS*"
        elif shndx == SHN_COMMON:
            sec = "*COM*"
        elif shndx < len(self.section_names) and shndx < SHN_LORESERVE:
            sec = self.section_names[shndx]
        else:
            raise ElfFormatError(f"{self.path}: a symbol lies in bad section index {shndx}")
        name = sec if kind == "SECTION" and sec not in ("", "*ABS*") else name_at(st_name)
        return Symbol(name, sec, value, size, _BINDINGS.get(info >> 4, str(info >> 4)), kind)

    def all(self) -> tuple[Symbol, ...]:
        strtab = self.data[self.str_lo : self.str_hi]
        raw = self.data[self.lo : self.lo + self.count * _SYM.size]

        def name_at(offset: int) -> str:
            return _cstr(strtab, offset, self.path)

        return tuple(
            self._symbol(st_name, info, shndx, value, size, name_at)
            for st_name, info, _other, shndx, value, size in _SYM.iter_unpack(raw)
        )

    def _name_at(self, offset: int) -> str:
        end = self.data.find(b"\0", self.str_lo + offset, self.str_hi)
        return self.data[self.str_lo + offset : end].decode("utf-8", "replace")

    def entry(self, index: int) -> Symbol:
        """Entry ``index`` (from 0, after the null one), decoded alone (and kept: relocations repeat them)."""
        sym = self._decoded.get(index)
        if sym is None:
            st_name, info, _other, shndx, value, size = _SYM.unpack_from(self.data, self.lo + index * _SYM.size)
            sym = self._decoded[index] = self._symbol(st_name, info, shndx, value, size, self._name_at)
        return sym

    def prefixed(self, prefix: bytes) -> list[int]:
        """The indexes of the entries whose name starts with ``prefix`` (section symbols may be among them)."""
        offsets = set()
        pos = self.str_lo
        while (hit := self.data.find(prefix, pos, self.str_hi)) >= 0:
            offsets.add(hit - self.str_lo)
            pos = hit + 1
        return [i for i, st_name in enumerate(memoryview(self.name_column).cast("I")) if st_name in offsets]

    def named(self, name: bytes) -> tuple[Symbol, ...] | None:
        """Every entry whose name is ``name``, in table order, found as grep would: the name's places in
        .strtab (anywhere a string ends with it: the linker shares string tails), then the st_name column.
        None when that would take more than LOOKUP_STEPS searches or hits (a degenerate or hostile table, or a
        name thousands of entries share): the caller then scans every entry, which is bounded by the table."""
        needle = name + b"\0"
        indexes = []
        steps = 0
        pos = self.str_lo
        while (hit := self.data.find(needle, pos, self.str_hi)) >= 0:
            pos = hit + len(needle)
            if hit - self.str_lo >= 1 << 32:
                break
            key = (hit - self.str_lo).to_bytes(4, "little")
            at = self.name_column.find(key)
            while at >= 0:
                steps += 1
                if steps > LOOKUP_STEPS:
                    return None
                if at % 4 == 0:  # (a hit across two columns is not an entry)
                    indexes.append(at // 4)
                at = self.name_column.find(key, at + 1)
            steps += 1
            if steps > LOOKUP_STEPS:
                return None
        found = [self.entry(index) for index in sorted(indexes)]
        return tuple(s for s in found if s.name == name.decode())


LOOKUP_STEPS = 4096


def _cstr(table: bytes, offset: int, path: str) -> str:
    end = table.find(b"\0", offset)
    if offset >= len(table) or end < 0:
        raise ElfFormatError(f"{path}: symbol name offset {offset} outside its string table")
    return table[offset:end].decode("utf-8", "replace")


def _entry(image: ElfImage, index: int) -> Symbol:
    """Entry ``index`` (from 0, after the null one): from the full tuple once built, else decoded alone."""
    if "symbols" in image.__dict__ or image._table is None:
        return image.symbols[index]
    return image._table.entry(index)


def _rela_sections(image: ElfImage, target_index: int) -> Iterator[tuple[str, bytes]]:
    """Name and raw entries of every SHT_RELA section that relocates section ``target_index``, size checked."""
    for sec in image._sections:
        if sec.type != SHT_RELA or sec.info != target_index:
            continue
        if sec.size % _RELA.size:
            raise ElfFormatError(f"{image.path}: malformed relocation section {sec.name}")
        yield sec.name, image._data[sec.offset : sec.offset + sec.size]


def _relocations_for(image: ElfImage, target_index: int) -> Iterator[Reloc]:
    nsyms = image._table.count if image._table is not None else 0
    for name, raw in _rela_sections(image, target_index):
        for r_offset, r_info, addend in _RELA.iter_unpack(raw):
            symidx = r_info >> 32
            if symidx == 0 or symidx > nsyms:
                raise ElfFormatError(f"{image.path}: {name}: relocation names symbol {symidx} of {nsyms}")
            yield Reloc(r_offset, r_info & 0xFFFFFFFF, _entry(image, symidx - 1), addend)


def _relocated_symbols(image: ElfImage, target_index: int) -> Iterator[Symbol]:
    """The symbols named by the relocations of a section, as _relocations_for gives them, except a section
    symbol or one in __ksymtab_strings (never an export), which is skipped without being decoded: a linked
    vmlinux's __ksymtab relocations name 30 000 entries, two thirds of them __kstrtab strings."""
    if "symbols" in image.__dict__ or image._table is None:
        yield from (rel.symbol for rel in _relocations_for(image, target_index))
        return
    table = image._table
    strings = image.sections.index("__ksymtab_strings") if "__ksymtab_strings" in image.sections else -1
    for name, raw in _rela_sections(image, target_index):
        for r_info in memoryview(raw).cast("Q")[1 :: _RELA.size // 8]:
            symidx = r_info >> 32
            if symidx == 0 or symidx > table.count:
                raise ElfFormatError(f"{image.path}: {name}: relocation names symbol {symidx} of {table.count}")
            _name, info, _other, shndx = struct.unpack_from("<IBBH", image._data, table.lo + (symidx - 1) * _SYM.size)
            if info & 0xF != 3 and shndx != strings:  # (STT_SECTION; the checked table has no bad shndx)
                yield table.entry(symidx - 1)


def _read_exports(image: ElfImage) -> frozenset[str]:
    """Names exported by the image: ``__ksymtab_<name>`` symbols, plus the value relocations of ksymtab entries."""
    # (a linked image's 100 000 entries are not all built for this: only those whose name has the prefix)
    candidates = (image.symbols if "symbols" in image.__dict__ or image._table is None
                  else [image._table.entry(i) for i in image._table.prefixed(b"__ksymtab_")])  # fmt: skip
    names = {
        s.name.removeprefix("__ksymtab_")
        for s in candidates
        if s.name.startswith("__ksymtab_") and s.section.startswith("__ksymtab") and s.kind != "SECTION"
    }
    names.discard("strings")
    for sec in image._sections:
        if not sec.name.startswith("__ksymtab") or sec.name == "__ksymtab_strings":
            continue
        for sym in _relocated_symbols(image, sec.index):
            if sym.kind == "SECTION" or sym.section == "__ksymtab_strings" or not sym.name:
                continue
            if sym.name.startswith(("__kstrtab", "__kstrtabns")):
                continue
            names.add(sym.name)
    if image.kind == "vmlinux":
        names |= _linked_ksymtab_names(image)
    return frozenset(names)


# struct kernel_symbol in a linked image: PREL32 value/name/namespace (5.4+), PREL32 value/name (4.19-5.3),
# absolute value/name pointers (older kernels, or no HAVE_ARCH_PREL32_RELOCATIONS)
_KSYMTAB_FORMS = ((12, True), (8, True), (16, False))


def _linked_ksymtab_names(image: ElfImage) -> set[str]:
    """Exported names read from the __ksymtab entries themselves (works on a stripped vmlinux)."""
    if "__ksymtab_strings" not in image.sections:
        return set()
    strings = image.section("__ksymtab_strings")
    blob = image.section_bytes("__ksymtab_strings")
    alloc = [(s.addr, s.addr + s.size) for s in image._sections if s.flags & 0x2]  # SHF_ALLOC (percpu at 0)
    names: set[str] = set()
    for sec in image._sections:
        if sec.name not in ("__ksymtab", "__ksymtab_gpl", "__ksymtab_gpl_future") or sec.size == 0:
            continue
        raw = image.section_bytes(sec.name)
        for size, prel in _KSYMTAB_FORMS:
            found = _ksymtab_entries(raw, sec.addr, size, prel, strings.addr, blob, alloc)
            if found is not None:
                names |= found
                break
        else:
            raise ElfFormatError(f"{image.path}: {sec.name} entries match no struct kernel_symbol layout")
    return names


_IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_.$]*")


def _ksymtab_entries(
    raw: bytes, base: int, size: int, prel: bool, str_addr: int, blob: bytes, alloc: list[tuple[int, int]]
) -> set[str] | None:
    """The names of entries of ``size`` bytes, or None when any entry does not decode to a valid one."""
    if len(raw) % size:
        return None
    names = set()
    for pos in range(0, len(raw), size):
        if prel:
            value_rel, name_rel = struct.unpack_from("<ii", raw, pos)
            value = (base + pos + value_rel) & 0xFFFFFFFFFFFFFFFF  # per-cpu symbols are offsets from 0
            where = base + pos + 4 + name_rel - str_addr
        else:
            value, name_addr = struct.unpack_from("<QQ", raw, pos)
            where = name_addr - str_addr
        if not 0 <= where < len(blob):
            return None  # (the linker tail-merges these strings: a name may start mid-string)
        if not any(lo <= value < hi for lo, hi in alloc):
            return None  # the value is an address in the image
        end = blob.find(b"\0", where)
        if end < 0 or _IDENT.fullmatch(blob, where, end) is None:
            return None
        names.add(blob[where:end].decode("ascii"))
    return names


def _read_modinfo(image: ElfImage) -> dict[str, tuple[str, ...]]:
    if ".modinfo" not in image.sections:
        return {}
    info: dict[str, list[str]] = {}
    for item in image.section_bytes(".modinfo").split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return {k: tuple(v) for k, v in info.items()}


def _read_build_id(image: ElfImage) -> str | None:
    for sec in image._sections:
        if sec.type != SHT_NOTE:
            continue
        raw = image.section_bytes(sec.name)
        pos = 0
        while pos + 12 <= len(raw):
            namesz, descsz, ntype = struct.unpack_from("<III", raw, pos)
            name_end = pos + 12 + namesz
            desc_start = pos + 12 + ((namesz + 3) & ~3)
            desc_end = desc_start + descsz
            if desc_end > len(raw):
                break
            if ntype == NT_GNU_BUILD_ID and raw[pos + 12 : name_end].rstrip(b"\0") == b"GNU":
                return raw[desc_start:desc_end].hex()
            pos = desc_start + ((descsz + 3) & ~3)  # always advances by >= 12: no loop on bad input
    return None


def _read_trace_sites(image: ElfImage) -> frozenset[tuple[str, int]]:
    """(section, offset) of every ftrace call site of a module; (section, address) for a linked image."""
    sites: set[tuple[str, int]] = set()
    if image.kind == "vmlinux":
        for raw in image._linked_sites:
            sites.update(_addresses(image, raw))
        return frozenset(sites)
    for name in _TRACE_SECTIONS:
        if name not in image.sections:
            continue
        for rel in _relocations_for(image, image.section(name).index):
            site, offset = rel.target
            # a call site inside a section of this module; anything else is a damaged entry (found by
            # tests/test_fuzz.py: an entry naming an undefined symbol gave the site ('', -4))
            if not site or site not in image.sections or not 0 <= offset <= image.section(site).size:
                raise ElfFormatError(f"{image.path}: {name} entry points outside any section ({site or '?'}"
                                     f"{offset:+#x})")  # fmt: skip
            sites.add((site, offset))
    return frozenset(sites)


def _linked_site_tables(image: ElfImage) -> tuple[bytes, ...]:
    """The address tables of a linked image's ftrace sites, checked (their addresses are read when first used)."""
    tables = [image.section_bytes(name) for name in _TRACE_SECTIONS if name in image.sections]
    # vmlinux's linker script folds __mcount_loc into .init.data between these two symbols
    start, stop = image.find("__start_mcount_loc"), image.find("__stop_mcount_loc")
    if len(start) == 1 and len(stop) == 1 and start[0].section == stop[0].section:
        sec = image.section(start[0].section)
        lo, hi = start[0].value - sec.addr, stop[0].value - sec.addr
        if not 0 <= lo <= hi <= sec.size:
            raise ElfFormatError(f"{image.path}: __start_mcount_loc/__stop_mcount_loc outside {sec.name}")
        tables.append(image.section_bytes(sec.name)[lo:hi])
    return tuple(tables)


def _addresses(image: ElfImage, raw: bytes) -> set[tuple[str, int]]:
    text = sorted((s.addr, s.addr + s.size, s.name) for s in image._sections if s.addr and s.flags & 0x4)
    out = set()
    for (addr,) in struct.iter_unpack("<Q", raw[: len(raw) // 8 * 8]):
        name = next((n for lo, hi, n in text if lo <= addr < hi), "")
        out.add((name, addr))
    return out


# --- struct nf_hook_ops arrays ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpsLayout:
    """Where pf, hooknum and priority sit, relative to the hook pointer of one nf_hook_ops element."""

    name: str
    pf: int
    hooknum: int
    priority: int


# hook, dev|owner, priv, u8 pf, [hook_ops_type:8], unsigned hooknum, int priority: every kernel from 4.1 to 6.x
# (with or without a leading list_head or rcu_head) and RHEL 7 (hook, owner, priv, ..., reserved fields after).
# hook, owner, u8 pf, unsigned hooknum, int priority: 3.10-4.0 upstream.
OPS_LAYOUTS = (
    OpsLayout("hook,dev|owner,priv,pf,hooknum,priority", 24, 28, 32),
    OpsLayout("hook,owner,pf,hooknum,priority", 16, 20, 24),
)
VALID_PF = frozenset(NFPROTO_NAMES)
VALID_HOOKNUM = range(5)


def decode_ops_array(image: ElfImage, name: str) -> tuple[HookEntry, ...]:
    """Decode a static ``struct nf_hook_ops name[]`` from its bytes and the relocations of its section."""
    found = [s for s in image.find(name) if s.kind == "OBJECT"]
    if not found:
        raise SymbolError(f"{image.path}: no ops array {name}")
    if len(found) > 1:
        raise SymbolError(f"{image.path}: {len(found)} objects named {name}")
    arr = found[0]
    if image.kind != "module":
        raise ElfFormatError(f"{image.path}: ops arrays are decoded from a relocatable module only")
    blob = image.section_bytes(arr.section)[arr.value : arr.value + arr.size]
    if arr.size == 0 or len(blob) != arr.size:
        raise ElfFormatError(f"{image.path}: {name} has no data (size {arr.size})")
    hooks: dict[int, str] = {}
    for rel in image.relocations(arr.section):
        if not arr.value <= rel.offset < arr.value + arr.size:
            continue
        fn = _function_of(image, rel)
        if fn is not None:
            hooks[rel.offset - arr.value] = fn
    if not hooks or arr.size % len(hooks):
        raise ElfFormatError(f"{image.path}: {name}: {len(hooks)} function pointers do not divide its {arr.size} bytes")
    stride = arr.size // len(hooks)
    field_offsets = {off % stride for off in hooks}
    if len(field_offsets) != 1 or sorted(hooks) != [i * stride + min(hooks) for i in range(len(hooks))]:
        raise ElfFormatError(f"{image.path}: {name}: hook pointers are not one per {stride}-byte element")
    hook_off = field_offsets.pop()
    for layout in OPS_LAYOUTS:
        entries = _decode_with(blob, hooks, stride, hook_off, layout)
        if entries is not None:
            return entries
    raise ElfFormatError(f"{image.path}: {name}: no known nf_hook_ops layout gives valid pf/hooknum values")


def _function_of(image: ElfImage, rel: Reloc) -> str | None:
    sym = rel.symbol
    if sym.kind == "FUNC" and rel.addend == 0:
        return sym.name
    if sym.kind == "SECTION" or (sym.kind == "FUNC" and rel.addend):
        fn = image.function_at(*rel.target)
        return fn.name if fn else None
    return None


def _decode_with(
    blob: bytes, hooks: dict[int, str], stride: int, hook_off: int, layout: OpsLayout
) -> tuple[HookEntry, ...] | None:
    if hook_off + layout.priority + 4 > stride:
        return None
    entries = []
    for index, (off, fn) in enumerate(sorted(hooks.items())):
        pf = blob[off + layout.pf]
        hooknum, priority = struct.unpack_from("<Ii", blob, off + layout.hooknum)
        if layout.priority != layout.hooknum + 4:
            (priority,) = struct.unpack_from("<i", blob, off + layout.priority)
        if pf not in VALID_PF or hooknum not in VALID_HOOKNUM:
            return None
        entries.append(HookEntry(index=index, hook=fn, pf=pf, hooknum=hooknum, priority=priority))
    return tuple(entries)


def require_function(image: ElfImage, name: str) -> Symbol:
    """The single defined FUNC ``name`` of the image; SymbolError when missing or ambiguous (with a menu)."""
    hits = [s for s in image.find(name) if s.kind == "FUNC"]
    if not hits:
        raise SymbolError(f"{image.path}: no function {name}")
    if len(hits) > 1:
        menu = ", ".join(f"sympos {i + 1}: {s.section}+{s.value:#x}" for i, s in enumerate(hits))
        raise SymbolError(f"{image.path}: {len(hits)} functions named {name} ({menu})")
    return hits[0]


__all__ = [
    "ElfImage",
    "OpsLayout",
    "Reloc",
    "Section",
    "decode_ops_array",
    "load_elf",
    "load_module",
    "load_vmlinux",
    "parse_elf",
    "require_function",
]
