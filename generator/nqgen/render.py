"""Render strategy templates into a module tree, and replace ``out/`` atomically.

Each strategy is a cookiecutter template under ``templates/<strategy>/``; the shared kernel C in ``kmod/`` is
copied into the template's module directory before rendering, so it sees the same context. Everything is
rendered into a staging directory beside ``out/``; only a complete tree replaces ``out/``, so a failure
never leaves a half-written output behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import BuildError, InputError


def project_root() -> Path:
    """The directory holding ``templates/`` and ``kmod/`` (overridable with NQGEN_ROOT)."""
    env = os.environ.get("NQGEN_ROOT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2]


def templates_dir() -> Path:
    return project_root() / "templates"


def kmod_dir() -> Path:
    return project_root() / "kmod"


def _cookiecutter(template: Path, output_dir: Path, extra_context: dict[str, Any]) -> Path:
    # Imported here: cookiecutter pulls in a lot and only rendering needs it.
    from cookiecutter.exceptions import CookiecutterException
    from jinja2 import TemplateError

    from .rendercache import cookiecutter_no_input

    try:
        return cookiecutter_no_input(template, extra_context, output_dir)
    except (CookiecutterException, TemplateError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BuildError(f"rendering template {template.name} failed: {message}") from exc


def render_strategy(strategy: str, context: dict[str, Any], dest_parent: Path) -> Path:
    """Render ``templates/<strategy>`` plus ``kmod/`` into ``dest_parent/<strategy>``; return that path."""
    template = templates_dir() / strategy
    if not (template / "cookiecutter.json").is_file():
        raise BuildError(f"no template for strategy {strategy!r} in {templates_dir()}")
    with tempfile.TemporaryDirectory(prefix="nqgen-tpl-") as tmp:
        staged = Path(tmp) / strategy
        shutil.copytree(template, staged)
        module_dirs = [p for p in staged.iterdir() if p.is_dir() and p.name.startswith("{{")]
        if len(module_dirs) != 1:
            raise BuildError(f"template {strategy} must hold exactly one '{{{{cookiecutter...}}}}' directory")
        shared = set()
        for src in sorted(kmod_dir().iterdir()):
            if src.is_file():
                shutil.copy2(src, module_dirs[0] / src.name)
                shared.add(src.name)
        produced = _cookiecutter(staged, dest_parent, context)
    prune_unused_shared(produced, shared)
    return produced


_OBJ = re.compile(r"([\w-]+)\.o\b")
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def prune_unused_shared(module_dir: Path, shared: set[str]) -> None:
    """Drop the shared kmod files a strategy does not build: .c files its Kbuild does not link, headers no
    remaining source includes (transitively), so the tree holds only the C that goes into the module."""
    kbuild = module_dir / "Kbuild"
    if not kbuild.is_file():
        raise BuildError(f"{module_dir.name}: the template rendered no Kbuild")
    linked = set(_OBJ.findall(kbuild.read_text()))
    for name in shared:
        path = module_dir / name
        if path.suffix == ".c" and path.stem not in linked:
            path.unlink()
    needed: set[str] = set()
    todo = [p for p in module_dir.iterdir() if p.suffix == ".c"]
    while todo:
        src = todo.pop()
        for inc in _INCLUDE.findall(src.read_text()):
            if inc not in needed and (module_dir / inc).is_file():
                needed.add(inc)
                todo.append(module_dir / inc)
    for name in shared:
        path = module_dir / name
        if path.suffix == ".h" and name not in needed:
            path.unlink()


def render_out_makefile(context: dict[str, Any], dest: Path) -> None:
    """Render the ``out/`` Makefile (``templates/out``) into ``dest``."""
    with tempfile.TemporaryDirectory(prefix="nqgen-out-") as tmp:
        produced = _cookiecutter(templates_dir() / "out", Path(tmp), context)
        for item in produced.iterdir():
            shutil.move(str(item), dest / item.name)


@contextmanager
def staged_output(out: Path, replace_any: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``out`` whole, on failure it is removed.

    ``replace_any`` (``--force``) also replaces a file or a symbolic link at ``out`` (the link, not its target).
    """
    out = out.absolute()
    parent = out.parent
    if not parent.is_dir():
        raise InputError(f"output parent directory {parent} does not exist")
    if not replace_any and (out.is_symlink() or (out.exists() and not out.is_dir())):
        raise InputError(f"output path {out} exists and is not a directory")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old: Path | None = None
    if os.path.lexists(out):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
        os.rename(out, old / "out")
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
