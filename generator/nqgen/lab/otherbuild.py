"""Another build of the target's nf_conntrack.ko for the same release, to show that a module refuses it.

Debian's ``linux-source-6.1`` holds the source of the installed 6.1 kernel; its ``net/netfilter`` conntrack files
built out of tree against the installed build tree give an ``nf_conntrack.ko`` with the same release, vermagic,
exports and (here) even the same function offsets, but another build ID. Cached in
``$NQGEN_CACHE/other-build/<release>/<key>/``, the key hashing its inputs: the source package's version, the
build tree's ``.config`` and ``Module.symvers``, and this recipe's version.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ..errors import BuildError, InputError
from ..reprokernel import CACHE_ENV, DEFAULT_CACHE, SOURCE_TARBALL, source_id

RECIPE = "1"  # bump when the way the module is built changes
_WANTED = re.compile(r"^[^/]+/net/netfilter/(nf_conntrack[\w-]*\.c|nf_internals\.h|Makefile)$")


def _extract(tarball: Path, dest: Path) -> None:
    try:
        with tarfile.open(tarball, "r|*") as tar:
            for member in tar:
                if member.isfile() and _WANTED.match(member.name):
                    src = tar.extractfile(member)
                    if src is not None:
                        (dest / Path(member.name).name).write_bytes(src.read())
    except (OSError, tarfile.TarError) as exc:
        raise InputError(f"cannot read {tarball}: {exc}") from exc


def _kbuild(makefile: str) -> str:
    """``obj-m`` plus the nf_conntrack object lines of net/netfilter/Makefile (they follow the tree's config)."""
    lines, take = ["obj-m := nf_conntrack.o"], False
    for line in makefile.splitlines():
        if line.startswith("nf_conntrack-") or line.startswith("ifeq ($(CONFIG_NF_CONNTRACK)"):
            take = True
        elif take and not line.strip():
            take = False
        if take:
            lines.append(line)
    return "\n".join(lines) + "\n"


def cache_key(kdir: Path, release: str, tarball: Path = SOURCE_TARBALL) -> str:
    """What the rebuilt module depends on: the source, the build tree it is built against, the recipe."""
    h = hashlib.sha256(f"{RECIPE}\0{release}\0{source_id(tarball)}\0".encode())
    for name in (".config", "Module.symvers"):
        try:
            h.update(name.encode() + b"\0" + (kdir / name).read_bytes())
        except OSError as exc:
            raise InputError(f"cannot read {kdir / name}: {exc}") from exc
    return h.hexdigest()[:16]


def other_nf_conntrack(kdir: Path, release: str, tarball: Path = SOURCE_TARBALL, nice: int = 10) -> Path:
    """nf_conntrack.ko rebuilt from source against ``kdir`` (cached); InputError when it cannot be made."""
    if not tarball.is_file():
        raise InputError(f"{tarball} is missing (apt-get install linux-source-6.1)")
    root = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE) / "other-build" / release
    cache = root / cache_key(kdir, release, tarball)
    ko = cache / "nf_conntrack.ko"
    if ko.is_file():
        return ko
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{release}.", dir=cache.parent) as tmp:
        build = Path(tmp) / "build"
        build.mkdir()
        _extract(tarball, build)
        if not (build / "nf_conntrack_core.c").is_file() or not (build / "Makefile").is_file():
            raise InputError(f"{tarball} has no net/netfilter/nf_conntrack_core.c")
        (build / "Kbuild").write_text(_kbuild((build / "Makefile").read_text()))
        (build / "Makefile").unlink()
        proc = subprocess.run(
            ["nice", "-n", str(nice), "make", "-C", str(kdir), f"M={build}", "-j2", "modules"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or not (build / "nf_conntrack.ko").is_file():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            raise BuildError(f"rebuilding nf_conntrack.ko against {kdir} failed: {' / '.join(tail)}")
        staged = Path(tmp) / "out"
        staged.mkdir()
        shutil.copy2(build / "nf_conntrack.ko", staged / "nf_conntrack.ko")
        if ko.is_file():  # another process finished first
            return ko
        staged.rename(cache)
    return ko
