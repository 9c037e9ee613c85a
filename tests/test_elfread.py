"""nqgen.elfread on Debian's real nf_conntrack.ko and on compiled fixtures shaped like other generations."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from elffixtures import (
    build_module,
    compress,
    extract_vmlinux,
    link_relocatable,
    link_vmlinux,
    patched_copy,
    truncated_copy,
)
from nqgen import elfread
from nqgen.errors import ElfFormatError, InputError, NqgenError, SymbolError
from nqgen.profile import HookEntry

INT_MAX = 2**31 - 1


def readelf(*args: str) -> str:
    exe = shutil.which("readelf")
    if exe is None:
        pytest.skip("binutils' readelf is not installed")
    return subprocess.run([exe, "-W", *args], capture_output=True, text=True, check=True).stdout


def readelf_symbols(path: Path) -> list[tuple[str, str, int, str, str]]:
    """(name, ndx, value, type, bind) per .symtab entry after the null one, from binutils."""
    rows = []
    for line in readelf("-s", str(path)).splitlines():
        m = re.match(r"\s*(\d+): ([0-9a-f]+)\s+\d+ (\w+)\s+(\w+)\s+\w+\s+(\S+)\s*(\S*)$", line)
        if m and m[1] != "0":
            rows.append((m[6], m[5], int(m[2], 16), m[3], m[4]))
    return rows


def readelf_mcount_targets(path: Path) -> set[int]:
    """Offsets in .text named by the relocations of __mcount_loc, from binutils."""
    text = readelf("-r", str(path))
    section = text.split("'.rela__mcount_loc'")[1].split("Relocation section")[0]
    return {int(m[1], 16) for m in re.finditer(r"R_X86_64_64\s+0+ \.text \+ ([0-9a-f]+)", section)}


# --- Debian 6.1 nf_conntrack.ko ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conntrack(debian):  # type: ignore[no-untyped-def]
    return elfread.load_module(debian.nf_conntrack)


def test_debian_symbols_match_readelf(debian, conntrack) -> None:  # type: ignore[no-untyped-def]
    ours = [(s.name, s.value, s.kind, s.binding) for s in conntrack.symbols if s.kind != "SECTION"]
    theirs = [(n, v, t, b) for n, _ndx, v, t, b in readelf_symbols(debian.nf_conntrack) if t != "SECTION"]
    assert ours == theirs
    assert len(conntrack.symbols) > 1000


def test_debian_confirm_is_local_text_function_0x120_after_exported_nf_confirm(conntrack) -> None:  # type: ignore[no-untyped-def]
    confirm = elfread.require_function(conntrack, "ipv4_confirm")
    anchor = elfread.require_function(conntrack, "nf_confirm")
    assert (confirm.section, confirm.binding, confirm.kind) == (".text", "LOCAL", "FUNC")
    assert (anchor.section, anchor.binding) == (".text", "GLOBAL")
    assert confirm.value - anchor.value == 0x120
    assert "nf_confirm" in conntrack.exports
    assert "__nf_conntrack_confirm" in conntrack.exports
    assert "nf_ct_deliver_cached_events" in conntrack.exports
    assert "ipv4_confirm" not in conntrack.exports


def test_debian_exports_equal_module_symvers_entries(debian, conntrack) -> None:  # type: ignore[no-untyped-def]
    lines = (debian.kdir / "Module.symvers").read_text().splitlines()
    from_symvers = {ln.split("\t")[1] for ln in lines if "\tnet/netfilter/nf_conntrack\t" in ln}
    assert conntrack.exports == from_symvers


def test_debian_modinfo_and_build_id(debian, conntrack) -> None:  # type: ignore[no-untyped-def]
    assert conntrack.kind == "module"
    assert conntrack.compression is None
    assert conntrack.name == "nf_conntrack"
    assert (conntrack.info("vermagic") or "").split()[0] == debian.release
    assert set((conntrack.info("depends") or "").split(",")) == {"nf_defrag_ipv4", "nf_defrag_ipv6", "libcrc32c"}
    assert conntrack.modinfo["alias"] == ("nf_conntrack-10", "nf_conntrack-2", "ip_conntrack")
    m = re.search(r"Build ID: ([0-9a-f]+)", readelf("-n", str(debian.nf_conntrack)))
    assert m is not None and conntrack.build_id == m[1]
    assert {".text", "__mcount_loc", "__ksymtab_gpl", ".modinfo"} <= set(conntrack.sections)


def test_debian_traceable_sites_are_the_mcount_records(debian, conntrack) -> None:  # type: ignore[no-untyped-def]
    sites = readelf_mcount_targets(debian.nf_conntrack)
    assert {off for sec, off in conntrack.traceable_sites if sec == ".text"} == sites
    confirm = elfread.require_function(conntrack, "ipv4_confirm")
    assert conntrack.is_traceable(confirm)
    text_funcs = [s for s in conntrack.symbols if s.kind == "FUNC" and s.section == ".text"]
    untraced = [s for s in text_funcs if not conntrack.is_traceable(s)]
    assert untraced, "some functions (notrace, or with no fentry call) must be reported untraceable"
    assert all(s.value not in sites for s in untraced)


def test_debian_ops_arrays(conntrack) -> None:  # type: ignore[no-untyped-def]
    assert elfread.decode_ops_array(conntrack, "ipv4_conntrack_ops") == (
        HookEntry(0, "ipv4_conntrack_in", 2, 0, -200),
        HookEntry(1, "ipv4_conntrack_local", 2, 3, -200),
        HookEntry(2, "ipv4_confirm", 2, 4, INT_MAX),
        HookEntry(3, "ipv4_confirm", 2, 1, INT_MAX),
    )
    assert elfread.decode_ops_array(conntrack, "ipv6_conntrack_ops") == (
        HookEntry(0, "ipv6_conntrack_in", 10, 0, -200),
        HookEntry(1, "ipv6_conntrack_local", 10, 3, -200),
        HookEntry(2, "ipv6_confirm", 10, 4, INT_MAX),
        HookEntry(3, "ipv6_confirm", 10, 1, INT_MAX - 1),  # NF_IP6_PRI_LAST - 1
    )


@pytest.mark.parametrize("kind", ["xz", "gz", "zst"])
def test_compressed_module_reads_the_same(tmp_path, debian, conntrack, kind) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "nf_conntrack.ko"
    copy.write_bytes(debian.nf_conntrack.read_bytes())
    image = elfread.load_module(compress(copy, kind))
    assert image.compression == kind
    assert image.symbols == conntrack.symbols
    assert image.exports == conntrack.exports
    assert image.traceable_sites == conntrack.traceable_sites
    assert image.name == "nf_conntrack"


def test_decompression_is_capped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nqgen.symsources import read_capped

    bomb = tmp_path / "bomb.ko"
    bomb.write_bytes(bytes(4 << 20))
    for kind in ("xz", "gz", "zst"):
        with pytest.raises(InputError, match="more than"):
            read_capped(compress(bomb, kind), cap=1 << 20)


def test_stripped_debian_vmlinux_exports_match_module_symvers(tmp_path, debian) -> None:  # type: ignore[no-untyped-def]
    vmlinux = elfread.load_vmlinux(extract_vmlinux(debian.vmlinuz, tmp_path / "vmlinux"))
    assert vmlinux.kind == "vmlinux"
    assert vmlinux.symbols == ()  # the vmlinux inside a bzImage is stripped
    lines = (debian.kdir / "Module.symvers").read_text().splitlines()
    from_symvers = {ln.split("\t")[1] for ln in lines if ln.split("\t")[2] == "vmlinux"}
    assert vmlinux.exports == from_symvers
    assert "kallsyms_lookup_name" not in vmlinux.exports
    assert vmlinux.build_id is not None and len(vmlinux.build_id) == 40
    with pytest.raises(ElfFormatError, match="not a relocatable module"):
        elfread.load_module(tmp_path / "vmlinux")


def test_linked_vmlinux_with_absolute_ksymtab_and_mcount_range(tmp_path, rhel7) -> None:  # type: ignore[no-untyped-def]
    path = link_vmlinux(tmp_path, [rhel7])
    image = elfread.load_vmlinux(path)
    assert image.exports == {"need_ipv4_conntrack", "nf_ct_l3proto_ipv4_hidden_export"}
    m = re.search(r"Build ID: ([0-9a-f]+)", readelf("-n", str(path)))
    assert m is not None and image.build_id == m[1]
    confirm = elfread.require_function(image, "ipv4_confirm")
    assert confirm.section == ".text" and confirm.value >= 0xFFFFFFFF81000000
    assert image.is_traceable(confirm)
    assert not image.is_traceable(elfread.require_function(image, "nf_ct_ipv4_notrace"))
    assert not image.is_traceable(elfread.require_function(image, "__fentry__"))
    assert "__mcount_loc" not in image.sections  # folded into .init.data, found through its bounds


def test_linked_vmlinux_with_prel32_ksymtab(tmp_path) -> None:  # type: ignore[no-untyped-def]
    g3 = build_module(tmp_path, "nf_conntrack_g3.c", "g3.o")
    image = elfread.load_vmlinux(link_vmlinux(tmp_path, [g3]))
    assert image.exports == {"nf_confirm"}
    assert image.is_traceable(elfread.require_function(image, "nf_confirm"))


# --- fixtures of other generations ---------------------------------------------------------------------------


@pytest.fixture
def rhel7(tmp_path):  # type: ignore[no-untyped-def]
    return build_module(tmp_path, "nf_conntrack_ipv4_rhel7.c", "nf_conntrack_ipv4.ko")


def test_rhel7_ops_array_with_owner_field(rhel7) -> None:  # type: ignore[no-untyped-def]
    image = elfread.load_module(rhel7)
    assert [s.section for s in image.find("ipv4_conntrack_ops")] == [".data"]
    assert elfread.decode_ops_array(image, "ipv4_conntrack_ops") == (
        HookEntry(0, "ipv4_conntrack_in", 2, 0, -200),
        HookEntry(1, "ipv4_conntrack_local", 2, 3, -200),
        HookEntry(2, "ipv4_helper", 2, 4, 300),
        HookEntry(3, "ipv4_confirm", 2, 4, INT_MAX),
        HookEntry(4, "ipv4_helper", 2, 1, 300),
        HookEntry(5, "ipv4_confirm", 2, 1, INT_MAX),
    )


def test_rhel7_exports_modinfo_build_id_traceability(rhel7) -> None:  # type: ignore[no-untyped-def]
    image = elfread.load_module(rhel7)
    # one export has a __ksymtab_ symbol; the other is only reachable through its entry's relocation
    assert image.exports == {"need_ipv4_conntrack", "nf_ct_l3proto_ipv4_hidden_export"}
    assert image.name == "nf_conntrack_ipv4"  # no name= in 3.10's .modinfo: from the file name
    assert image.info("vermagic") == "3.10.0-1160.el7.x86_64 SMP mod_unload modversions "
    assert image.modinfo["alias"] == ("nf_conntrack-2", "ip_conntrack")
    assert image.build_id == "deadbeef00112233445566778899aabbccddeeff"
    assert image.is_traceable(elfread.require_function(image, "ipv4_confirm"))
    assert not image.is_traceable(elfread.require_function(image, "nf_ct_ipv4_notrace"))


def test_ibt_build_is_traceable_past_endbr(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = build_module(tmp_path, "nf_conntrack_ipv4_rhel7.c", "ibt.ko", ["-fcf-protection=branch"])
    image = elfread.load_module(path)
    confirm = elfread.require_function(image, "ipv4_confirm")
    assert (confirm.section, confirm.value + elfread.ENDBR64_SIZE) in image.traceable_sites
    assert (confirm.section, confirm.value) not in image.traceable_sites
    assert image.is_traceable(confirm)
    assert not image.is_traceable(elfread.require_function(image, "nf_ct_ipv4_notrace"))


def test_module_without_mcount_records_has_nothing_traceable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    flags = ["-O2", "-fno-pic", "-mcmodel=kernel", "-fno-ipa-icf", "-Wno-unused-function"]
    path = build_module(tmp_path, "nf_conntrack_ipv4_rhel7.c", "plain.ko", flags, base_flags=False)
    image = elfread.load_module(path)
    assert image.traceable_sites == frozenset()
    assert not image.is_traceable(elfread.require_function(image, "ipv4_confirm"))


@pytest.mark.parametrize("layout", [1, 2, 3, 4])
def test_every_nf_hook_ops_generation_decodes(tmp_path, layout) -> None:  # type: ignore[no-untyped-def]
    path = build_module(tmp_path, "nf_hook_ops_layouts.c", f"layout{layout}.ko", [f"-DLAYOUT={layout}"])
    image = elfread.load_module(path)
    assert elfread.decode_ops_array(image, "ipv6_conntrack_ops") == (
        HookEntry(0, "ipv6_conntrack_in", 10, 0, -200),
        HookEntry(1, "ipv6_confirm", 10, 4, INT_MAX),
        HookEntry(2, "ipv6_confirm", 10, 1, INT_MAX - 1),
    )


def test_ops_array_that_validates_in_no_layout_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = build_module(tmp_path, "nf_hook_ops_layouts.c", "bad.ko", ["-DLAYOUT=5"])
    with pytest.raises(ElfFormatError, match=r"bad\.ko: ipv6_conntrack_ops: no known nf_hook_ops layout"):
        elfread.decode_ops_array(elfread.load_module(path), "ipv6_conntrack_ops")


def test_g3_module_exports_nf_confirm_through_prel32_ksymtab(tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = elfread.load_module(build_module(tmp_path, "nf_conntrack_g3.c", "nf_conntrack.ko"))
    assert image.exports == {"nf_confirm"}
    hooks = elfread.decode_ops_array(image, "ipv4_conntrack_ops")
    assert [h.hook for h in hooks] == ["ipv4_conntrack_in", "nf_confirm", "nf_confirm"]


def test_duplicate_names_are_kept_and_ambiguous(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = "static int dup_fn(int x) { return x + %d; }\nint (*use_%d)(int) = dup_fn;\n"
    a = build_module(tmp_path, src % (1, 1), "a.o")
    b = build_module(tmp_path, src % (2, 2), "b.o")
    image = elfread.load_module(link_relocatable(tmp_path, [a, b], "dup.ko"))
    assert len(image.find("dup_fn")) == 2
    with pytest.raises(SymbolError, match=r"2 functions named dup_fn \(sympos 1: \.text\+0x0, sympos 2: "):
        elfread.require_function(image, "dup_fn")


def test_missing_symbols_raise_symbol_error(rhel7) -> None:  # type: ignore[no-untyped-def]
    image = elfread.load_module(rhel7)
    with pytest.raises(SymbolError, match=r"nf_conntrack_ipv4\.ko: no ops array ipv6_conntrack_ops"):
        elfread.decode_ops_array(image, "ipv6_conntrack_ops")
    with pytest.raises(SymbolError, match=r"nf_conntrack_ipv4\.ko: no function ipv6_confirm"):
        elfread.require_function(image, "ipv6_confirm")


# --- bad input ------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=r"nothere\.ko: no such file"):
        elfread.load_module(tmp_path / "nothere.ko")


def test_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="is a directory"):
        elfread.load_module(tmp_path)


def test_not_elf(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "text.ko"
    path.write_text("this is not an ELF file\n")
    with pytest.raises(ElfFormatError, match=r"text\.ko: not an ELF file"):
        elfread.load_module(path)


@pytest.mark.parametrize("size", [3, 40, 64, 200, 4096])
def test_truncated(tmp_path, rhel7, size) -> None:  # type: ignore[no-untyped-def]
    path = truncated_copy(rhel7, tmp_path / "cut.ko", size)
    with pytest.raises(ElfFormatError, match=r"cut\.ko: (not an ELF|truncated ELF)"):
        elfread.load_module(path)


def test_truncated_real_module_keeps_no_partial_result(tmp_path, debian) -> None:  # type: ignore[no-untyped-def]
    size = debian.nf_conntrack.stat().st_size
    path = truncated_copy(debian.nf_conntrack, tmp_path / "half.ko", size // 2)
    with pytest.raises(ElfFormatError, match=r"half\.ko: truncated ELF"):
        elfread.load_module(path)


def test_32bit_object_from_gcc(tmp_path) -> None:  # type: ignore[no-untyped-def]
    try:
        path = build_module(tmp_path, "int x32_value = 1;\n", "m32.ko", ["-m32"], base_flags=False)
    except AssertionError:
        pytest.skip("gcc -m32 cannot compile here (no multilib)")
    with pytest.raises(ElfFormatError, match=r"m32\.ko: ELF class 1 is not ELF64"):
        elfread.load_module(path)


def test_32bit_by_rewriting_the_class(tmp_path, rhel7) -> None:  # type: ignore[no-untyped-def]
    path = patched_copy(rhel7, tmp_path / "class32.ko", {4: b"\x01"})
    with pytest.raises(ElfFormatError, match=r"class32\.ko: ELF class 1 is not ELF64"):
        elfread.load_module(path)


def test_big_endian_by_rewriting_ei_data(tmp_path, rhel7) -> None:  # type: ignore[no-untyped-def]
    path = patched_copy(rhel7, tmp_path / "be.ko", {5: b"\x02"})
    with pytest.raises(ElfFormatError, match=r"be\.ko: big-endian"):
        elfread.load_module(path)


def test_other_machine(tmp_path, rhel7) -> None:  # type: ignore[no-untyped-def]
    path = patched_copy(rhel7, tmp_path / "arm.ko", {18: (183).to_bytes(2, "little")})  # EM_AARCH64
    with pytest.raises(ElfFormatError, match=r"arm\.ko: e_machine 183 is not x86_64"):
        elfread.load_module(path)


def test_linked_executable_is_not_a_module(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "prog.c"
    src.write_text("int main(void) { return 0; }\n")
    exe = tmp_path / "prog.ko"
    subprocess.run(["gcc", str(src), "-o", str(exe)], check=True)
    with pytest.raises(ElfFormatError, match=r"prog\.ko: not a relocatable module \(ET_REL\): e_type is ET_"):
        elfread.load_module(exe)
    assert elfread.load_vmlinux(exe).kind == "vmlinux"


def test_module_is_not_a_vmlinux(rhel7) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ElfFormatError, match="not a linked image"):
        elfread.load_vmlinux(rhel7)


def test_stripped_module(tmp_path, rhel7) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "stripped.ko"
    subprocess.run(["strip", "--strip-all", str(rhel7), "-o", str(out)], check=True)
    with pytest.raises(ElfFormatError, match=r"stripped\.ko: no symbol table"):
        elfread.load_module(out)


def test_suffix_that_lies_about_compression(tmp_path, rhel7) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "plain.ko.xz"
    path.write_bytes(rhel7.read_bytes())
    with pytest.raises(InputError, match=r"plain\.ko\.xz: named \.xz but its content is not xz-compressed"):
        elfread.load_module(path)


@pytest.mark.parametrize("kind", ["xz", "gz", "zst"])
def test_corrupt_compressed_data(tmp_path, rhel7, kind) -> None:  # type: ignore[no-untyped-def]
    packed = compress(rhel7, kind)
    data = bytearray(packed.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    packed.write_bytes(bytes(data))
    with pytest.raises(NqgenError, match=rf"nf_conntrack_ipv4\.ko\.{kind}: (corrupt|truncated|not an ELF)"):
        elfread.load_module(packed)


@pytest.mark.parametrize("linked", [False, True])
def test_hostile_mutations_raise_only_nqgen_errors(tmp_path, rhel7, linked) -> None:  # type: ignore[no-untyped-def]
    """Random damage to the headers and tables either still parses or raises ElfFormatError/InputError."""
    original = (link_vmlinux(tmp_path, [rhel7]) if linked else rhel7).read_bytes()
    rng = random.Random(49561)
    failures = 0
    for round_ in range(400):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            where = rng.randrange(64) if round_ % 3 == 0 else rng.randrange(len(data))
            data[where] = rng.randrange(256)
        try:
            image = elfread.parse_elf(bytes(data), f"mut{round_}.ko")
            if any(s.kind == "OBJECT" for s in image.find("ipv4_conntrack_ops")):
                elfread.decode_ops_array(image, "ipv4_conntrack_ops")
        except NqgenError as exc:
            assert f"mut{round_}.ko" in str(exc)
            assert "\n" not in str(exc)
            failures += 1
    assert failures > 0
