"""Kernel sources: a directory, a tarball, or a CentOS/RHEL kernel ``.src.rpm``.

``source_id()`` names a source cheaply and stably (it goes into the cache key); ``materialise()`` lays the
source out as a plain kernel tree in a new directory. A ``.src.rpm`` is unpacked with ``rpm2cpio | cpio`` (Debian
packages rpm2cpio and cpio), its ``linux-*.tar.*`` extracted, and its ``kernel-*.config`` files copied into the
tree's ``configs/`` (where an rpmbuild -bp tree and the RHEL 7.7 snapshot keep them).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ..errors import BuildError, InputError
from .runner import Runner

_TAR_SUFFIXES = (".tar", ".tar.xz", ".tar.gz", ".tgz", ".tar.bz2", ".tar.zst")
SRPM_SUFFIX = ".src.rpm"
# Names left out of a directory source's identity and copy (version control, editor droppings).
_SKIP_DIRS = {".git", ".hg", ".svn"}


def kind(source: Path) -> str:
    """"dir", "tarball" or "srpm"; InputError for anything else."""
    if source.is_dir():
        if not (source / "Makefile").is_file() or not (source / "Kconfig").exists():
            raise InputError(f"{source} is not a kernel source tree (no top-level Makefile and Kconfig)")
        return "dir"
    if not source.is_file():
        raise InputError(f"kernel source {source} does not exist")
    if source.name.endswith(SRPM_SUFFIX):
        return "srpm"
    if source.name.endswith(_TAR_SUFFIXES):
        return "tarball"
    raise InputError(f"{source}: not a directory, a tarball ({', '.join(_TAR_SUFFIXES)}) or a {SRPM_SUFFIX}")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tree_digest(root: Path) -> tuple[str, int]:
    """Hash of every file's relative path, size and mtime (seconds), and the number of files."""
    h = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            p = Path(dirpath, name)
            try:
                st = p.lstat()
            except OSError:
                continue
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
            count += 1
    return h.hexdigest()[:16], count


def source_id(source: Path) -> str:
    """A stable name for the source's content: files' paths, sizes and mtimes (directory) or the file's hash."""
    k = kind(source)
    if k == "dir":
        digest, count = _tree_digest(source)
        return f"dir {count} files {digest}"
    return f"{k} {source.name} {_file_digest(source)[:16]}"


def _single_top(parent: Path, what: Path) -> Path:
    tops = [p for p in parent.iterdir() if p.is_dir()]
    if len(tops) == 1 and (tops[0] / "Makefile").is_file():
        return tops[0]
    if (parent / "Makefile").is_file():
        return parent
    raise BuildError(f"{what} does not hold one kernel tree (a top directory with a Makefile)")


def _extract_tarball(tarball: Path, dest: Path, scratch: Path, r: Runner) -> None:
    scratch.mkdir()
    r.run(["tar", "-xf", str(tarball.resolve()), "-C", str(scratch)], scratch, f"extract {tarball.name}")
    _single_top(scratch, tarball).rename(dest)


def _extract_srpm(srpm: Path, dest: Path, scratch: Path, r: Runner) -> None:
    if shutil.which("rpm2cpio") is None or shutil.which("cpio") is None:
        raise BuildError("reading a .src.rpm needs rpm2cpio and cpio: apt-get install rpm2cpio cpio")
    unpacked = scratch / "srpm"
    unpacked.mkdir(parents=True)
    cpio = unpacked / "payload.cpio"
    r.run(["sh", "-c", 'rpm2cpio "$1" > "$2"', "rpm2cpio", str(srpm.resolve()), str(cpio)], unpacked,
          f"rpm2cpio {srpm.name}")
    r.run(["cpio", "-idm", "--quiet", "-F", str(cpio)], unpacked, "cpio")
    cpio.unlink()
    tarballs = sorted(p for p in unpacked.iterdir() if p.name.startswith("linux-") and p.name.endswith(_TAR_SUFFIXES))
    if len(tarballs) != 1:
        found = ", ".join(p.name for p in tarballs) or "none"
        raise BuildError(f"{srpm.name} should hold one linux-*.tar.* (found: {found})")
    _extract_tarball(tarballs[0], dest, scratch / "tree", r)
    configs = dest / "configs"
    configs.mkdir(exist_ok=True)
    for cfg in sorted(unpacked.glob("kernel-*.config")):
        shutil.copy2(cfg, configs / cfg.name)
    shutil.rmtree(unpacked)


def materialise(source: Path, dest: Path, scratch: Path, r: Runner) -> None:
    """Lay ``source`` out as a plain kernel tree at ``dest`` (which must not exist); ``scratch`` is a free path."""
    k = kind(source)
    if k == "dir":
        excludes = [f"--exclude=/{d}" for d in sorted(_SKIP_DIRS)]
        r.run(["rsync", "-a", *excludes, f"{source.resolve()}/", f"{dest}/"], dest.parent, "copy source")
    elif k == "tarball":
        _extract_tarball(source, dest, scratch, r)
    else:
        _extract_srpm(source, dest, scratch, r)
    if scratch.exists():
        shutil.rmtree(scratch)
