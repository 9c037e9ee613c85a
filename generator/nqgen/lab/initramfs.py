"""A newc cpio writer for the guest's initramfs (no root rights needed for device nodes)."""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path

_TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


@dataclass
class Cpio:
    """An uncompressed newc archive built in memory; parents of every entry are added on demand."""

    _chunks: list[bytes] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)
    _ino: int = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        if name in self._names:
            raise ValueError(f"duplicate initramfs entry {name}")
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        ]
        self._ino += 1
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self._chunks.append(header + encoded + _pad4(len(header) + len(encoded)))
        if data:
            self._chunks.append(data + _pad4(len(data)))

    def _parents(self, name: str) -> None:
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._names:
                self._entry(d, stat.S_IFDIR | 0o755)

    def directory(self, name: str) -> None:
        self._parents(name)
        if name.strip("/") not in self._names:
            self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def copy(self, name: str, src: Path, mode: int | None = None) -> None:
        self.file(name, src.read_bytes(), mode if mode is not None else (src.stat().st_mode & 0o777))

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def has(self, name: str) -> bool:
        return name.strip("/") in self._names

    def bytes(self) -> bytes:
        encoded = _TRAILER.encode() + b"\0"
        fields = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(encoded), 0]
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        trailer = header + encoded + _pad4(len(header) + len(encoded))
        body = b"".join(self._chunks) + trailer
        return body + _pad4(len(body))
