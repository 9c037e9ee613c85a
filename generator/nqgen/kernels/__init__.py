"""Reference kernels built from any kernel source, cached, for the lab and the tests.

A *recipe* (``recipes.py``) names a kernel to build: its source (a directory, a tarball or a CentOS/RHEL
``.src.rpm``), our own small compiler shims (``patches/<recipe>/*.patch``: backports of upstream build fixes,
applied in name order), the distribution config (a tree prepared with ``modules_prepare`` for generating and
verifying modules) and the small qemu config (``configs/<recipe>-qemu.fragment``). Recipes: ``rhel77``,
``rhel81``, ``rhel81-kasan-free`` (rhel81's kernel with a rebuilt ``nf_conntrack.ko``) and ``debian61-repro``
(the Debian 6.1 reference kernel of ``nqgen.reprokernel``, kept in its own cache).

API (all a caller needs)::

    from nqgen.kernels import find_built, ensure_built
    k = find_built("rhel81")                  # BuiltKernel or None; never builds
    k = ensure_built("rhel81", Path(src))     # builds when not cached (minutes to an hour), then returns
    k.release, k.image, k.vmlinux, k.modules_dir, k.kdir, k.distro_kdir, k.root

``find_built(recipe)`` returns the most recent finished build of that recipe; with ``source=`` it returns the
build of exactly that source. Builds live in ``$NQGEN_CACHE/kernels/<recipe>/<key>/`` (``/var/cache/nqgen`` by
default; the key hashes the source's identity, the patches and the configs), are made in ``<key>.tmp`` and
renamed when complete, and describe themselves in ``kernel.json``. Progress goes to stderr and the full log to
``$NQGEN_CACHE/kernels/<recipe>.log``. Command line: ``nqgen kernel build RECIPE --source PATH``,
``nqgen kernel show RECIPE``, ``nqgen kernel list``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .build import BuiltKernel, cache_root, find_in_cache, latest_in_cache, log_path, recipe_key
from .recipes import RECIPES, Recipe, get_recipe

__all__ = ["RECIPES", "BuiltKernel", "Recipe", "cache_root", "ensure_built", "find_built", "get_recipe",
           "log_path"]


def _legacy(found: object) -> BuiltKernel | None:
    from ..reprokernel import ReproKernel

    if not isinstance(found, ReproKernel):
        return None
    return BuiltKernel(recipe="debian61-repro", release=found.release, image=found.image, vmlinux=found.vmlinux,
                       modules_dir=found.modules_dir, kdir=found.kdir, distro_kdir=None, key=found.key,
                       root=found.root)


def _default_source(recipe: Recipe) -> Path:
    if recipe.default_source is None:
        raise InputError(f"kernel recipe {recipe.name} needs a source (--source)")
    return Path(recipe.default_source)


def find_built(recipe: str, source: Path | None = None, cache: Path | None = None) -> BuiltKernel | None:
    """The finished build of ``recipe`` (of exactly ``source`` when given), or None. Never builds."""
    r = get_recipe(recipe)
    if r.legacy:
        from .. import reprokernel

        return _legacy(reprokernel.find_built(cache / "repro-kernel" if cache else None))
    if source is None:
        return latest_in_cache(r, cache)
    try:
        key = recipe_key(r, source)
    except InputError:
        return None
    return find_in_cache(r, key, cache)


def ensure_built(recipe: str, source: Path | None = None, cache: Path | None = None, jobs: int = 2,
                 nice: int = 10) -> BuiltKernel:
    """The build of ``recipe`` from ``source`` (default: the recipe's usual place), building it when needed."""
    r = get_recipe(recipe)
    if r.legacy:
        from .. import reprokernel

        inputs = reprokernel.load_inputs(tarball=source) if source is not None else None
        found = _legacy(reprokernel.ensure_built(cache / "repro-kernel" if cache else None, jobs,
                                                 inputs=inputs, nice=nice))
        assert found is not None
        return found
    from .build import build

    return build(r, source if source is not None else _default_source(r), cache=cache, jobs=jobs, nice=nice)
