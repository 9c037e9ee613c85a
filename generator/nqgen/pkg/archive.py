"""Extract chosen members of rpm, deb (ar + data.tar.*) and cpio/tar archives with libarchive.

libarchive reads the formats (rpm with its compressed cpio payload, ar, tar, cpio, every compression); this
module only decides which members to write and writes them safely below one directory.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import libarchive

from .. import symsources
from ..errors import InputError

Want = Callable[[str], bool]


@dataclass
class Extracted:
    """What one archive gave: member paths written (relative, POSIX) and the package format."""

    format: str
    files: list[str] = field(default_factory=list)
    symlinks: dict[str, str] = field(default_factory=dict)  # path -> target as stored
    limit: int = 1 << 62  # most bytes the wanted members may total (a bomb stops here, not at a full disk)
    written: int = 0


def member_path(name: str) -> str | None:
    """A member name as a safe relative path ('./usr/x' -> 'usr/x'); None for '.', absolute escapes, '..'."""
    parts = [p for p in PurePosixPath(name).parts if p not in ("/", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _inside(dest: Path, path: Path) -> bool:
    """Whether ``path`` (following every symbolic link on the way, existing or not) stays below ``dest``."""
    root = os.path.realpath(dest)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _write_entry(entry: libarchive.ArchiveEntry, rel: str, dest: Path, got: Extracted) -> None:
    path = dest / rel
    # a member below a symbolic link the archive made earlier ("usr/src/x -> /", then "usr/src/x/etc/...") would
    # be written wherever that link points: refused, as tar refuses it
    if not _inside(dest, path.parent):
        raise InputError(f"member {rel} lies below a symbolic link that leaves the extraction directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    if entry.isdir:
        path.mkdir(exist_ok=True)
        return
    if path.is_symlink() or path.exists():
        if path.is_dir() and not path.is_symlink():
            return
        path.unlink()  # a later member of the same name replaces it (as tar does): forget the earlier one
        if rel in got.symlinks:
            del got.symlinks[rel]
        elif rel in got.files:
            got.files.remove(rel)
    if entry.issym:
        os.symlink(entry.linkpath, path)
        got.symlinks[rel] = entry.linkpath
        return
    if entry.islnk:
        target = member_path(entry.linkpath or "")
        if target is None or not _inside(dest, dest / target) or not (dest / target).is_file():
            raise InputError(f"hard link {rel} -> {entry.linkpath}: target not extracted")
        os.link(dest / target, path)
        got.files.append(rel)
        return
    if not entry.isreg:
        return  # device nodes, fifos: nothing a kernel tree needs
    with open(path, "wb") as fh:
        for block in entry.get_blocks():
            got.written += len(block)
            if got.written > got.limit:
                raise InputError(f"the package expands to more than {got.limit >> 20} MiB (at {rel}; raise with "
                                 f"{symsources.CAP_ENV})")  # fmt: skip
            fh.write(block)
    os.chmod(path, stat.S_IMODE(entry.mode) | 0o600)
    got.files.append(rel)


RPM_MAGIC = b"\xed\xab\xee\xdb"


def package_format(archive: Path) -> str:
    """'rpm', 'deb' or 'archive' (any other format libarchive reads), from the file's first bytes."""
    with open(archive, "rb") as fh:
        head = fh.read(8)
    if head.startswith(RPM_MAGIC):
        return "rpm"
    if head == b"!<arch>\n":
        return "deb"
    return "archive"


def _extract_stream(archive: Path, dest: Path, want: Want, got: Extracted, outer: bool) -> None:
    with libarchive.file_reader(str(archive)) as reader:
        for entry in reader:
            name = entry.pathname or ""
            if outer and got.format == "deb":
                if name.startswith("data.tar"):
                    with tempfile.NamedTemporaryFile(dir=dest, prefix=".data-", suffix="-" + name) as tmp:
                        for block in entry.get_blocks():
                            tmp.write(block)
                        tmp.flush()
                        _extract_stream(Path(tmp.name), dest, want, got, outer=False)
                continue
            rel = member_path(name)
            if rel is None or entry.isdir or not want(rel):
                continue  # parents are made for the files that are wanted
            _write_entry(entry, rel, dest, got)


def extract(archive: Path, dest: Path, want: Want) -> Extracted:
    """Write the members of ``archive`` for which ``want(relpath)`` is true below ``dest``."""
    try:
        size = archive.stat().st_size
    except OSError as exc:
        raise InputError(f"{archive}: cannot read: {exc.strerror or exc}") from None
    got = Extracted(format=package_format(archive), limit=symsources.decompression_cap(size))
    try:
        _extract_stream(archive, dest, want, got, outer=True)
    except libarchive.ArchiveError as exc:
        raise InputError(f"{archive}: not a package libarchive can read: {exc}") from exc
    except OSError as exc:  # members that clash (a file, then a member below it), a full disk
        raise InputError(f"{archive}: cannot extract: {exc.strerror or exc}: {exc.filename or ''}") from None
    return got
