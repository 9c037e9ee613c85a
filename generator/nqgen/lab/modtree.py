"""The target's modules tree (/lib/modules/<release>): dependency closure and load order from modules.dep.

No hand-kept list: what a module needs comes from ``modules.dep`` (hard dependencies), ``modules.softdep``
(``pre:`` soft dependencies, resolved through ``modules.alias``), and for out-of-tree modules from the
``depends=`` and ``softdep=`` lines of their own ``.modinfo`` section.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..errors import InputError

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: str) -> str:
    """The kernel's name for a module file: basename without .ko(.xz|.zst|.gz), '-' as '_'."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def modinfo(ko: Path) -> dict[str, list[str]]:
    """The key=value pairs of a module's .modinfo section (values of repeated keys kept in order)."""
    data = read_module(ko)
    out: dict[str, list[str]] = {}
    try:
        from io import BytesIO

        elf = ELFFile(BytesIO(data))
        sec = elf.get_section_by_name(".modinfo")
    except ELFError as exc:
        raise InputError(f"{ko}: not a kernel module ({exc})") from exc
    if sec is None:
        raise InputError(f"{ko}: no .modinfo section (not a kernel module?)")
    for item in sec.data().split(b"\0"):
        if b"=" in item:
            key, value = item.decode("utf-8", "replace").split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def modinfo_depends(ko: Path) -> list[str]:
    """The hard dependencies a module names in its ``depends=`` modinfo line."""
    deps: list[str] = []
    for value in modinfo(ko).get("depends", []):
        deps.extend(d.replace("-", "_") for d in value.split(",") if d)
    return deps


def modinfo_softdeps(ko: Path) -> list[str]:
    """The ``pre:`` soft dependencies of a module's ``softdep=`` modinfo lines."""
    return _pre_softdeps(" ".join(modinfo(ko).get("softdep", [])))


def _pre_softdeps(text: str) -> list[str]:
    out: list[str] = []
    mode = ""
    for word in text.split():
        if word in ("pre:", "post:"):
            mode = word
        elif mode == "pre:":
            out.append(word)
    return out


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressing .ko.xz/.ko.gz/.ko.zst."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read module {path}: {exc.strerror}") from exc
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        if not shutil.which("zstd"):
            raise InputError(f"{path} is zstd-compressed and zstd is not installed")
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    return data


@dataclass(frozen=True)
class ModuleFile:
    """One module of the tree: its name and path relative to the tree root."""

    name: str
    relpath: str  # as in modules.dep, e.g. kernel/net/netfilter/nf_conntrack.ko
    optional: bool = False  # reached only through a soft dependency: a failed load is not fatal

    @property
    def plain_relpath(self) -> str:
        """The path of the decompressed module in the guest (always ending in .ko)."""
        for suffix in _SUFFIXES:
            if self.relpath.endswith(suffix):
                return self.relpath[: -len(suffix)] + ".ko"
        return self.relpath


@dataclass
class ModuleTree:
    """The parsed metadata of one /lib/modules/<release> tree."""

    root: Path
    deps: dict[str, list[str]] = field(default_factory=dict)  # name -> hard dependency names
    paths: dict[str, str] = field(default_factory=dict)  # name -> relpath
    softdeps: dict[str, list[str]] = field(default_factory=dict)  # name -> pre: names or aliases
    aliases: dict[str, list[str]] = field(default_factory=dict)  # alias -> module names
    builtin: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, root: Path) -> ModuleTree:
        dep_file = root / "modules.dep"
        if not dep_file.is_file():
            raise InputError(f"{dep_file} does not exist (run depmod for this tree, or pass --modules-dir)")
        tree = cls(root)
        for line in dep_file.read_text().splitlines():
            if ":" not in line:
                continue
            mod, rest = line.split(":", 1)
            name = module_name(mod)
            tree.paths[name] = mod
            tree.deps[name] = [module_name(d) for d in rest.split()]
        softdep = root / "modules.softdep"
        if softdep.is_file():
            for line in softdep.read_text().splitlines():
                words = line.split()
                if len(words) >= 3 and words[0] == "softdep":
                    tree.softdeps.setdefault(words[1].replace("-", "_"), []).extend(
                        _pre_softdeps(" ".join(words[2:]))
                    )
        alias = root / "modules.alias"
        if alias.is_file():
            for line in alias.read_text().splitlines():
                words = line.split()
                if len(words) == 3 and words[0] == "alias" and "*" not in words[1]:
                    tree.aliases.setdefault(words[1], []).append(words[2].replace("-", "_"))
        builtin = root / "modules.builtin"
        if builtin.is_file():
            tree.builtin = {module_name(x) for x in builtin.read_text().split()}
        return tree

    def _resolve(self, name: str) -> list[str]:
        """Module names for a name or alias; [] when built in or unknown."""
        norm = name.replace("-", "_")
        if norm in self.paths:
            return [norm]
        return [m for m in self.aliases.get(name, []) if m in self.paths]

    def closure(self, roots: list[str], extra_softdeps: list[str] | None = None) -> list[ModuleFile]:
        """Modules to load, dependencies first, for ``roots`` (names); built-in ones are skipped.

        A root that is neither in the tree nor built in is an error.  Soft dependencies (and the
        ``extra_softdeps`` of out-of-tree modules) come first and are optional.
        """
        order: list[ModuleFile] = []
        seen: set[str] = set()

        def visit(name: str, optional: bool, stack: tuple[str, ...]) -> None:
            if name in seen or name in stack:
                return
            for soft in self.softdeps.get(name, []):
                for target in self._resolve(soft):
                    visit(target, True, (*stack, name))
            for dep in self.deps.get(name, []):
                visit(dep, optional, (*stack, name))
            seen.add(name)
            order.append(ModuleFile(name, self.paths[name], optional))

        for soft in extra_softdeps or []:
            for target in self._resolve(soft):
                visit(target, True, ())
        for root in roots:
            norm = root.replace("-", "_")
            if norm in self.paths:
                visit(norm, False, ())
            elif norm not in self.builtin:
                raise InputError(f"module {root} is neither in {self.root}/modules.dep nor built in")
        return order
