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

from ..errors import InputError

Want = Callable[[str], bool]


@dataclass
class Extracted:
    """What one archive gave: member paths written (relative, POSIX) and the package format."""

    format: str
    files: list[str] = field(default_factory=list)
    symlinks: dict[str, str] = field(default_factory=dict)  # path -> target as stored


def member_path(name: str) -> str | None:
    """A member name as a safe relative path ('./usr/x' -> 'usr/x'); None for '.', absolute escapes, '..'."""
    parts = [p for p in PurePosixPath(name).parts if p not in ("/", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _write_entry(entry: libarchive.ArchiveEntry, rel: str, dest: Path, got: Extracted) -> None:
    path = dest / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if entry.isdir:
        path.mkdir(exist_ok=True)
        return
    if path.is_symlink() or path.exists():
        if path.is_dir() and not path.is_symlink():
            return
        path.unlink()
    if entry.issym:
        os.symlink(entry.linkpath, path)
        got.symlinks[rel] = entry.linkpath
        return
    if entry.islnk:
        target = member_path(entry.linkpath or "")
        if target is None or not (dest / target).is_file():
            raise InputError(f"hard link {rel} -> {entry.linkpath}: target not extracted")
        os.link(dest / target, path)
        got.files.append(rel)
        return
    if not entry.isreg:
        return  # device nodes, fifos: nothing a kernel tree needs
    with open(path, "wb") as fh:
        for block in entry.get_blocks():
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
    got = Extracted(format=package_format(archive))
    try:
        _extract_stream(archive, dest, want, got, outer=True)
    except libarchive.ArchiveError as exc:
        raise InputError(f"{archive}: not a package libarchive can read: {exc}") from exc
    return got
