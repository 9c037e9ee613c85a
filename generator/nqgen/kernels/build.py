"""Building a recipe into the cache: ``<cache>/kernels/<recipe>/<key>/``, built in ``<key>.tmp`` and renamed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import BuildError, InputError
from . import source as src
from .kconfig import merge_config, missing_options, without_modules
from .recipes import Recipe, get_recipe
from .runner import Runner, locked, sayer

DEFAULT_CACHE = Path("/var/cache/nqgen")
CACHE_ENV = "NQGEN_CACHE"
META_FILE = "kernel.json"
# Bump when the build steps below change in a way that changes the result.
BUILDER_VERSION = "1"
_TOOLS = ("make", "gcc", "patch", "tar", "rsync", "bc", "bison", "flex", "perl", "depmod")


@dataclass(frozen=True)
class BuiltKernel:
    """A finished build: everything the lab and the tests need."""

    recipe: str
    release: str  # `uname -r`
    image: Path  # bzImage
    vmlinux: Path  # ELF with symbols
    modules_dir: Path  # .../lib/modules/<release>, staged with modules_install and depmod
    kdir: Path  # build tree of this kernel, for out-of-tree modules (`make -C kdir M=...`)
    distro_kdir: Path | None  # tree prepared with the distribution config (modules_prepare only), if any
    key: str
    root: Path  # the cache directory holding all of the above
    # The conntrack modules built in distro_kdir (nf_conntrack*.ko, as the distribution config builds them)
    distro_modules: tuple[Path, ...] = ()

    def to_json(self) -> dict[str, str | None]:
        """Every field as a string (``distro_modules`` joined by spaces)."""
        out = self._scalars()
        out["distro_modules"] = " ".join(str(p) for p in self.distro_modules)
        return out

    def _scalars(self) -> dict[str, str | None]:
        return {k: (str(v) if v is not None else None) for k, v in asdict(self).items() if k != "distro_modules"}


def cache_root(cache: Path | None = None) -> Path:
    """``<cache>/kernels``: one directory per recipe."""
    if cache is None:
        env = os.environ.get(CACHE_ENV)
        cache = Path(env) if env else DEFAULT_CACHE
    return cache / "kernels"


def log_path(recipe: Recipe, cache: Path | None = None) -> Path:
    return cache_root(cache) / f"{recipe.name}.log"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc


def recipe_key(recipe: Recipe, source: Path) -> str:
    """Hash of the builder version, the recipe, the source's identity, our patches and configs."""
    parts = [BUILDER_VERSION, recipe.name, src.source_id(source), recipe.distro_config or "", recipe.qemu_base,
             " ".join(recipe.make_vars), recipe.module_dir or "", " ".join(recipe.modules)]
    if recipe.distro_modules:
        parts.append(" ".join(f"{d}/{m}" for d, m in recipe.distro_modules))
    parts += [f"{p.name}\n{_read(p)}" for p in recipe.patch_files()]
    frag = recipe.fragment_file()
    parts.append(_read(frag) if frag else "")
    if recipe.base:
        parts.append(recipe_key(get_recipe(recipe.base), source))
    h = hashlib.sha256()
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def _from_meta(final: Path) -> BuiltKernel | None:
    meta = final / META_FILE
    if not meta.is_file():
        return None
    d = json.loads(meta.read_text())

    def path(name: str) -> Path:
        p = Path(d[name])
        return p if p.is_absolute() else final / p

    return BuiltKernel(recipe=d["recipe"], release=d["release"], image=path("image"), vmlinux=path("vmlinux"),
                       modules_dir=path("modules_dir"), kdir=path("kdir"),
                       distro_kdir=path("distro_kdir") if d.get("distro_kdir") else None,
                       key=final.name, root=final,
                       distro_modules=tuple(final / p for p in d.get("distro_modules", [])))


def find_in_cache(recipe: Recipe, key: str, cache: Path | None = None) -> BuiltKernel | None:
    return _from_meta(cache_root(cache) / recipe.name / key)


def latest_in_cache(recipe: Recipe, cache: Path | None = None) -> BuiltKernel | None:
    """The most recently finished build of ``recipe``, whatever its source."""
    d = cache_root(cache) / recipe.name
    if not d.is_dir():
        return None
    done = sorted((p for p in d.iterdir() if (p / META_FILE).is_file()), key=lambda p: (p / META_FILE).stat().st_mtime)
    return _from_meta(done[-1]) if done else None


# --- the steps ------------------------------------------------------------------------------------------------


def _check_tools() -> None:
    missing = [t for t in _TOOLS if shutil.which(t) is None and not Path("/sbin", t).exists()]
    if missing:
        raise BuildError(f"build tools missing: {', '.join(missing)} (scripts/install-deps installs them)")


def _apply_patches(recipe: Recipe, tree: Path, r: Runner) -> None:
    for p in recipe.patch_files():
        r.run(["patch", "-p1", "--forward", "--batch"], tree, f"apply {recipe.name}/{p.name}", stdin=p)


def _relink(modules_dir: Path, kdir: Path) -> None:
    for name in ("build", "source"):
        link = modules_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
    (modules_dir / "build").symlink_to(kdir)


def _distro_tree(recipe: Recipe, pristine: Path, dest: Path, r: Runner) -> None:
    assert recipe.distro_config is not None
    config = pristine / recipe.distro_config
    if not config.is_file():
        raise BuildError(f"the source has no {recipe.distro_config} (the distribution config of {recipe.name})")
    r.run(["rsync", "-a", f"{pristine}/", f"{dest}/"], dest.parent, "copy tree for the distribution config")
    shutil.copy2(config, dest / ".config")
    mk = ["make", *recipe.make_vars]
    r.run([*mk, "olddefconfig"], dest, "distribution config: olddefconfig")
    r.run([*mk, "modules_prepare"], dest, "distribution config: modules_prepare")
    for subdir, name in recipe.distro_modules:
        # obj-m on the command line overrides the directory's list: only this module is built
        r.run([*mk, f"M={dest / subdir}", f"obj-m={name}.o", "modules"], dest, f"distribution config: {name}.ko")


def _qemu_config(recipe: Recipe, tree: Path, r: Runner) -> None:
    mk = ["make", *recipe.make_vars]
    config = tree / ".config"
    if recipe.qemu_base == "distro-without-modules":
        assert recipe.distro_config is not None
        config.write_text(without_modules(_read(tree / recipe.distro_config)))
    else:
        r.run([*mk, recipe.qemu_base], tree, f"make {recipe.qemu_base}")
    frag = recipe.fragment_file()
    fragment = _read(frag) if frag else ""
    config.write_text(merge_config(config.read_text(), fragment))
    r.run([*mk, "olddefconfig"], tree, "make olddefconfig")
    bad = missing_options(config.read_text(), fragment)
    if bad:
        raise BuildError(f"Kconfig dropped requested options: {', '.join(bad)}")
    r.say("every option of the fragment is set")


class _Steps:
    """Steps of a full build already done in ``<key>.tmp`` (``steps.done``), so an interrupted build resumes.

    The make steps are never recorded: make itself resumes them. A step is recorded only once it completed.
    """

    FILE = "steps.done"

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / self.FILE
        self.done = set(self.path.read_text().splitlines()) if self.path.is_file() else set()

    def __contains__(self, name: str) -> bool:
        return name in self.done

    def add(self, name: str) -> None:
        self.done.add(name)
        with self.path.open("a") as fh:
            fh.write(name + "\n")


def _build_full(recipe: Recipe, source: Path, tmp: Path, jobs: int, r: Runner) -> dict[str, object]:
    steps = _Steps(tmp)
    pristine, build = tmp / "pristine", tmp / "build"
    if "source" not in steps:
        for leftover in (pristine, tmp / "scratch"):
            if leftover.exists():
                shutil.rmtree(leftover)
        src.materialise(source, pristine, tmp / "scratch", r)
        steps.add("source")
    for p in recipe.patch_files():
        if f"patch {p.name}" not in steps:
            r.run(["patch", "-p1", "--forward", "--batch"], pristine, f"apply {recipe.name}/{p.name}", stdin=p)
            steps.add(f"patch {p.name}")
    mk = ["make", *recipe.make_vars]
    if "mrproper" not in steps:
        r.run([*mk, "mrproper"], pristine, "make mrproper (the tree may ship stale generated files)")
        steps.add("mrproper")
    distro: str | None = None
    distro_mods: list[str] = []
    if recipe.distro_config:
        if "distro" not in steps:
            if (tmp / "distro").exists():
                shutil.rmtree(tmp / "distro")
            _distro_tree(recipe, pristine, tmp / "distro", r)
            steps.add("distro")
        distro = "distro"
        distro_mods = [f"distro/{d}/{m}.ko" for d, m in recipe.distro_modules]
    if "rename" not in steps:
        pristine.rename(build)
        steps.add("rename")
    if "config" not in steps:
        _qemu_config(recipe, build, r)
        steps.add("config")
    # bzImage first: it rewrites Module.symvers with the vmlinux symbols only; modules completes it.
    r.run([*mk, f"-j{jobs}", "bzImage"], build, "make bzImage")
    r.run([*mk, f"-j{jobs}", "modules"], build, "make modules")
    release = r.run([*mk, "-s", "kernelrelease"], build, "kernel release", capture=True).strip()
    mods = tmp / "modules"
    r.run([*mk, f"INSTALL_MOD_PATH={mods}", "DEPMOD=/bin/true", "modules_install"], build, "modules_install")
    r.run(["depmod", "-b", str(mods), release], build, "depmod")
    _relink(mods / "lib/modules" / release, Path("../../../../build"))
    return {"release": release, "image": "build/arch/x86/boot/bzImage", "vmlinux": "build/vmlinux",
            "modules_dir": f"modules/lib/modules/{release}", "kdir": "build", "distro_kdir": distro,
            "distro_modules": distro_mods}


def _module_sources(tree: Path, dest: Path, r: Runner) -> None:
    r.run(["rsync", "-a", "--include=*/", "--exclude=*.mod.c", "--include=*.c", "--include=*.h",
           "--include=Makefile", "--include=Kbuild", "--exclude=*", f"{tree}/", f"{dest}/"], dest.parent,
          "copy module sources")


def _build_variant(recipe: Recipe, base: BuiltKernel, tmp: Path, r: Runner) -> dict[str, object]:
    assert recipe.module_dir is not None
    srcroot = tmp / "src"
    moddir = srcroot / recipe.module_dir
    moddir.mkdir(parents=True)
    _module_sources(base.kdir / recipe.module_dir, moddir, r)
    _apply_patches(recipe, srcroot, r)
    # obj-m on the command line overrides the directory's list: only the replaced modules are built
    objs = " ".join(name.removesuffix(".ko") + ".o" for name in recipe.modules)
    r.run(["make", *recipe.make_vars, "-C", str(base.kdir), f"M={moddir}", f"obj-m={objs}", "-j2", "modules"],
          moddir, f"rebuild {', '.join(recipe.modules)}")
    r.run(["rsync", "-a", f"{base.root / 'modules'}/", f"{tmp / 'modules'}/"], tmp, "copy the base's modules")
    mods = tmp / "modules/lib/modules" / base.release
    for name in recipe.modules:
        target = mods / "kernel" / recipe.module_dir / name
        if not target.is_file():
            raise BuildError(f"the base kernel {base.recipe} has no {recipe.module_dir}/{name}")
        shutil.copy2(moddir / name, target)
    r.run(["depmod", "-b", str(tmp / "modules"), base.release], tmp, "depmod")
    _relink(mods, base.kdir)
    return {"release": base.release, "image": str(base.image), "vmlinux": str(base.vmlinux),
            "modules_dir": f"modules/lib/modules/{base.release}", "kdir": str(base.kdir),
            "distro_kdir": str(base.distro_kdir) if base.distro_kdir else None, "base": str(base.root),
            "distro_modules": [str(p) for p in base.distro_modules]}


def build(recipe: Recipe, source: Path, *, cache: Path | None = None, jobs: int = 2,
          nice: int = 10) -> BuiltKernel:
    """Build ``recipe`` from ``source`` unless the cache has it; return the build."""
    if jobs < 1:
        raise BuildError(f"jobs must be at least 1, not {jobs}")
    base = build(get_recipe(recipe.base), source, cache=cache, jobs=jobs, nice=nice) if recipe.base else None
    key = recipe_key(recipe, source)
    root = cache_root(cache) / recipe.name
    final = root / key
    found = _from_meta(final)
    if found is not None:
        return found
    _check_tools()
    say = sayer(f"kernel {recipe.name}")
    with locked(root, key, say):
        found = _from_meta(final)
        if found is not None:
            return found
        tmp = root / f"{key}.tmp"
        if tmp.exists() and base is None and (tmp / _Steps.FILE).is_file():
            say(f"resuming the unfinished build {tmp} (done: {', '.join(sorted(_Steps(tmp).done))})")
        elif tmp.exists():
            say(f"removing the unfinished build {tmp}")
            shutil.rmtree(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.mkdir(parents=True, exist_ok=True)
        log = log_path(recipe, cache)
        with log.open("a") as fh:
            fh.write(f"# nqgen kernel build {recipe.name} key {key} from {source}\n")
        say(f"building {recipe.name} ({key}) from {source} in {tmp}; log {log}")
        r = Runner(log, nice, say)
        start = time.monotonic()
        meta = _build_variant(recipe, base, tmp, r) if base is not None else _build_full(recipe, source, tmp, jobs, r)
        meta.update({"recipe": recipe.name, "key": key, "source": str(source.resolve()),
                     "source_id": src.source_id(source), "patches": ", ".join(p.name for p in recipe.patch_files()),
                     "jobs": str(jobs), "seconds": str(round(time.monotonic() - start))})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tmp.rename(final)
        say(f"built {meta['release']} in {meta['seconds']} s: {final}")
    result = _from_meta(final)
    if result is None:
        raise BuildError(f"the finished build {final} has no {META_FILE}")
    return result
