"""The vulnerable reference kernel: Debian's linux-source-6.1 with the conntrack re-fetch fix reverted.

``ensure_built()`` builds it once (``make defconfig`` + ``repro/config.fragment``, the patches of
``PATCH_FILES``) into a cache outside the repository and returns where everything is; ``find_built()`` only
looks. The cache directory is ``$NQGEN_CACHE/repro-kernel/<key>/`` (``/var/cache/nqgen/repro-kernel/<key>/``
by default), where the key hashes the source package version, the patch texts and the fragment text. A build runs in
``<key>.tmp`` and is renamed to ``<key>`` only when complete, so an interrupted build is never taken as done.

Command line (``make repro-kernel``): ``python3 -m nqgen.reprokernel [--jobs N] [--print] [--check]``. The same
kernel is the ``debian61-repro`` recipe of ``nqgen.kernels`` (``nqgen kernel build debian61-repro``); its key and
cache directory stay the ones defined here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from .errors import BuildError, InputError
from .kernels.kconfig import merge_config, missing_options, parse_config
from .kernels.runner import Runner, locked, sayer

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
REPRO_DIR = Path(__file__).resolve().parents[2] / "repro"
PATCH_FILE = REPRO_DIR / "revert-refetch.patch"  # the point of the kernel: the fix reverted
# Applied in this order. (Booting this KASAN kernel's ELF vmlinux through PVH does not work: the PVH entry's
# C code runs before KASAN's shadow exists; un-instrumenting arch/x86/platform/pvh/ is not enough, it still
# faults in the instrumented memcmp() of xen_cpuid_base(). Boot the bzImage.)
PATCH_FILES = (PATCH_FILE,)
FRAGMENT_FILE = REPRO_DIR / "config.fragment"
DEFAULT_CACHE = Path("/var/cache/nqgen")
CACHE_ENV = "NQGEN_CACHE"
META_FILE = "reprokernel.json"
LOG_FILE = "build.log"
# Bump when the build recipe below changes in a way that changes the result.
RECIPE = "1"
# Debian packages the build needs (besides linux-source-6.1 itself).
BUILD_PACKAGES = ("linux-source-6.1", "build-essential", "bc", "bison", "flex", "libelf-dev", "libssl-dev",
                  "xz-utils", "kmod", "patch")
_TOOLS = {"make": "make", "gcc": "gcc", "patch": "patch", "tar": "tar", "xz": "xz-utils", "bc": "bc",
          "bison": "bison", "flex": "flex", "depmod": "kmod", "perl": "perl"}

__all__ = ["Inputs", "ReproKernel", "ensure_built", "find_built", "load_inputs", "merge_config", "missing_options",
           "parse_config"]


@dataclass(frozen=True)
class ReproKernel:
    """A finished build of the reference kernel."""

    release: str  # `uname -r` of the kernel, e.g. "6.1.192-nqgen-repro"
    image: Path  # bzImage
    vmlinux: Path  # ELF with symbols (its PVH entry does not boot with KASAN: boot the bzImage)
    modules_dir: Path  # <cache>/modules/lib/modules/<release>
    # The whole build tree, usable as KDIR for out-of-tree modules (`make -C kdir M=...`). It was built in
    # <key>.tmp and renamed: tools/objtool's dependency files name the old path, so a plain `make` in it
    # would rebuild objtool and then every object; M= builds do not touch objtool.
    kdir: Path
    key: str
    root: Path  # <cache>: the directory holding all of the above

    def to_json(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Inputs:
    """What a build is made of; the cache key is a hash of these."""

    source_id: str  # "linux-source-6.1 6.1.192-2" or the tarball's name, size and mtime
    tarball: Path
    patches: tuple[tuple[str, str], ...]  # (file name, text), applied in order
    fragment_text: str

    @property
    def key(self) -> str:
        h = hashlib.sha256()
        parts = [RECIPE, self.source_id, *(text for _, text in self.patches), self.fragment_text]
        for part in parts:
            data = part.encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()[:16]


def cache_dir(cache_root: Path | None = None) -> Path:
    """The directory holding one subdirectory per key."""
    if cache_root is not None:
        return cache_root
    env = os.environ.get(CACHE_ENV)
    return (Path(env) if env else DEFAULT_CACHE) / "repro-kernel"


def _dpkg_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    res = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0 or "\t" not in res.stdout:
        return None
    status, version = res.stdout.split("\t", 1)
    return version if status.endswith(" installed") and version else None


def source_id(tarball: Path = SOURCE_TARBALL) -> str:
    """Identify the kernel source: its package version, else the tarball's name, size and mtime."""
    if not tarball.is_file():
        raise InputError(f"kernel source {tarball} is missing: apt-get install {SOURCE_PACKAGE}")
    if tarball == SOURCE_TARBALL:
        version = _dpkg_version(SOURCE_PACKAGE)
        if version is not None:
            return f"{SOURCE_PACKAGE} {version}"
    st = tarball.stat()
    return f"{tarball.name} {st.st_size} {int(st.st_mtime)}"


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def load_inputs(tarball: Path = SOURCE_TARBALL, patches: Sequence[Path] = PATCH_FILES,
                fragment: Path = FRAGMENT_FILE) -> Inputs:
    return Inputs(source_id=source_id(tarball), tarball=tarball,
                  patches=tuple((p.name, _read(p, "kernel patch")) for p in patches),
                  fragment_text=_read(fragment, "config fragment"))


# --- the build -----------------------------------------------------------------------------------------------


_say = sayer("repro-kernel")


def _check_tools() -> None:
    missing = sorted({pkg for tool, pkg in _TOOLS.items()
                      if shutil.which(tool) is None and not Path("/sbin", tool).exists()})
    if missing:
        raise BuildError(f"build tools missing: apt-get install {' '.join(missing)}")


def _from_meta(final: Path) -> ReproKernel | None:
    meta = final / META_FILE
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    release = str(data["release"])
    return ReproKernel(release=release, image=final / "build/arch/x86/boot/bzImage",
                       vmlinux=final / "build/vmlinux", modules_dir=final / "modules/lib/modules" / release,
                       kdir=final / "build", key=final.name, root=final)


def _relink(modules_dir: Path) -> None:
    """modules_install links build/source to the absolute .tmp path: make them relative to the cache dir."""
    for name in ("build", "source"):
        link = modules_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
    (modules_dir / "build").symlink_to(Path("../../../../build"))


def _extract(inputs: Inputs, tmp: Path, r: Runner) -> None:
    r.run(["tar", "-xJf", str(inputs.tarball), "-C", str(tmp)], tmp, "extract source")
    tops = [p for p in tmp.iterdir() if p.is_dir() and p.name.startswith("linux")]
    if len(tops) != 1:
        raise BuildError(f"{inputs.tarball} does not hold exactly one linux* directory")
    tops[0].rename(tmp / "build")
    for name, _ in inputs.patches:
        r.run(["patch", "-p1", "--forward", "--batch"], tmp / "build", f"apply {name}",
              stdin=tmp / "inputs" / name)


def _build(inputs: Inputs, tmp: Path, jobs: int, nice: int) -> str:
    """Build into ``tmp`` (already empty); returns the kernel release."""
    log = tmp / LOG_FILE
    r = Runner(log, nice, _say)
    (tmp / "inputs").mkdir()
    for name, text in inputs.patches:
        (tmp / "inputs" / name).write_text(text)
    (tmp / "inputs/config.fragment").write_text(inputs.fragment_text)

    _extract(inputs, tmp, r)
    src = tmp / "build"
    r.run(["make", "defconfig"], src, "make defconfig")
    config = src / ".config"
    config.write_text(merge_config(config.read_text(), inputs.fragment_text))
    r.run(["make", "olddefconfig"], src, "make olddefconfig")
    bad = missing_options(config.read_text(), inputs.fragment_text)
    if bad:
        raise BuildError(f"Kconfig dropped requested options: {', '.join(bad)}")
    _say("every option of the fragment is set")

    r.run(["make", f"-j{jobs}", "bzImage", "modules"], src, "make bzImage modules")
    release = r.run(["make", "-s", "kernelrelease"], src, "kernel release", capture=True).strip()
    mods = tmp / "modules"
    r.run(["make", f"INSTALL_MOD_PATH={mods}", "DEPMOD=/bin/true", "modules_install"], src, "modules_install")
    r.run(["depmod", "-b", str(mods), release], src, "depmod")
    _relink(mods / "lib/modules" / release)
    return release


def find_built(cache_root: Path | None = None, *, inputs: Inputs | None = None) -> ReproKernel | None:
    """The finished build for the current inputs, or None (also when linux-source-6.1 is not installed)."""
    try:
        inputs = inputs or load_inputs()
    except InputError:
        return None
    return _from_meta(cache_dir(cache_root) / inputs.key)


def ensure_built(cache_root: Path | None = None, jobs: int = 2, *, inputs: Inputs | None = None,
                 nice: int = 10) -> ReproKernel:
    """Return the reference kernel for the current inputs, building it first when it is not in the cache."""
    if jobs < 1:
        raise BuildError(f"jobs must be at least 1, not {jobs}")
    inputs = inputs or load_inputs()
    root = cache_dir(cache_root)
    final = root / inputs.key
    found = _from_meta(final)
    if found is not None:
        return found
    _check_tools()
    with locked(root, inputs.key, _say):
        found = _from_meta(final)  # another process may have finished it while we waited
        if found is not None:
            return found
        tmp = root / f"{inputs.key}.tmp"
        if tmp.exists():
            _say(f"removing the unfinished build {tmp}")
            shutil.rmtree(tmp)
        if final.exists():  # a directory without metadata is not a build
            shutil.rmtree(final)
        tmp.mkdir(parents=True)
        _say(f"building the reference kernel {inputs.key} from {inputs.source_id} in {tmp} (log {tmp / LOG_FILE})")
        start = time.monotonic()
        release = _build(inputs, tmp, jobs, nice)
        meta = {"release": release, "key": inputs.key, "source": inputs.source_id, "recipe": RECIPE,
                "patches": [name for name, _ in inputs.patches],
                "jobs": jobs, "seconds": round(time.monotonic() - start)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tmp.rename(final)
        _say(f"built {release} in {meta['seconds']} s: {final}")
    result = _from_meta(final)
    if result is None:
        raise BuildError(f"the finished build {final} has no {META_FILE}")
    return result


@click.command()
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=2, show_default=True, help="make -j")
@click.option("--print", "print_", is_flag=True, help="print the result as KEY=value lines")
@click.option("--check", is_flag=True, help="do not build; exit 1 when the kernel is not built")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"cache root (default ${CACHE_ENV}/repro-kernel or {DEFAULT_CACHE}/repro-kernel)")
def main(jobs: int, print_: bool, check: bool, cache: Path | None) -> None:
    """Build (once) the vulnerable reference kernel and say where it is."""
    from .errors import NqgenError

    try:
        kernel = find_built(cache) if check else ensure_built(cache, jobs)
    except NqgenError as exc:
        click.echo(f"nqgen.reprokernel: {exc}", err=True)
        sys.exit(exc.exit_code)
    if kernel is None:
        click.echo("nqgen.reprokernel: the reference kernel is not built (make repro-kernel)", err=True)
        sys.exit(1)
    if print_:
        for name, value in kernel.to_json().items():
            click.echo(f"{name.upper()}={value}")
    else:
        click.echo(f"{kernel.release} {kernel.root}")


if __name__ == "__main__":
    main()
