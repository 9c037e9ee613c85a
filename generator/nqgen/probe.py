"""Build the KernelProfile of a target kernel from its module files, symbol lists, config and headers.

:func:`default_inputs` fills in the files a user did not name from the host's conventions (/lib/modules,
/boot); :func:`build_profile` reads them all and decides where each family's confirm function lives, how a
generated module can reach it without kallsyms_lookup_name (an exported anchor in the same section plus a delta),
and which hooks the conntrack ops arrays register.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nqgen import disasm, elfread, srcexports, symsources
from nqgen.elfread import ElfImage
from nqgen.errors import ElfFormatError, InputError, NotApplicableError, SymbolError
from nqgen.profile import ConfirmCodeFacts, ConfirmTarget, HookEntry, KernelProfile, ModuleInfo, Symbol

MODULES_ROOT = Path("/lib/modules")
BOOT = Path("/boot")
PROC_KALLSYMS = Path("/proc/kallsyms")
NF_IP_PRI_CONNTRACK_CONFIRM = 2**31 - 1  # INT_MAX
NF_IP_PRI_CONNTRACK_HELPER = 300
NF_INET_POST_ROUTING = 4

# Where conntrack's confirm functions live, relative to /lib/modules/<release>/kernel: 4.19+ has one module,
# 3.10-4.18 (RHEL 7, RHEL 8) one per family.
CONNTRACK_MODULES = (
    "net/netfilter/nf_conntrack.ko",
    "net/ipv4/netfilter/nf_conntrack_ipv4.ko",
    "net/ipv6/netfilter/nf_conntrack_ipv6.ko",
)
COMPRESSED_SUFFIXES = ("", ".xz", ".zst", ".gz")


@dataclass(frozen=True)
class FamilySpec:
    family: str
    functions: tuple[str, ...]  # names the confirm function has had, most specific first
    ops_array: str


FAMILIES = (
    FamilySpec("ipv4", ("ipv4_confirm", "nf_confirm"), "ipv4_conntrack_ops"),
    FamilySpec("ipv6", ("ipv6_confirm", "nf_confirm"), "ipv6_conntrack_ops"),
)
PREFERRED_ANCHOR = "nf_confirm"


@dataclass
class ProfileInputs:
    """Every file the profile is built from; None (or an empty list) means "not given"."""

    kdir: Path | None = None
    modules: list[Path] = field(default_factory=list)
    vmlinux: Path | None = None
    system_map: Path | None = None
    kallsyms: Path | None = None
    config: Path | None = None
    symvers: Path | None = None
    release: str | None = None  # what default_inputs derived the paths from
    notes: list[str] = field(default_factory=list)  # why a conventional file was skipped


def installed_releases(root: Path | None = None) -> list[str]:
    """The releases that have a /lib/modules/<release> directory."""
    try:
        return sorted(p.name for p in (root or MODULES_ROOT).iterdir() if p.is_dir())
    except OSError:
        return []


def find_conntrack_modules(modules_dir: Path, *, subdir: str = "kernel") -> list[Path]:
    """The conntrack module files under ``modules_dir/kernel`` (any compression), in CONNTRACK_MODULES order.

    ``subdir=""`` looks in a kernel build tree instead, where the modules sit beside their sources.
    """
    found = []
    for rel in CONNTRACK_MODULES:
        for suffix in COMPRESSED_SUFFIXES:
            path = modules_dir / subdir / (rel + suffix)
            if path.is_file():
                found.append(path)
                break
    return found


def default_inputs(release: str | None = None, kdir: Path | None = None) -> ProfileInputs:
    """The conventional inputs for ``release`` (from ``kdir``'s tree, else ``uname -r``)."""
    notes: list[str] = []
    kallsyms = None
    if kdir is not None:
        release = release or symsources.kernel_release(kdir)
    elif release is None:
        release = os.uname().release
        _require_modules_dir(release, "the running kernel")
        if PROC_KALLSYMS.is_file():
            kallsyms = PROC_KALLSYMS
    else:
        _require_modules_dir(release, "release")
    mods = MODULES_ROOT / release
    if kdir is None and (mods / "build").is_dir():
        kdir = mods / "build"
    modules = find_conntrack_modules(mods)
    if not modules and kdir is not None:
        modules = find_conntrack_modules(kdir, subdir="")  # a build tree holds its own modules
    system_map = _existing(BOOT / f"System.map-{release}") or (_existing(kdir / "System.map") if kdir else None)
    if system_map is not None and symsources.is_placeholder_system_map(system_map):
        notes.append(f"{system_map} is Debian's placeholder (the real one is in linux-image-*-dbg): not used")
        system_map = None
    config = _existing(BOOT / f"config-{release}")
    if config is None and kdir is not None:
        config = _existing(kdir / ".config")
    symvers = _existing(kdir / "Module.symvers") if kdir is not None else None
    vmlinux = _first_existing(
        Path(f"/usr/lib/debug/boot/vmlinux-{release}"),
        Path(f"/usr/lib/debug/lib/modules/{release}/vmlinux"),
        *([kdir / "vmlinux"] if kdir is not None else []),
    )
    return ProfileInputs(
        kdir=kdir,
        modules=modules,
        vmlinux=vmlinux,
        system_map=system_map,
        kallsyms=kallsyms,
        config=config,
        symvers=symvers,
        release=release,
        notes=notes,
    )


def _require_modules_dir(release: str, what: str) -> None:
    if (MODULES_ROOT / release).is_dir():
        return
    have = installed_releases()
    listed = ", ".join(have) if have else "none"
    raise InputError(f"{what} {release} has no {MODULES_ROOT / release}: pass --kdir (installed releases: {listed})")


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


# --- the profile -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SymbolFacts:
    """Everything build_profile learns from symbols alone (no headers): the profile minus its features."""

    release: str
    module: ModuleInfo
    confirm: dict[str, ConfirmTarget]
    exports: frozenset[str]
    module_symbols: frozenset[str]
    code: ConfirmCodeFacts
    sources: dict[str, str]
    warnings: tuple[str, ...]
    build_ids: dict[str, str]  # module name -> GNU build ID of every module file read that has one


def build_profile(inputs: ProfileInputs) -> KernelProfile:
    """Read every input and decide the target's profile (features come from ``nqgen.headers``)."""
    from nqgen.headers import probe_features

    facts = collect_symbol_facts(inputs)
    config = symsources.config_flags(inputs.config)
    features = probe_features(
        inputs.kdir, exports=facts.exports, module_symbols=facts.module_symbols, config=config, code=facts.code
    )
    warnings = list(facts.warnings)
    if not config.known:
        warnings.append("no kernel .config given: every config flag is unknown and reported as False")
    return KernelProfile(
        release=facts.release,
        version=symsources.release_version(facts.release),
        kdir=str(inputs.kdir) if inputs.kdir is not None else None,
        module=facts.module,
        confirm=facts.confirm,
        exports=facts.exports,
        config=config,
        features=features,
        sources=facts.sources,
        warnings=tuple(warnings),
        build_ids=facts.build_ids,
    )


def collect_symbol_facts(inputs: ProfileInputs) -> SymbolFacts:
    """The symbol side of the profile: confirm targets, anchors, hooks, module info, exports, cross-checks."""
    warnings = list(inputs.notes)
    sources: dict[str, str] = {}
    if inputs.kdir is not None:
        sources["kdir"] = str(inputs.kdir)
    if not inputs.modules:
        _no_modules(inputs)
    images = []
    for path in inputs.modules:
        image = elfread.load_module(Path(path))
        images.append(image)
        sources[f"module:{image.name}"] = str(path)

    confirm: dict[str, ConfirmTarget] = {}
    for spec in FAMILIES:
        found = _find_confirm(images, spec)
        if found is None:
            if spec.family == "ipv4":
                names = ", ".join(Path(i.path).name for i in images)
                raise SymbolError(f"no {' or '.join(spec.functions)} function in {names}")
            warnings.append(f"no {spec.family} confirm function found: {spec.family} stays unprotected")
            continue
        image, sym, hooks = found
        target, note = _confirm_target(image, sym, spec, hooks)
        confirm[spec.family] = target
        warnings.extend(note)
    main = next(i for i in images if i.name == confirm["ipv4"].module)
    sources["module"] = main.path
    code = confirm_code_facts(main, confirm["ipv4"])

    exports: set[str] = set()
    for image in images:
        exports |= image.exports
    if inputs.symvers is not None:
        exports |= set(symsources.parse_symvers(inputs.symvers))
        sources["symvers"] = str(inputs.symvers)
    elif inputs.kdir is not None and inputs.vmlinux is None and srcexports.is_source_tree(inputs.kdir):
        # a tree prepared with modules_prepare only: its sources still declare every export
        exports |= srcexports.scan(inputs.kdir).names
        sources["source_exports"] = str(inputs.kdir)
        warnings.append("no Module.symvers: exports are the conntrack modules' own and the source tree's "
                        "EXPORT_SYMBOL declarations")
    else:
        warnings.append("no Module.symvers: exports are only the conntrack modules' own")
    vmlinux = None
    if inputs.vmlinux is not None:
        vmlinux = elfread.load_vmlinux(inputs.vmlinux)
        exports |= vmlinux.exports
        sources["vmlinux"] = str(inputs.vmlinux)
    if inputs.config is not None:
        sources["config"] = str(inputs.config)

    release, note = _release(main, inputs)
    warnings.extend(note)
    magics = {i.name: (i.info("vermagic") or "").strip() for i in images}
    if len(set(magics.values())) > 1:
        warnings.append("the conntrack modules come from different builds: " + "; ".join(
            f"{name}: {magic!r}" for name, magic in magics.items()))  # fmt: skip
    for kind, list_path in (("system_map", inputs.system_map), ("kallsyms", inputs.kallsyms)):
        if list_path is not None:
            listing = symsources.parse_symbol_list(list_path)
            sources[kind] = str(list_path)
            warnings.extend(cross_check(listing, confirm.values(), lists_modules=kind == "kallsyms"))
            if vmlinux is not None and vmlinux.symbols:
                warnings.extend(vmlinux_check(listing, vmlinux, slide_allowed=kind == "kallsyms"))
    return SymbolFacts(
        release=release,
        module=_module_info(main),
        confirm=confirm,
        exports=frozenset(exports),
        module_symbols=frozenset(s.name for i in images for s in i.symbols if s.section and s.name),
        code=code,
        sources=sources,
        warnings=tuple(warnings),
        build_ids={i.name: i.build_id for i in images if i.build_id},
    )


def confirm_code_facts(image: ElfImage, target: ConfirmTarget) -> ConfirmCodeFacts:
    """The IPv4 confirm's ops array helper hooks and the VRF test in its code (see nqgen.disasm)."""
    where = f"{Path(image.path).name} {target.function}()"
    helpers = None
    if target.ops_array is not None:
        helpers = tuple(
            f"{h.hook}@{h.hook_name}" for h in target.hooks if h.priority == NF_IP_PRI_CONNTRACK_HELPER
        )
    code = image.section_bytes(target.section)[target.offset : target.offset + target.size]
    return ConfirmCodeFacts(
        where=where,
        helper_hooks=helpers,
        vrf_symbol=any(s.kind == "FUNC" for s in image.find("in_vrf_postrouting")),
        l3mdev_bits=tuple(t.bit_positions() for t in disasm.l3mdev_tests(code)),
    )


def _no_modules(inputs: ProfileInputs) -> None:
    """Explain why no conntrack module is there: built into the kernel, headers only, or not found."""
    if inputs.config is not None and symsources.parse_config(inputs.config).get("NF_CONNTRACK") == "y":
        raise NotApplicableError(
            f"{inputs.config}: CONFIG_NF_CONNTRACK=y: conntrack is built into the kernel; nqgen handles a modular "
            "nf_conntrack only"
        )
    where, hint = "", "pass --module"
    if inputs.release:
        where = f" under {MODULES_ROOT / inputs.release}/kernel"
        if not (MODULES_ROOT / inputs.release / "kernel").is_dir():
            hint = f"only headers are installed for {inputs.release}; install its kernel image or pass --module"
    raise InputError(f"no nf_conntrack module found{where}: {hint}")


def _find_confirm(images: list[ElfImage], spec: FamilySpec) -> tuple[ElfImage, Symbol, tuple[HookEntry, ...]] | None:
    """The confirm function of a family: the ops array's POST_ROUTING hook at INT_MAX, else by name."""
    for image in images:
        if not any(s.kind == "OBJECT" for s in image.find(spec.ops_array)):
            continue
        hooks = elfread.decode_ops_array(image, spec.ops_array)
        confirms = [h for h in hooks if h.hooknum == NF_INET_POST_ROUTING and h.priority == NF_IP_PRI_CONNTRACK_CONFIRM]
        if confirms:
            return image, elfread.require_function(image, confirms[0].hook), hooks
    name = spec.functions[0]  # without an ops array, only the family's own name is safe (G2 has nf_confirm too)
    for image in images:
        if any(s.kind == "FUNC" for s in image.find(name)):
            return image, elfread.require_function(image, name), ()
    return None


def _confirm_target(
    image: ElfImage, sym: Symbol, spec: FamilySpec, hooks: tuple[HookEntry, ...]
) -> tuple[ConfirmTarget, list[str]]:
    notes: list[str] = []
    anchor = choose_anchor(image, sym)
    if anchor is None:
        notes.append(f"{sym.name}: no exported function in {image.name}'s {sym.section}: no anchor for its address")
    if not hooks:
        notes.append(f"{sym.name}: no {spec.ops_array} array in {image.name}: its hooks are unknown")
    if not image.traceable_sites:
        notes.append(f"{image.name} has no __mcount_loc/__patchable_function_entries: nothing is traceable")
    target = ConfirmTarget(
        family=spec.family,
        function=sym.name,
        module=image.name,
        section=sym.section,
        offset=sym.value,
        size=sym.size,
        exported=sym.name in image.exports,
        traceable=image.is_traceable(sym),
        anchor=anchor.name if anchor else None,
        anchor_offset=anchor.value if anchor else None,
        ops_array=spec.ops_array if hooks else None,
        hooks=hooks,
    )
    return target, notes


def choose_anchor(image: ElfImage, sym: Symbol) -> Symbol | None:
    """An exported function in the same section as ``sym``: nf_confirm when there, else the nearest one."""
    candidates = [
        s
        for s in image.symbols
        if s.kind == "FUNC" and s.section == sym.section and s.name in image.exports and s.binding != "LOCAL"
    ]
    preferred = [s for s in candidates if s.name == PREFERRED_ANCHOR]
    if preferred:
        return preferred[0]
    if not candidates:
        return None
    return min(candidates, key=lambda s: (abs(s.value - sym.value), s.name))


def _module_info(image: ElfImage) -> ModuleInfo:
    vermagic = image.info("vermagic")
    if vermagic is None:
        raise ElfFormatError(f"{image.path}: no vermagic in .modinfo: not a kernel module")
    depends = image.info("depends") or ""
    return ModuleInfo(
        path=image.path,
        name=image.name,
        vermagic=vermagic,
        srcversion=image.info("srcversion"),
        build_id=image.build_id,
        depends=tuple(d for d in depends.split(",") if d),
        compression=image.compression,
    )


def _release(image: ElfImage, inputs: ProfileInputs) -> tuple[str, list[str]]:
    """The module's vermagic release; a headers tree or a requested release that disagrees is warned about."""
    vermagic = image.info("vermagic")
    mod_release = vermagic.split()[0] if vermagic else None
    notes: list[str] = []
    others = {}
    if inputs.kdir is not None:
        others["headers tree"] = symsources.kernel_release(inputs.kdir)
    if inputs.release is not None:
        others["requested release"] = inputs.release
    if mod_release is None:
        if not others:
            raise InputError(f"{image.path}: no vermagic and no headers tree: the kernel release is unknown")
        return next(iter(others.values())), notes
    for what, rel in others.items():
        if rel != mod_release:
            notes.append(f"{what} is {rel} but {image.name}'s vermagic says {mod_release}")
    return mod_release, notes


def cross_check(
    listing: symsources.SymbolList, targets: Iterable[ConfirmTarget], *, lists_modules: bool = True
) -> list[str]:
    """Compare each target's file delta with the addresses in a System.map/kallsyms listing.

    System.map (``lists_modules=False``) holds vmlinux symbols only: module targets are skipped silently.
    """
    notes: list[str] = []
    if listing.addresses_hidden:
        return [f"{listing.path}: every address is 0 (kptr_restrict): cross-check skipped"]
    checked = [t for t in targets if (lists_modules or t.module == "vmlinux") and t.anchor is not None
               and t.delta is not None]  # fmt: skip
    found = listing.lookup_many(n for t in checked for n in (t.function, t.anchor) if n is not None)
    for target in checked:
        assert target.anchor is not None and target.delta is not None
        want = None if target.module == "vmlinux" else target.module
        fn = tuple(e for e in found[target.function] if e.module == want)
        anchor = tuple(e for e in found[target.anchor] if e.module == want)
        if not fn or not anchor:
            notes.append(
                f"{listing.path}: no {target.module} {target.function}/{target.anchor} "
                "(module not loaded or not built in): cross-check skipped"
            )
            continue
        if len(fn) > 1 or len(anchor) > 1:
            notes.append(f"{listing.path}: {target.function} or {target.anchor} is ambiguous: cross-check skipped")
            continue
        seen = fn[0].address - anchor[0].address
        if seen != target.delta:
            notes.append(
                f"{listing.path}: {target.function} - {target.anchor} = {seen:#x} there but {target.delta:#x} "
                f"in the module file: the file is not the one that is loaded"
            )
    return notes


VMLINUX_SAMPLE = 64  # functions compared between a vmlinux and a System.map/kallsyms listing


def vmlinux_check(listing: symsources.SymbolList, vmlinux: ElfImage, *, slide_allowed: bool) -> list[str]:
    """Warn when a symbol listing and a vmlinux come from different builds.

    System.map must give the vmlinux addresses exactly; kallsyms of a running kernel may add one KASLR slide.
    """
    if listing.addresses_hidden:
        return []
    ours: dict[str, list[int]] = {}
    for sym in vmlinux.symbols:
        if sym.kind == "FUNC" and sym.binding == "GLOBAL":
            ours.setdefault(sym.name, []).append(sym.value)
    theirs: dict[str, list[int]] = {}
    for entry in listing.entries:
        if entry.module is None and entry.type == "T":
            theirs.setdefault(entry.name, []).append(entry.address)
    common = sorted(n for n in ours.keys() & theirs.keys() if len(ours[n]) == 1 and len(theirs[n]) == 1)
    sample = common[:: max(1, len(common) // VMLINUX_SAMPLE)][:VMLINUX_SAMPLE]
    if not sample:
        return [f"{listing.path} and {vmlinux.path} share no global function: cross-check skipped"]
    slides = {theirs[n][0] - ours[n][0] for n in sample}
    if slides == {0} or (slide_allowed and len(slides) == 1):
        return []
    return [f"{listing.path} and {vmlinux.path} disagree on {len(sample)} function addresses: different builds"]


__all__ = [
    "ProfileInputs",
    "SymbolFacts",
    "build_profile",
    "choose_anchor",
    "collect_symbol_facts",
    "confirm_code_facts",
    "cross_check",
    "default_inputs",
    "find_conntrack_modules",
    "installed_releases",
    "vmlinux_check",
]
