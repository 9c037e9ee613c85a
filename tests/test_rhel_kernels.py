"""The RHEL kernels built by nqgen.kernels (``make rhel-kernels``): what they hold, and nqgen's output against them.

Every test here needs a finished build in $NQGEN_CACHE/kernels/ and skips, saying which, when there is none.
Generation runs `nqgen --strategy all` against the build tree (the qemu kernel the lab boots) and, for RHEL 7.7,
against the tree prepared with the RHEL config (what a CentOS 7 user's kernel-devel looks like), then builds every
module with the generated Makefile, which ends with `nqgen verify`.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from conftest import run_nqgen
from nqgen import kernels
from nqgen.kernels import BuiltKernel

STRATEGIES = ("advance-confirm", "advance-confirm-corrected", "ftrace", "hook-swap", "stop-hook", "livepatch")
CONNTRACK = ("net/netfilter/nf_conntrack.ko", "net/ipv4/netfilter/nf_conntrack_ipv4.ko",
             "net/ipv6/netfilter/nf_conntrack_ipv6.ko")


def built(recipe: str) -> BuiltKernel:
    k = kernels.find_built(recipe)
    if k is None:
        pytest.skip(f"{recipe} is not built (make rhel-kernels, or nqgen kernel build {recipe} --source DIR)")
    return k


def modinfo(ko: Path, key: str) -> str:
    with ko.open("rb") as fh:
        sec = ELFFile(fh).get_section_by_name(".modinfo")
        assert sec is not None, ko
        for raw in sec.data().split(b"\0"):
            name, _, value = raw.decode().partition("=")
            if name == key:
                return value
    raise AssertionError(f"{ko} has no {key}")


@pytest.mark.parametrize("recipe", ["rhel77", "rhel81", "rhel81-kasan-free"])
def test_build_holds_kernel_modules_and_tree(recipe: str) -> None:
    k = built(recipe)
    assert k.image.is_file() and k.vmlinux.is_file()
    assert (k.kdir / "Module.symvers").is_file() and (k.kdir / ".config").is_file()
    assert (k.modules_dir / "modules.dep").is_file()
    for rel in CONNTRACK:
        ko = k.modules_dir / "kernel" / rel
        assert ko.is_file(), ko
        assert modinfo(ko, "vermagic").split()[0] == k.release
    config = (k.kdir / ".config").read_text().splitlines()
    assert "CONFIG_LIVEPATCH=y" in config and "CONFIG_NF_CONNTRACK=m" in config
    assert ("CONFIG_KASAN=y" in config) == recipe.startswith("rhel81")


def test_rhel77_distribution_config_tree() -> None:
    k = built("rhel77")
    assert k.distro_kdir is not None
    rhel = (k.distro_kdir / "configs/kernel-3.10.0-x86_64.config").read_text().splitlines()
    have = set((k.distro_kdir / ".config").read_text().splitlines())
    # olddefconfig changes nothing in RHEL's own config
    assert [line for line in rhel if line.startswith("CONFIG_") and line not in have] == []
    assert [p.name for p in k.distro_modules] == [Path(rel).name for rel in CONNTRACK]
    for ko in k.distro_modules:
        assert modinfo(ko, "vermagic").startswith("3.10.0")


def _calls_in(ko: Path, function: str) -> set[str]:
    """Names of the symbols relocations inside ``function`` refer to (what it calls)."""
    with ko.open("rb") as fh:
        elf = ELFFile(fh)
        symtab = elf.get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        sym = next(s for s in symtab.iter_symbols() if s.name == function and s["st_info"]["type"] == "STT_FUNC")
        text = elf.get_section(sym["st_shndx"]).name
        rela = elf.get_section_by_name(f".rela{text}")
        assert isinstance(rela, RelocationSection)
        start, end = sym["st_value"], sym["st_value"] + sym["st_size"]
        return {symtab.get_symbol(r["r_info_sym"]).name for r in rela.iter_relocations()
                if start <= r["r_offset"] < end}


def test_kasan_free_variant_frees_the_extension_at_once() -> None:
    base, variant = built("rhel81"), built("rhel81-kasan-free")
    assert variant.release == base.release and variant.kdir == base.kdir and variant.image == base.image
    rel = "kernel/net/netfilter/nf_conntrack.ko"
    old, new = base.modules_dir / rel, variant.modules_dir / rel
    assert old.read_bytes() != new.read_bytes()
    assert "kfree" not in _calls_in(old, "nf_conntrack_free")  # stock 4.18: kfree_rcu (kfree_call_rcu)
    assert "kfree" in _calls_in(new, "nf_conntrack_free")
    assert modinfo(new, "vermagic") == modinfo(old, "vermagic")


def _generate_and_build(kdir: Path, modules: list[Path], tmp_path: Path) -> tuple[str, str]:
    out = tmp_path / "out"
    args = ["--strategy", "all", "--kdir", str(kdir), "--out", str(out)]
    for m in modules:
        args += ["--module", str(m)]
    gen = run_nqgen(args, tmp_path)
    assert gen.returncode == 0, gen.stderr
    for strategy in STRATEGIES:
        assert (out / strategy / "nqgen-module.json").is_file(), f"{strategy} not generated:\n{gen.stderr}"
    make = subprocess.run(["nice", "-n", "10", "make", "-C", str(out), "-j2"], capture_output=True, text=True,
                          timeout=1800, check=False)
    assert make.returncode == 0, make.stdout[-4000:] + make.stderr[-4000:]
    assert " error:" not in make.stderr
    return gen.stderr, make.stdout


@pytest.mark.parametrize("recipe", ["rhel77", "rhel81"])
def test_every_strategy_builds_and_verifies_against_the_build_tree(recipe: str, tmp_path: Path) -> None:
    k = built(recipe)
    _, stdout = _generate_and_build(k.kdir, [k.modules_dir / "kernel" / rel for rel in CONNTRACK], tmp_path)
    assert stdout.count("\nok ") + stdout.startswith("ok ") >= len(STRATEGIES)
    assert "EXPORT_SYMBOL declarations" not in stdout  # a full Module.symvers: nothing guessed


def test_every_strategy_builds_against_the_rhel77_distribution_tree(tmp_path: Path) -> None:
    """No Module.symvers there: verify falls back to the source's EXPORT_SYMBOL declarations and says so."""
    k = built("rhel77")
    assert k.distro_kdir is not None
    stderr, stdout = _generate_and_build(k.distro_kdir, list(k.distro_modules), tmp_path)
    assert "no Module.symvers: exports are the conntrack modules' own and the source tree's" in stderr
    assert "EXPORT_SYMBOL declarations" in stdout


# --- RHEL 8.1: reliable stacks for livepatch ---------------------------------------------------------------------


def current_build(recipe: str) -> BuiltKernel:
    """The build of ``recipe`` from the recipe's current patches (not an older build left in the cache)."""
    k = built(recipe)
    source = Path(json.loads((k.root / "kernel.json").read_text())["source"])
    if kernels.find_built(recipe, source) != k:
        pytest.skip(f"the {recipe} build {k.key} predates the recipe's current patches (the objtool fixes for gcc 12 "
                    f"and binutils 2.40): nqgen kernel build {recipe} --source {source}")
    return k


def _orc_table(vmlinux: Path) -> tuple[list[int], list[tuple[int, bool]]]:
    """The kernel's ORC table, sorted by address: (sp_reg, end) for each entry (sp_reg 0: undefined)."""
    with vmlinux.open("rb") as fh:
        elf = ELFFile(fh)
        ip_sec, orc_sec = elf.get_section_by_name(".orc_unwind_ip"), elf.get_section_by_name(".orc_unwind")
        assert ip_sec is not None and orc_sec is not None, f"{vmlinux} has no ORC table"
        base = ip_sec["sh_addr"]
        ips = [base + 4 * i + rel for i, (rel,) in enumerate(struct.iter_unpack("<i", ip_sec.data()))]
        entries = [(bits & 0xF, bool(bits >> 10 & 1)) for _, _, bits in struct.iter_unpack("<hhH", orc_sec.data())]
    order = sorted(range(len(ips)), key=ips.__getitem__)
    return [ips[i] for i in order], [entries[i] for i in order]


def _return_addresses(vmlinux: Path, start: int, end: int) -> list[int]:
    """The address after every call instruction in [start, end): where a sleeping task's stack points."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={start:#x}",
                          f"--stop-address={end:#x}", str(vmlinux)], capture_output=True, text=True, check=True).stdout
    insns = [(int(m[1], 16), m[2]) for m in re.finditer(r"^ *([0-9a-f]+):\s+(\S+)", dis, re.MULTILINE)]
    return [nxt for (_, op), (nxt, _) in itertools.pairwise(insns) if op == "call"]


def test_rhel81_orc_unwinds_through_every_call_of_functions_with_a_cold_part() -> None:
    """gcc >= 9 names a function's cold part "foo.cold"; 4.18's objtool knew only gcc 8's "foo.cold.N", took each
    jump into it for a sibling call, stopped checking foo there and left the rest of foo with undefined ORC
    entries. The unwinder then fails at a return address there, save_stack_trace_tsk_reliable() too, and a
    livepatch's enable transition never finishes while a task sleeps there: in the lab, the oom_reaper kthread,
    for ever (patch 0004). Every call's return address in oom_reaper and in a sample of the other functions with a
    cold part must unwind (a defined ORC entry, or the end of the stack)."""
    k = current_build("rhel81")
    symbols: dict[str, tuple[int, int]] = {}
    with k.vmlinux.open("rb") as fh:
        symtab = ELFFile(fh).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        for s in symtab.iter_symbols():
            if s["st_info"]["type"] == "STT_FUNC" and s["st_size"]:
                symbols[s.name] = (s["st_value"], s["st_value"] + s["st_size"])
    with_cold = sorted(n for n in symbols if f"{n}.cold" in symbols)
    assert "oom_reaper" in with_cold and len(with_cold) > 500  # gcc 12 splits off many cold parts
    sample = ["oom_reaper", *with_cold[:: len(with_cold) // 40]]
    ips, entries = _orc_table(k.vmlinux)
    undefined = []
    for name in sample:
        for ret in _return_addresses(k.vmlinux, *symbols[name]):
            sp_reg, end = entries[bisect.bisect_right(ips, ret - 1) - 1]
            if sp_reg == 0 and not end:
                undefined.append(f"{name}+{ret - symbols[name][0]:#x}")
    assert undefined == [], f"{len(undefined)} return addresses without ORC data: {undefined[:20]}"
