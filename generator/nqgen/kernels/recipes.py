"""The kernels nqgen knows how to build: what source, which of our shims, which configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

HERE = Path(__file__).resolve().parent
PATCH_ROOT = HERE / "patches"
CONFIG_ROOT = HERE / "configs"


@dataclass(frozen=True)
class Recipe:
    """How to build one kernel.

    A full recipe copies its source, applies ``patches/<name>/*.patch`` (in name order), builds a distribution-config
    tree when ``distro_config`` is set (``olddefconfig`` + ``modules_prepare``: what a user's kernel-devel holds,
    for generating and verifying modules) and a small kernel for qemu: ``qemu_base`` (a defconfig target, or
    ``"distro-without-modules"``: the distribution config with every ``=m`` off) plus ``configs/<qemu_fragment>``.

    A variant (``base`` set) reuses its base's kernel, build tree and modules and rebuilds only the modules of
    ``module_dir`` with ``patches/<name>/*.patch`` applied, replacing ``modules`` in its own modules tree.
    """

    name: str
    summary: str
    default_source: str | None = None  # where `nqgen kernel build` looks when --source is not given
    distro_config: str | None = None  # path inside the source tree
    qemu_base: str = "defconfig"
    qemu_fragment: str | None = None
    make_vars: tuple[str, ...] = ()
    base: str | None = None
    module_dir: str | None = None
    modules: tuple[str, ...] = field(default_factory=tuple)
    legacy: bool = False  # built by nqgen.reprokernel (its own cache layout and key)
    # Modules built in the distribution-config tree (directory, module name): the conntrack modules nqgen reads,
    # as the distribution config builds them.
    distro_modules: tuple[tuple[str, str], ...] = ()

    def patch_files(self) -> tuple[Path, ...]:
        d = PATCH_ROOT / self.name
        return tuple(sorted(d.glob("*.patch"))) if d.is_dir() else ()

    def fragment_file(self) -> Path | None:
        return CONFIG_ROOT / self.qemu_fragment if self.qemu_fragment else None


SRC_CACHE = "/var/cache/nqgen/src"

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        name="rhel77",
        summary="RHEL 7.7 (3.10.0-1062 family): distribution-config tree + a monolithic qemu kernel, "
                "netfilter as modules",
        default_source=f"{SRC_CACHE}/rhel77",
        distro_config="configs/kernel-3.10.0-x86_64.config",
        qemu_base="distro-without-modules",
        qemu_fragment="rhel77-qemu.fragment",
        distro_modules=(("net/netfilter", "nf_conntrack"), ("net/ipv4/netfilter", "nf_conntrack_ipv4"),
                        ("net/ipv6/netfilter", "nf_conntrack_ipv6")),
    ),
    Recipe(
        name="rhel81",
        summary="RHEL 8.1 (4.18.0-147): x86_64_defconfig + KASAN, conntrack as modules",
        default_source=f"{SRC_CACHE}/rhel81",
        qemu_base="x86_64_defconfig",
        qemu_fragment="rhel81-qemu.fragment",
        make_vars=("DISABLE_WERROR=1",),
    ),
    Recipe(
        name="rhel81-kasan-free",
        summary="rhel81 with nf_conntrack.ko freeing the extension area at once (as upstream 2ad9d7747c10), "
                "so KASAN sees the stale use",
        default_source=f"{SRC_CACHE}/rhel81",
        base="rhel81",
        module_dir="net/netfilter",
        modules=("nf_conntrack.ko",),
        make_vars=("DISABLE_WERROR=1",),
    ),
    Recipe(
        name="debian61-repro",
        summary="Debian linux-source-6.1 with the re-fetch fix reverted, KASAN (make repro-kernel)",
        legacy=True,
    ),
)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UsageError(f"unknown kernel recipe {name!r} (known: {', '.join(RECIPES)})") from None
