"""Symbol lookup: nqgen's reading of the symbols it needs against ``nm FILE | grep -E 'names'`` on the same file.

Three inputs, each skipped with its reason when absent: the Debian ``nf_conntrack.ko`` (nqgen reads it exactly as
the profile does: ``collect_symbol_facts``), the reference kernel's ``vmlinux`` (``load_vmlinux`` plus a lookup of
the names), and a kallsyms-sized listing (``parse_symbol_list`` plus a lookup; the reference is ``grep -E`` on the
text, since ``nm`` reads no text).
"""

from __future__ import annotations

import random
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nqgen import elfread, probe, symsources
from nqgen.bench.timing import Ratio, Series, ratio, side_by_side

# what the profile looks for in a conntrack module: the confirm functions and the ops arrays naming them
MODULE_NAMES = tuple(dict.fromkeys(n for spec in probe.FAMILIES for n in (*spec.functions, spec.ops_array)))
# kernel functions the generated modules rely on, looked up in a vmlinux or a kallsyms listing
KERNEL_NAMES = ("nf_hook_entries_grow", "kallsyms_lookup_name", "ftrace_set_filter_ip", "klp_enable_patch",
                "synchronize_net", "nf_conntrack_hash_check_insert")  # fmt: skip
MIN_KALLSYMS_LINES = 100_000


@dataclass(frozen=True)
class SymbolCase:
    """One input file, the names looked up, and what both sides found."""

    label: str
    path: str
    size: int
    entries: int  # symbols in the file (lines of a listing)
    names: tuple[str, ...]
    nqgen: Series
    reference: Series
    reference_command: str
    found_nqgen: tuple[str, ...]
    found_reference: tuple[str, ...]

    @property
    def wall_ratio(self) -> Ratio:
        return ratio(self.nqgen.wall, self.reference.wall)

    @property
    def cpu_ratio(self) -> Ratio:
        return ratio(self.nqgen.cpu, self.reference.cpu)

    @property
    def agree(self) -> bool:
        """Both sides found the same names (nqgen's answer is checked, not only timed)."""
        return set(self.found_nqgen) == set(self.found_reference)

    def to_json(self) -> dict[str, object]:
        return {"label": self.label, "path": self.path, "size": self.size, "entries": self.entries,
                "names": list(self.names), "reference_command": self.reference_command,
                "nqgen": self.nqgen.to_json(), "reference": self.reference.to_json(),
                "wall_ratio": self.wall_ratio.to_json(), "cpu_ratio": self.cpu_ratio.to_json(),
                "found_nqgen": list(self.found_nqgen), "found_reference": list(self.found_reference),
                "agree": self.agree}  # fmt: skip


@dataclass(frozen=True)
class Skipped:
    label: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"label": self.label, "skipped": self.reason}


def _pattern(names: tuple[str, ...]) -> str:
    return "|".join(names)


def nm_grep_command(path: Path, names: tuple[str, ...]) -> str:
    return f"nm {shlex.quote(str(path))} | grep -E {shlex.quote(f' ({_pattern(names)})$')}"


def kallsyms_grep_command(path: Path, names: tuple[str, ...]) -> str:
    return f"grep -E {shlex.quote(f' ({_pattern(names)})( |$)')} {shlex.quote(str(path))}"


def _shell(command: str) -> str:
    # grep exits 1 when nothing matched: that is an answer, not a failure
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{command}: exit {done.returncode}: {done.stderr.strip()[:200]}")
    return done.stdout


def _names_in(output: str) -> tuple[str, ...]:
    """The symbol names of nm/kallsyms lines (third column)."""
    return tuple(sorted({line.split()[2] for line in output.splitlines() if len(line.split()) >= 3}))


def _measure(
    label: str, path: Path, entries: int, names: tuple[str, ...], lookup: Callable[[], tuple[str, ...]],
    command: str, rounds: int,
) -> SymbolCase:  # fmt: skip
    answers: dict[str, tuple[str, ...]] = {}

    def ours() -> None:
        answers["nqgen"] = lookup()

    def theirs() -> None:
        answers["reference"] = _names_in(_shell(command))

    series = side_by_side({"nqgen": ours, "reference": theirs}, rounds)
    return SymbolCase(label, str(path), path.stat().st_size, entries, names, series["nqgen"], series["reference"],
                      command, tuple(sorted(set(answers["nqgen"]))), answers["reference"])  # fmt: skip


def module_case(path: Path, rounds: int) -> SymbolCase:
    """nqgen reads the module as the profile does (confirm functions, ops arrays, anchors, exports)."""
    names = MODULE_NAMES
    entries = len(elfread.load_module(path).symbols)

    def lookup() -> tuple[str, ...]:
        facts = probe.collect_symbol_facts(probe.ProfileInputs(modules=[path]))
        found = {t.function for t in facts.confirm.values()}
        found |= {n for n in names if n in facts.module_symbols}
        return tuple(sorted(found))

    return _measure("nf_conntrack.ko", path, entries, names, lookup, nm_grep_command(path, names), rounds)


def vmlinux_case(path: Path, rounds: int) -> SymbolCase:
    names = KERNEL_NAMES
    entries = len(elfread.load_vmlinux(path).symbols)

    def lookup() -> tuple[str, ...]:
        image = elfread.load_vmlinux(path)
        return tuple(n for n in names if image.find(n, defined=False))

    label = "vmlinux" if path.name == "vmlinux" else f"{path.name} (synthetic)"
    return _measure(label, path, entries, names, lookup, nm_grep_command(path, names), rounds)


def kallsyms_case(path: Path, rounds: int) -> SymbolCase:
    names = KERNEL_NAMES
    entries = len(symsources.parse_symbol_list(path).entries)

    def lookup() -> tuple[str, ...]:
        listing = symsources.parse_symbol_list(path)
        found = listing.lookup_many(names)
        return tuple(n for n in names if found[n])

    return _measure("kallsyms", path, entries, names, lookup, kallsyms_grep_command(path, names), rounds)


def synthetic_elf(dest: Path, count: int = 107_000) -> Path:
    """A linked ELF with ``count`` function symbols (a third global) plus the kernel names, built with ``as``/``ld``:
    a vmlinux-sized symbol table for machines without the reference kernel. Its names are random, so ``nm`` and
    nqgen both walk the whole table; nothing else of a vmlinux (no __ksymtab, no __mcount_loc) is in it."""
    rng = random.Random(14)
    lines = [".text", ".globl _start", "_start:", " ret"]
    for i in range(count):
        name = f"sym_{rng.getrandbits(40):x}_{i}"
        if i % 3 == 0:
            lines.append(f".globl {name}")
        lines += [f".type {name},@function", f"{name}:", " nop", f".size {name},1"]
    for name in KERNEL_NAMES[:-1]:  # the last one stays absent: a name nobody finds is part of the lookup
        lines += [f".globl {name}", f".type {name},@function", f"{name}:", " ret"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    source, obj = dest.with_suffix(".s"), dest.with_suffix(".o")
    source.write_text("\n".join(lines) + "\n")
    subprocess.run(["as", str(source), "-o", str(obj)], check=True, capture_output=True)
    subprocess.run(["ld", "-o", str(dest), str(obj)], check=True, capture_output=True)
    source.unlink()
    obj.unlink()
    return dest


def capture_kallsyms(dest: Path, source: Path = Path("/proc/kallsyms")) -> Path | str:
    """A kallsyms-sized listing copied from this machine's running kernel, or why there is none."""
    try:
        text = source.read_text()
    except OSError as exc:
        return f"{source}: cannot read: {exc.strerror or exc}"
    lines = text.count("\n")
    if lines < MIN_KALLSYMS_LINES:
        return f"{source} has {lines} lines, fewer than {MIN_KALLSYMS_LINES}"
    if all(line.startswith("0000000000000000") for line in text.splitlines()[:100]):
        return f"{source}: addresses hidden (kptr_restrict; run as root)"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return dest


def tools_missing() -> str | None:
    missing = [tool for tool in ("nm", "grep", "sh", "as", "ld") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)} (binutils)" if missing else None
