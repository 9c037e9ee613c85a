"""Check every built ``.ko`` in ``out/`` against the target before anyone loads it.

A module is acceptable when its vermagic equals the target's and every symbol it leaves undefined is
exported by the target (``out/target-exports.txt``, written at generation from Module.symvers and the
conntrack module's own exports). When the profile had neither a Module.symvers nor a vmlinux (a tree prepared
with ``modules_prepare`` only), that list holds just the conntrack modules' exports; the remaining symbols are then
checked against the ``EXPORT_SYMBOL`` declarations of the target's source tree (``srcexports``), and the check
says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from .errors import BuildError, InputError
from .srcexports import SourceExports, is_source_tree, scan

EXPORTS_FILE = "target-exports.txt"


@dataclass(frozen=True)
class KoCheck:
    strategy: str
    ko: Path
    vermagic: str
    undefined: tuple[str, ...]
    unexported: tuple[str, ...]
    vermagic_ok: bool
    params: tuple[str, ...]
    from_source: tuple[str, ...] = ()  # imports the source tree declares exported (checked only that way)


def _modinfo(elf: ELFFile) -> list[tuple[str, str]]:
    sec = elf.get_section_by_name(".modinfo")
    if sec is None:
        return []
    items = []
    for raw in sec.data().split(b"\0"):
        if b"=" in raw:
            key, _, value = raw.decode(errors="replace").partition("=")
            items.append((key, value))
    return items


def check_ko(strategy: str, ko: Path, exports: frozenset[str], vermagic: str,
             source: SourceExports | None = None) -> KoCheck:
    try:
        with ko.open("rb") as fh:
            elf = ELFFile(fh)
            info = _modinfo(elf)
            symtab = elf.get_section_by_name(".symtab")
            if not isinstance(symtab, SymbolTableSection):
                raise BuildError(f"{ko}: no symbol table")
            undefined = sorted(
                {
                    s.name
                    for s in symtab.iter_symbols()
                    if s.name and s["st_shndx"] == "SHN_UNDEF" and s["st_info"]["bind"] != "STB_LOCAL"
                }
            )
    except (OSError, ELFError) as exc:
        raise BuildError(f"{ko}: cannot read the built module: {exc}") from exc
    ko_vermagic = next((v for k, v in info if k == "vermagic"), "")
    params = tuple(v.split(":")[0] for k, v in info if k == "parmtype")
    # without a Module.symvers the export list may itself come from the source (probe), so every import the
    # source declares counts as known from the source only
    from_source = tuple(n for n in undefined if source is not None and source.declares(n))
    missing = [n for n in undefined if n not in exports and n not in from_source]
    return KoCheck(
        strategy=strategy,
        ko=ko,
        vermagic=ko_vermagic,
        undefined=tuple(undefined),
        unexported=tuple(missing),
        vermagic_ok=ko_vermagic.strip() == vermagic.strip(),
        params=params,
        from_source=from_source,
    )


def source_exports(profile: dict[str, object]) -> SourceExports | None:
    """The source tree's declared exports when the profile's export list is incomplete, else None."""
    sources = profile.get("sources")
    if not isinstance(sources, dict) or "symvers" in sources or "vmlinux" in sources:
        return None  # a full list: Module.symvers or the vmlinux export table
    kdir = profile.get("kdir")
    if not isinstance(kdir, str) or not kdir:
        return None
    tree = Path(kdir)
    if not is_source_tree(tree) and (tree / "source").is_dir():
        tree = tree / "source"  # an O= build directory links to its source
    return scan(tree) if is_source_tree(tree) else None


def check_out(out: Path) -> list[KoCheck]:
    """Check every strategy's module in ``out``; raise BuildError naming the first problem."""
    exports_path = out / EXPORTS_FILE
    profile_path = out / "profile.json"
    if not exports_path.is_file() or not profile_path.is_file():
        raise InputError(f"{out} is not an nqgen output directory (no {EXPORTS_FILE} or profile.json)")
    exports = frozenset(exports_path.read_text().split())
    profile = json.loads(profile_path.read_text())
    vermagic = profile["module"]["vermagic"]
    source = source_exports(profile)
    checks = []
    for manifest in sorted(out.glob("*/nqgen-module.json")):
        meta = json.loads(manifest.read_text())
        ko = manifest.parent / meta["ko"]
        if not ko.is_file():
            raise BuildError(f"{ko} was not built (run make -C {out})")
        checks.append(check_ko(meta["strategy"], ko, exports, vermagic, source))
    if not checks:
        raise BuildError(f"no generated modules in {out}")
    for c in checks:
        if not c.vermagic_ok:
            raise BuildError(f"{c.ko.name}: vermagic {c.vermagic!r} differs from the target's {vermagic!r}")
        if c.unexported:
            where = ("the target does not export" if source is None
                     else "neither the target's conntrack modules export nor its source declares exported")
            raise BuildError(f"{c.ko.name}: needs symbols {where}: {', '.join(c.unexported)}")
    return checks
