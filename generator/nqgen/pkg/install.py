"""``make -C out install``/``uninstall``: lay the host files of one module into a root, and take exactly them
back out. A manifest (``usr/share/nqgen/<module>.files``) records every file and every directory install
created; uninstall removes those files and, deepest first, those directories when they are empty."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError
from .hostfiles import HostModule, layout_for, stage


def manifest_rel(module: str) -> str:
    return f"usr/share/nqgen/{module}.files"


def _is_live_root(root: Path) -> bool:
    return root.resolve() == Path("/")


def install(
    hm: HostModule,
    root: Path,
    params: list[str],
    before: list[str],
    ko: Path | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> list[str]:
    """Install into ``root`` (``/`` for the host itself); return the files written."""
    if not root.is_dir():
        raise InputError(f"DESTDIR {root}: no such directory")
    manifest = root / manifest_rel(hm.module)
    if manifest.exists():
        raise InputError(f"{hm.module} is already installed in {root} ({manifest}): uninstall it first")
    with tempfile.TemporaryDirectory(prefix="nqgen-install-") as tmp:
        staged = Path(tmp)
        files = stage(hm, staged, params, before, ko=ko, layout=layout_for(hm.release))
        taken = [f for f in files if (root / f).exists() or (root / f).is_symlink()]
        if taken:
            raise InputError(f"{root}: {', '.join(taken)} already exist(s) and belong to something else: "
                             "not overwriting")  # fmt: skip
        created: list[str] = []
        for rel in [*files, manifest_rel(hm.module)]:
            parts = Path(rel).parts[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if not (root / d).exists():
                    (root / d).mkdir()
                    created.append(d)
        for rel in files:
            shutil.copy2(staged / rel, root / rel)
    lines = [f"f {f}" for f in [*files, manifest_rel(hm.module)]] + [f"d {d}" for d in created]
    manifest.write_text("\n".join(lines) + "\n")
    say(f"installed {hm.module} into {root}: {len(files) + 1} files, manifest {manifest}")
    if _is_live_root(root):
        _host_steps(hm, enable=True, say=say)
    else:
        say(f"not the running system: no depmod, no systemctl (on the host: depmod -a {hm.release}; "
            f"systemctl enable {hm.unit})")  # fmt: skip
    return [*files, manifest_rel(hm.module)]


def uninstall(module: str, root: Path, say: Callable[[str], None] = lambda _m: None, release: str = "") -> list[str]:
    """Remove what install recorded for ``module`` under ``root``; return the files removed."""
    manifest = root / manifest_rel(module)
    if not manifest.is_file():
        raise InputError(f"{module} is not installed in {root} (no {manifest})")
    files: list[str] = []
    dirs: list[str] = []
    for line in manifest.read_text().splitlines():
        kind, _, rel = line.partition(" ")
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise InputError(f"{manifest}: malformed line {line!r}")
        (files if kind == "f" else dirs).append(rel)
    if _is_live_root(root):
        _host_steps_before_removal(module, say)
    removed = []
    for rel in files:
        path = root / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(rel)
        else:
            say(f"warning: {path} was already gone")
    for rel in sorted(dirs, key=lambda d: -len(Path(d).parts)):
        path = root / rel
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    say(f"removed {module} from {root}: {len(removed)} files")
    if _is_live_root(root) and release:
        _depmod(release, say)
        _systemctl(["daemon-reload"], say)
    return removed


def _depmod(release: str, say: Callable[[str], None]) -> None:
    if Path(f"/lib/modules/{release}").is_dir():
        subprocess.run(["depmod", "-a", release], check=False)
        say(f"depmod -a {release}")


def _systemctl(args: list[str], say: Callable[[str], None]) -> None:
    if shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", *args], check=False)
        say("systemctl " + " ".join(args))


def _host_steps(hm: HostModule, enable: bool, say: Callable[[str], None]) -> None:
    _depmod(hm.release, say)
    _systemctl(["daemon-reload"], say)
    if enable:
        _systemctl(["enable", hm.unit], say)


def _host_steps_before_removal(module: str, say: Callable[[str], None]) -> None:
    unit = f"nqgen-{module}.service"
    _systemctl(["disable", "--now", unit], say)
