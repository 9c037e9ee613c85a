"""ElfImage.find's lookup in .strtab (issue 14) against binutils' ``nm`` and against a filter over every symbol.

Files: Debian's nf_conntrack.ko, the reference kernel's vmlinux and the RHEL kernels' vmlinux and conntrack
modules when they are built (each skips, saying which, when absent), compiled fixtures (a module shaped like
RHEL 7's, a linked vmlinux), and the bench's synthetic 107 000-symbol ELF. For a sample of names from each file
(duplicated names, local ones, the names the bench and the profile look up, absent names), ``find`` must give
exactly the entries ``nm`` prints for that name and exactly what scanning the whole table gives.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elffixtures import build_module, link_vmlinux
from nqgen import elfread, kernels, reprokernel, symsources
from nqgen.bench.symbols import KERNEL_NAMES, MODULE_NAMES, synthetic_elf
from nqgen.errors import ElfFormatError, InputError
from nqgen.profile import Symbol

RHEL_RECIPES = ("rhel77", "rhel81", "rhel81-kasan-free")
CONNTRACK = ("net/netfilter/nf_conntrack.ko", "net/ipv4/netfilter/nf_conntrack_ipv4.ko",
             "net/ipv6/netfilter/nf_conntrack_ipv6.ko")  # fmt: skip
SAMPLE = 300  # names per file, and as many duplicated names, besides the fixed ones
ABSENT = ("no_such_symbol_anywhere", "nf_confirm_", "_confirm", "confirm")  # tails and prefixes of real names


def nm_table(path: Path) -> dict[str, list[int | None]]:
    """name -> the value of every entry ``nm`` prints with it (None for an undefined one)."""
    exe = shutil.which("nm")
    if exe is None:
        pytest.skip("binutils' nm is not installed")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, check=True).stdout
    table: dict[str, list[int | None]] = defaultdict(list)
    for line in out.splitlines():
        value, _kind, name = line[:16].strip(), line[17:18], line[19:]
        table[name].append(int(value, 16) if value else None)
    return table


def sample_names(image: elfread.ElfImage) -> list[str]:
    counts: dict[str, int] = defaultdict(int)
    for sym in image.symbols:
        counts[sym.name] += 1
    names = sorted(n for n in counts if n)
    rng = random.Random(14)
    picked = set(rng.sample(names, min(SAMPLE, len(names))))
    duplicated = sorted(n for n, c in counts.items() if c > 1 and n)  # each entry must come back, in order
    picked |= set(rng.sample(duplicated, min(SAMPLE, len(duplicated))))
    picked |= set(KERNEL_NAMES) | set(MODULE_NAMES) | set(ABSENT) | {"__start_mcount_loc", "__stop_mcount_loc"}
    return sorted(picked)


def check_against_nm(path: Path, image: elfread.ElfImage) -> int:
    """Compare; return how many names were checked."""
    nm = nm_table(path)
    names = sample_names(image)
    scanned: dict[str, list[Symbol]] = defaultdict(list)  # what a scan of every entry gives, in table order
    for sym in image.symbols:
        scanned[sym.name].append(sym)
    for name in names:
        found = image.find(name, defined=False)
        assert found == tuple(scanned.get(name, ())), name
        assert image.find(name) == tuple(s for s in found if s.section), name
        # and what binutils prints (nm shows no FILE or SECTION entries)
        ours = sorted((s.value if s.section else None for s in found if s.kind not in ("FILE", "SECTION")),
                      key=lambda v: -1 if v is None else v)  # fmt: skip
        theirs = sorted(nm.get(name, []), key=lambda v: -1 if v is None else v)
        assert ours == theirs, (path, name, ours, theirs)
    return len(names)


def real_files() -> list[tuple[str, Path]]:
    files: list[tuple[str, Path]] = []
    ref = reprokernel.find_built()
    if ref is not None:
        files.append(("reference vmlinux", ref.vmlinux))
    for recipe in RHEL_RECIPES:
        built = kernels.find_built(recipe)
        if built is None:
            continue
        if built.vmlinux.is_file():
            files.append((f"{recipe} vmlinux", built.vmlinux))
        files += [(f"{recipe} {rel}", built.modules_dir / "kernel" / rel) for rel in CONNTRACK
                  if (built.modules_dir / "kernel" / rel).is_file()]  # fmt: skip
    return files


def test_debian_module_lookup_matches_nm(debian) -> None:  # type: ignore[no-untyped-def]
    image = elfread.load_module(debian.nf_conntrack)
    assert check_against_nm(debian.nf_conntrack, image) > 300


@pytest.mark.parametrize("which", ["reference vmlinux", *(f"{r} vmlinux" for r in RHEL_RECIPES),
                                   *(f"{r} {c}" for r in RHEL_RECIPES for c in CONNTRACK)])  # fmt: skip
def test_built_kernel_lookup_matches_nm(which: str) -> None:
    path = dict(real_files()).get(which)
    if path is None:
        pytest.skip(f"{which}: not built here (make repro-kernel / make rhel-kernels)")
    image = elfread.load_elf(path)
    assert check_against_nm(path, image) >= min(SAMPLE, len({s.name for s in image.symbols if s.name}))


def test_fixture_module_and_vmlinux_lookup_match_nm(tmp_path: Path) -> None:
    module = build_module(tmp_path, "nf_conntrack_ipv4_rhel7.c", "nf_conntrack_ipv4.ko")
    vmlinux = link_vmlinux(tmp_path, [module])
    for path in (module, vmlinux):
        assert check_against_nm(path, elfread.load_elf(path)) > 10


def test_synthetic_107k_symbol_elf_lookup_matches_nm(tmp_path: Path) -> None:
    path = synthetic_elf(tmp_path / "big.elf")
    image = elfread.load_elf(path)
    assert check_against_nm(path, image) > SAMPLE
    assert [n for n in KERNEL_NAMES if image.find(n)] == list(KERNEL_NAMES[:-1])


def test_a_shared_string_tail_is_found(tmp_path: Path) -> None:
    """The linker points a name that ends another one at that string's tail; the lookup must find it there."""
    src = tmp_path / "tails.s"
    src.write_text(".text\n.globl _start\n_start: ret\n.globl __pfx_nf_confirm\n__pfx_nf_confirm: nop\n"
                   ".globl nf_confirm\nnf_confirm: ret\n.globl confirm\nconfirm: ret\n")  # fmt: skip
    subprocess.run(["as", str(src), "-o", str(tmp_path / "tails.o")], check=True)
    subprocess.run(["ld", "-o", str(tmp_path / "tails"), str(tmp_path / "tails.o")], check=True)
    image = elfread.load_elf(tmp_path / "tails")
    strtab = image.section_bytes(".strtab")
    assert strtab.count(b"confirm\0") == 1  # one string holds all three names
    assert [s.name for s in image.symbols if "confirm" in s.name] == ["__pfx_nf_confirm", "nf_confirm", "confirm"]
    for name in ("__pfx_nf_confirm", "nf_confirm", "confirm"):
        assert [s.name for s in image.find(name)] == [name]
    assert check_against_nm(tmp_path / "tails", image) >= 3


def test_a_lookup_too_long_for_the_bulk_path_scans_every_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past LOOKUP_STEPS searches (a name in .strtab thousands of times: degenerate or hostile) find() scans the
    table instead, bounded by its size, with the same answers."""
    path = synthetic_elf(tmp_path / "big.elf", count=3000)
    names = sample_names(elfread.load_elf(path))
    fast = {n: elfread.load_elf(path).find(n, defined=False) for n in names}
    monkeypatch.setattr(elfread, "LOOKUP_STEPS", 0)
    image = elfread.load_elf(path)
    assert image._table is not None and image._table.named(b"kallsyms_lookup_name") is None
    assert {n: image.find(n, defined=False) for n in names} == fast


def test_section_symbols_are_found_by_section_name(tmp_path: Path) -> None:
    """A section symbol is named after its section (as before the bulk lookup), whatever its st_name is."""
    module = build_module(tmp_path, "nf_conntrack_ipv4_rhel7.c", "nf_conntrack_ipv4.ko")
    image = elfread.load_module(module)
    text = image.find(".text")
    assert text and all(s.kind == "SECTION" for s in text)
    assert text == tuple(s for s in image.symbols if s.name == ".text")


def test_a_damaged_name_offset_is_still_an_error_at_parse(tmp_path: Path) -> None:
    """The bulk check must refuse what reading every entry refused: an st_name past the end of .strtab."""
    path = synthetic_elf(tmp_path / "big.elf", count=2000)
    data = bytearray(path.read_bytes())
    image = elfread.load_elf(path)
    symtab = image.section(".symtab")
    last = symtab.offset + symtab.size - 24  # the last entry (a function, not a section symbol)
    data[last : last + 4] = (image.section(".strtab").size + 5).to_bytes(4, "little")
    with pytest.raises(ElfFormatError, match=r"symbol name offset .* outside its string table"):
        elfread.parse_elf(bytes(data), "damaged")
    data[last + 6 : last + 8] = (0xFF00).to_bytes(2, "little")  # and a reserved section index
    with pytest.raises(ElfFormatError, match="bad section index"):
        elfread.parse_elf(bytes(data), "damaged")


# --- System.map / kallsyms: the one-pass check of the usual layout ----------------------------------------------

_WORD = st.text(alphabet=st.sampled_from("ab_.$09AF[]-xyz:\\~!"), min_size=1, max_size=6)
_DAMAGE = st.sampled_from([" ", "\t", "\n", "\r", "[", "]", "g", "", "\x0b", "\xe9", "\x00"])


@st.composite
def near_usual_lines(draw: st.DrawFn) -> bytes:
    """Lines in the usual layout (words of printable ASCII, brackets too), half of them then damaged at up to
    three places (a byte replaced, inserted or removed: blanks, CR, brackets, non-hex, non-ASCII, NUL)."""
    lines = []
    for _ in range(draw(st.integers(1, 5))):
        addr = draw(st.sampled_from(["ffffffff81000000", "0", "00ab", "DEADbeef"]))
        kind = draw(st.sampled_from(["T", "t", "d", "[", "]", "~"]))
        module = draw(st.none() | _WORD)
        lines.append(f"{addr} {kind} {draw(_WORD)}" + ("" if module is None else f"\t[{module}]") + "\n")
    text = "".join(lines)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(_DAMAGE) + text[at + draw(st.integers(0, 1)) :]
    return text.encode()


@given(near_usual_lines())
@settings(max_examples=int(os.environ.get("NQGEN_LAYOUT_EXAMPLES", "2000")), deadline=None, database=None)
def test_usual_layout_check_accepts_only_what_the_line_regex_accepts_the_same_way(data: bytes) -> None:
    """Whatever the fast check passes, the per-line regex (the reader before issue 14's change) passes too and
    splits into the same fields; the parse result is the same either way."""
    if symsources._USUAL_LAYOUT.fullmatch(data) is None:
        return
    text = data.decode("ascii")
    rest, count = symsources._STRICT_LINE.subn("", text)
    assert count == text.count("\n") and not rest.strip()
    for line in text.splitlines():
        m = symsources._STRICT_LINE.fullmatch(line)
        assert m is not None
        addr, rest_of_line = line.split(" ", 1)
        kind, rest_of_line = rest_of_line.split(" ", 1)
        name, _, module = rest_of_line.partition("\t")
        assert (m[1], m[2], m[3], m[4] or "") == (addr, kind, name, module[1:-1])


@given(near_usual_lines())
@settings(max_examples=500, deadline=None, database=None)
def test_symbol_list_parse_is_the_same_with_and_without_the_fast_check(data: bytes) -> None:
    path = Path(tempfile.mkstemp(prefix="nqgen-s3speed-")[1])
    try:
        path.write_bytes(data)
        try:
            fast: object = symsources.parse_symbol_list(path)
        except InputError as exc:
            fast = str(exc)
        with mock_fast_check_off():
            try:
                slow: object = symsources.parse_symbol_list(path)
            except InputError as exc:
                slow = str(exc)
    finally:
        path.unlink()
    assert fast == slow


@contextlib.contextmanager
def mock_fast_check_off() -> Iterator[None]:
    """The reader as it was before the fast check: a pattern that matches nothing sends every input the long way."""
    saved = symsources._USUAL_LAYOUT
    symsources._USUAL_LAYOUT = re.compile(rb"(?!)")
    try:
        yield
    finally:
        symsources._USUAL_LAYOUT = saved


def test_this_machines_kallsyms_takes_the_fast_path(tmp_path: Path) -> None:
    try:
        data = Path("/proc/kallsyms").read_bytes()
    except OSError as exc:
        pytest.skip(f"/proc/kallsyms: {exc}")
    assert symsources._USUAL_LAYOUT.fullmatch(data) is not None
    copy = tmp_path / "kallsyms"
    copy.write_bytes(data)
    fast = symsources.parse_symbol_list(copy)
    with mock_fast_check_off():
        slow = symsources.parse_symbol_list(copy)
    assert fast == slow and len(fast.entries) == data.count(b"\n")


@given(near_usual_lines(), st.lists(_WORD | st.sampled_from(["T", "t", "a b", "ab", ""]), max_size=5))
@settings(max_examples=500, deadline=None, database=None)
def test_lookup_many_is_lookup_of_each_name(data: bytes, names: list[str]) -> None:
    """The one-pass lookup the profile and the bench use finds what a lookup per name finds, quirks included
    (a one-letter name equal to the type letter is found twice, as before)."""
    path = Path(tempfile.mkstemp(prefix="nqgen-s3speed-")[1])
    try:
        path.write_bytes(data)
        try:
            listing = symsources.parse_symbol_list(path)
        except InputError:
            return
    finally:
        path.unlink()
    names += [e.name for e in listing.entries[:3]]
    assert listing.lookup_many(names) == {n: listing.lookup(n) for n in names}
