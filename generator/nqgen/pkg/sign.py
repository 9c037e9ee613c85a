"""Sign built modules with the target tree's own ``scripts/sign-file`` (the kernel checks what it appends)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..errors import BuildError, InputError

SIG_MAGIC = b"~Module signature appended~\n"


def is_signed(ko: Path) -> bool:
    with open(ko, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - len(SIG_MAGIC)))
        return fh.read() == SIG_MAGIC


def sign_file_tool(kdir: Path) -> Path:
    tool = kdir / "scripts" / "sign-file"
    if not tool.is_file():
        raise InputError(f"{tool} not found: the target tree has no sign-file (Debian: linux-kbuild; EL: kernel-devel)")
    return tool


def sign(ko: Path, key: Path, cert: Path, kdir: Path, hash_algo: str = "sha256") -> None:
    """Append a signature made with ``key``/``cert`` to ``ko`` (refuses a module that is already signed)."""
    for what, path in (("KEY", key), ("CERT", cert)):
        if not path.is_file():
            raise InputError(f"{what}={path}: no such file")
    if is_signed(ko):
        raise InputError(f"{ko} is already signed: rebuild it (make clean all) to sign it again")
    proc = subprocess.run(
        [str(sign_file_tool(kdir)), hash_algo, str(key), str(cert), str(ko)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not is_signed(ko):
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise BuildError(f"sign-file failed on {ko.name}: {msg[-1] if msg else f'exit {proc.returncode}'}")
