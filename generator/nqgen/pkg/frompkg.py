"""A target kernel from its vendor packages: extract what the profile needs into a cache, return its inputs.

Accepted: RHEL/CentOS ``kernel-devel`` + ``kernel`` (EL7) or ``kernel-core``/``kernel-modules`` (EL8), Debian
``linux-headers-<release>`` + ``linux-headers-<release>-common`` (+ ``linux-kbuild-<ver>`` to build) +
``linux-image-<release>``, and debug packages holding a ``vmlinux``. Only the members a profile or a module
build reads are written: the headers trees, the conntrack modules, ``System.map``, ``Module.symvers``/
``symvers.gz``, the ``.config``. The cache entry is keyed by the packages' content and appears whole or not
at all.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import symsources
from ..errors import InputError
from ..probe import ProfileInputs, find_conntrack_modules
from .archive import extract

DEFAULT_CACHE = Path("/var/cache/nqgen")
_CONNTRACK = re.compile(r"^lib/modules/[^/]+/kernel/net/(netfilter|ipv4/netfilter|ipv6/netfilter)/"
                        r"nf_conntrack(_ipv4|_ipv6)?\.ko(\.xz|\.zst|\.gz)?$")  # fmt: skip
_WANTED = (
    re.compile(r"^usr/src/.+"),  # headers trees: Debian linux-headers-*, EL kernels/<release>
    re.compile(r"^usr/lib/linux-kbuild-[^/]+/.+"),  # Debian's scripts/ and tools/ for the headers trees
    re.compile(r"^lib/modules/[^/]+/(build|source|System\.map|config|symvers\.gz)$"),
    re.compile(r"^boot/(System\.map|config|symvers)-.+"),
    re.compile(r"^usr/lib/debug/(boot/vmlinux-.+|lib/modules/[^/]+/vmlinux)$"),
)
_DEB_INCLUDE = re.compile(r"^(\s*-?include\s+)(/\S+)(/Makefile\s*)$", re.M)


def cache_root() -> Path:
    """$NQGEN_CACHE, else /var/cache/nqgen."""
    return Path(os.environ.get("NQGEN_CACHE") or DEFAULT_CACHE)


def wanted(rel: str) -> bool:
    """Whether a package member is one the profile or a module build needs."""
    return bool(_CONNTRACK.match(rel)) or any(p.match(rel) for p in _WANTED)


@dataclass
class PackageTarget:
    """The extracted target: the cache root and the inputs found in it."""

    root: Path
    release: str
    inputs: ProfileInputs
    packages: list[str] = field(default_factory=list)


def packages_key(packages: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for digest in sorted(_sha256(p) for p in packages):
        h.update(digest.encode())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_packages(packages: Sequence[Path], cache: Path | None = None) -> Path:
    """Extract the wanted members of every package into ``<cache>/packages/<key>/root`` (reused when there)."""
    for p in packages:
        if not p.is_file():
            raise InputError(f"--from-package {p}: no such file")
    base = (cache or cache_root()) / "packages"
    key = packages_key(packages)
    final = base / key
    if (final / "root").is_dir():
        return final / "root"
    base.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=base))
    try:
        root = stage / "root"
        root.mkdir()
        names = []
        for p in packages:
            got = extract(p, root, wanted)
            if not got.files and not got.symlinks:
                raise InputError(f"--from-package {p}: no kernel headers, conntrack module, System.map, config or "
                                 "symvers in it: not a kernel package")  # fmt: skip
            names.append(p.name)
        _fix_absolute_links(root)
        _fix_debian_makefiles(root, final / "root")
        _gunzip_symvers(root)
        (stage / "packages.txt").write_text("\n".join(names) + "\n")
        try:
            os.rename(stage, final)
        except OSError:
            if not (final / "root").is_dir():  # another process won the race: theirs is as good
                raise
            shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return final / "root"


def _fix_absolute_links(root: Path) -> None:
    """Absolute symlinks (``lib/modules/R/build -> /usr/src/...``) point into the extracted root instead."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            link = Path(dirpath) / name
            if not link.is_symlink():
                continue
            target = os.readlink(link)
            if target.startswith("/"):
                inside = root / target.lstrip("/")
                link.unlink()
                os.symlink(os.path.relpath(inside, link.parent), link)


def _fix_debian_makefiles(root: Path, final_root: Path) -> None:
    """Debian's per-flavour tree includes ``/usr/src/linux-headers-R-common/Makefile``: use the extracted one
    (by its path once the cache entry is in place: make resolves the include from any directory)."""
    src = root / "usr/src"
    if not src.is_dir():
        return
    for tree in src.iterdir():
        mk = tree / "Makefile"
        if not mk.is_file() or mk.is_symlink():
            continue
        text = mk.read_text(errors="replace")
        if re.search(r"^VERSION\s*=", text, re.M):
            continue

        for m in _DEB_INCLUDE.finditer(text):
            if not (root / m[2].lstrip("/") / "Makefile").is_file():
                raise InputError(f"{tree.name} includes {m[2]}/Makefile, which no given package holds: "
                                 f"add the {Path(m[2]).name} package")  # fmt: skip
        mk.write_text(_DEB_INCLUDE.sub(lambda m: f"{m[1]}{final_root / m[2].lstrip('/')}{m[3]}", text))


def _gunzip_symvers(root: Path) -> None:
    for gz in [*root.glob("boot/symvers-*.gz"), *root.glob("lib/modules/*/symvers.gz")]:
        data, _ = symsources.read_capped(gz, symsources.MAX_TEXT)  # a gzip bomb stops at the cap
        gz.with_suffix("").write_bytes(data)


def _headers_trees(root: Path) -> dict[str, Path]:
    """release -> prepared headers/build tree (one with utsrelease.h or kernel.release) in the root."""
    trees: dict[str, Path] = {}
    for parent in (root / "usr/src/kernels", root / "usr/src"):
        if not parent.is_dir():
            continue
        for tree in sorted(parent.iterdir()):
            if not tree.is_dir() or tree.is_symlink():
                continue
            try:
                release = symsources.kernel_release(tree)
            except InputError:
                continue
            trees.setdefault(release, tree)
    return trees


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def target_inputs(root: Path) -> tuple[str, ProfileInputs]:
    """The release and profile inputs of an extracted package root."""
    trees = _headers_trees(root)
    mod_releases = sorted(
        d.name for d in (root / "lib/modules").glob("*") if find_conntrack_modules(d)
    ) if (root / "lib/modules").is_dir() else []  # fmt: skip
    releases = sorted(set(mod_releases) | set(trees))
    if not releases:
        raise InputError("the packages hold neither a kernel headers tree nor a conntrack module")
    if len(releases) > 1:
        raise InputError(f"the packages are for different kernels: {', '.join(releases)}: give one kernel's")
    release = releases[0]
    if release not in trees:
        raise InputError(f"no headers tree for {release} in the packages: add kernel-devel-{release}.rpm "
                         f"or linux-headers-{release}.deb")  # fmt: skip
    if release not in mod_releases:
        raise InputError(f"no nf_conntrack module for {release} in the packages: add the kernel (EL7), "
                         f"kernel-core and kernel-modules (EL8) or linux-image-{release} package")  # fmt: skip
    kdir = trees[release]
    mods = root / "lib/modules" / release
    notes: list[str] = []
    scripts = kdir / "scripts"
    if scripts.is_symlink() and not scripts.exists():
        notes.append(f"{kdir.name}/scripts -> {os.readlink(scripts)} is missing: add the linux-kbuild package "
                     "to build modules from this tree")  # fmt: skip
    system_map = _first(root / f"boot/System.map-{release}", mods / "System.map", kdir / "System.map")
    if system_map is not None and symsources.is_placeholder_system_map(system_map):
        notes.append(f"{system_map.name} is Debian's placeholder (the real one is in linux-image-*-dbg): not used")
        system_map = None
    inputs = ProfileInputs(
        kdir=kdir,
        modules=find_conntrack_modules(mods),
        vmlinux=_first(
            root / f"usr/lib/debug/boot/vmlinux-{release}", root / f"usr/lib/debug/lib/modules/{release}/vmlinux"
        ),
        system_map=system_map,
        config=_first(root / f"boot/config-{release}", mods / "config", kdir / ".config"),
        symvers=_first(kdir / "Module.symvers", root / f"boot/symvers-{release}", mods / "symvers"),
        release=release,
        notes=notes,
    )
    return release, inputs


def from_packages(packages: Sequence[Path], cache: Path | None = None) -> PackageTarget:
    """Extract (or reuse) the packages and return the target they describe."""
    root = extract_packages(packages, cache)
    release, inputs = target_inputs(root)
    return PackageTarget(root=root, release=release, inputs=inputs, packages=[str(p) for p in packages])
