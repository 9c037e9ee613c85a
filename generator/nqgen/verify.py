"""Check every built ``.ko`` in ``out/`` against the target before anyone loads it.

A module is acceptable when its vermagic equals the target's and every symbol it leaves undefined is
exported by the target (``out/target-exports.txt``, written at generation from Module.symvers and the
conntrack module's own exports).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from .errors import BuildError, InputError

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


def check_ko(strategy: str, ko: Path, exports: frozenset[str], vermagic: str) -> KoCheck:
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
    return KoCheck(
        strategy=strategy,
        ko=ko,
        vermagic=ko_vermagic,
        undefined=tuple(undefined),
        unexported=tuple(n for n in undefined if n not in exports),
        vermagic_ok=ko_vermagic.strip() == vermagic.strip(),
        params=params,
    )


def check_out(out: Path) -> list[KoCheck]:
    """Check every strategy's module in ``out``; raise BuildError naming the first problem."""
    exports_path = out / EXPORTS_FILE
    profile_path = out / "profile.json"
    if not exports_path.is_file() or not profile_path.is_file():
        raise InputError(f"{out} is not an nqgen output directory (no {EXPORTS_FILE} or profile.json)")
    exports = frozenset(exports_path.read_text().split())
    vermagic = json.loads(profile_path.read_text())["module"]["vermagic"]
    checks = []
    for manifest in sorted(out.glob("*/nqgen-module.json")):
        meta = json.loads(manifest.read_text())
        ko = manifest.parent / meta["ko"]
        if not ko.is_file():
            raise BuildError(f"{ko} was not built (run make -C {out})")
        checks.append(check_ko(meta["strategy"], ko, exports, vermagic))
    if not checks:
        raise BuildError(f"no generated modules in {out}")
    for c in checks:
        if not c.vermagic_ok:
            raise BuildError(f"{c.ko.name}: vermagic {c.vermagic!r} differs from the target's {vermagic!r}")
        if c.unexported:
            raise BuildError(f"{c.ko.name}: needs symbols the target does not export: {', '.join(c.unexported)}")
    return checks
