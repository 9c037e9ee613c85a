"""nqgen.probe: default inputs from host conventions, and the profile of real and fixture kernels."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from elffixtures import build_module, compress, link_vmlinux
from nqgen import elfread, probe, symsources
from nqgen.errors import InputError, NotApplicableError, SymbolError
from nqgen.probe import ProfileInputs, collect_symbol_facts

INT_MAX = 2**31 - 1


def debian_inputs(debian, **extra) -> ProfileInputs:  # type: ignore[no-untyped-def]
    fields = {
        "kdir": debian.kdir,
        "modules": [debian.nf_conntrack],
        "config": debian.config,
        "symvers": debian.kdir / "Module.symvers",
    }
    return ProfileInputs(**{**fields, **extra})


# --- default_inputs ----------------------------------------------------------------------------------------------


def test_default_inputs_for_the_debian_release(debian) -> None:  # type: ignore[no-untyped-def]
    inputs = probe.default_inputs(release=debian.release)
    assert inputs.release == debian.release
    assert inputs.kdir == debian.kdir
    assert inputs.modules == [debian.nf_conntrack]
    assert inputs.config == debian.config
    assert inputs.symvers == debian.kdir / "Module.symvers"
    assert inputs.kallsyms is None  # not the running kernel
    from nqgen.symsources import is_placeholder_system_map

    if is_placeholder_system_map(debian.system_map):
        assert inputs.system_map is None
        assert any("placeholder" in note for note in inputs.notes)
    else:
        assert inputs.system_map == debian.system_map


def test_default_inputs_from_a_headers_tree(debian) -> None:  # type: ignore[no-untyped-def]
    inputs = probe.default_inputs(kdir=debian.kdir)
    assert inputs.release == debian.release
    assert inputs.kdir == debian.kdir
    assert inputs.modules == [debian.nf_conntrack]


def test_default_inputs_for_an_unknown_release_lists_installed_ones(debian) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=rf"release 9\.9\.9-none has no /lib/modules/9\.9\.9-none: pass --kdir "
                                         rf"\(installed releases: .*{debian.release}"):  # fmt: skip
        probe.default_inputs(release="9.9.9-none")


def test_default_inputs_for_a_running_kernel_without_modules(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for rel in ("3.10.0-1160.el7.x86_64", "6.1.0-56-amd64"):
        (tmp_path / rel).mkdir()
    monkeypatch.setattr(probe, "MODULES_ROOT", tmp_path)
    running = os.uname().release
    with pytest.raises(InputError) as info:
        probe.default_inputs()
    assert str(info.value) == (
        f"the running kernel {running} has no {tmp_path / running}: pass --kdir "
        "(installed releases: 3.10.0-1160.el7.x86_64, 6.1.0-56-amd64)"
    )


def test_default_inputs_for_the_running_kernel_use_kallsyms(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    running = os.uname().release
    (tmp_path / running / "kernel/net/netfilter").mkdir(parents=True)
    monkeypatch.setattr(probe, "MODULES_ROOT", tmp_path)
    inputs = probe.default_inputs()
    assert inputs.release == running
    assert inputs.kallsyms == (Path("/proc/kallsyms") if Path("/proc/kallsyms").is_file() else None)
    assert inputs.modules == []
    with pytest.raises(InputError, match=rf"no nf_conntrack module found under .*{running}/kernel: pass --module"):
        collect_symbol_facts(inputs)


def test_old_kernels_have_one_compressed_module_per_family(tmp_path) -> None:  # type: ignore[no-untyped-def]
    kernel = tmp_path / "3.10.0-1160.el7.x86_64" / "kernel"
    v4 = kernel / "net/ipv4/netfilter/nf_conntrack_ipv4.ko.xz"
    v6 = kernel / "net/ipv6/netfilter/nf_conntrack_ipv6.ko.zst"
    for path in (v4, v6):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    assert probe.find_conntrack_modules(tmp_path / "3.10.0-1160.el7.x86_64") == [v4, v6]


# --- Debian 6.1 ----------------------------------------------------------------------------------------------------


def test_debian_symbol_facts(debian) -> None:  # type: ignore[no-untyped-def]
    facts = collect_symbol_facts(debian_inputs(debian))
    v4 = facts.confirm["ipv4"]
    assert (v4.function, v4.module, v4.section) == ("ipv4_confirm", "nf_conntrack", ".text")
    assert (v4.anchor, v4.delta) == ("nf_confirm", 0x120)
    assert (v4.exported, v4.traceable) == (False, True)
    assert v4.ops_array == "ipv4_conntrack_ops"
    assert [(h.hook, h.hook_name, h.priority) for h in v4.hooks if h.hook == "ipv4_confirm"] == [
        ("ipv4_confirm", "POST_ROUTING", INT_MAX),
        ("ipv4_confirm", "LOCAL_IN", INT_MAX),
    ]
    v6 = facts.confirm["ipv6"]
    image = elfread.load_module(debian.nf_conntrack)
    expected = (
        elfread.require_function(image, "ipv6_confirm").value - elfread.require_function(image, "nf_confirm").value
    )
    assert (v6.function, v6.anchor, v6.delta, v6.traceable) == ("ipv6_confirm", "nf_confirm", expected, True)
    assert facts.release == debian.release
    assert facts.module.name == "nf_conntrack"
    assert facts.module.vermagic.split()[0] == debian.release
    assert facts.module.build_id == image.build_id
    assert facts.module.depends == ("nf_defrag_ipv4", "nf_defrag_ipv6", "libcrc32c")
    assert {"nf_confirm", "sprint_symbol", "__nf_conntrack_confirm", "nf_ct_deliver_cached_events"} <= facts.exports
    assert "kallsyms_lookup_name" not in facts.exports
    assert {"ipv4_confirm", "nf_confirm", "ipv4_conntrack_ops"} <= facts.module_symbols
    assert facts.sources == {
        "kdir": str(debian.kdir),
        "module": str(debian.nf_conntrack),
        "module:nf_conntrack": str(debian.nf_conntrack),
        "symvers": str(debian.kdir / "Module.symvers"),
        "config": str(debian.config),
    }
    assert facts.warnings == ()


def test_debian_profile(debian) -> None:  # type: ignore[no-untyped-def]
    profile = probe.build_profile(probe.default_inputs(release=debian.release))
    assert profile.release == debian.release
    assert profile.version[:2] == (6, 1)
    assert profile.kdir == str(debian.kdir)
    assert profile.config.known and profile.config.ftrace_with_regs and not profile.config.x86_ibt
    assert profile.features.nf_confirm_exported
    assert not profile.features.kallsyms_lookup_name_exported
    assert profile.features.confirm_generation == "G2"
    data = json.loads(profile.to_json())
    assert data["confirm"]["ipv4"]["delta"] == 0x120
    assert data["exports"]["count"] == len(profile.exports)
    assert data["sources"]["config"] == str(debian.config)


def test_debian_xz_module(tmp_path, debian) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "nf_conntrack.ko"
    copy.write_bytes(debian.nf_conntrack.read_bytes())
    facts = collect_symbol_facts(debian_inputs(debian, modules=[compress(copy, "xz")]))
    assert facts.module.compression == "xz"
    assert facts.confirm["ipv4"].delta == 0x120


def write_kallsyms(path: Path, delta: int, *, base: int = 0xFFFFFFFFC0A08D70) -> Path:
    path.write_text(
        "ffffffff81000000 T _text\n"
        f"{base:016x} T nf_confirm\t[nf_conntrack]\n"
        f"{base + delta:016x} t ipv4_confirm\t[nf_conntrack]\n"
        f"{base + 0x1E0:016x} t ipv6_confirm\t[nf_conntrack]\n"
    )
    return path


def test_kallsyms_cross_check_agrees(tmp_path, debian) -> None:  # type: ignore[no-untyped-def]
    kallsyms = write_kallsyms(tmp_path / "kallsyms", 0x120)
    facts = collect_symbol_facts(debian_inputs(debian, kallsyms=kallsyms))
    assert facts.sources["kallsyms"] == str(kallsyms)
    assert not [w for w in facts.warnings if "kallsyms" in w and "ipv4_confirm" in w]


def test_kallsyms_cross_check_disagrees(tmp_path, debian) -> None:  # type: ignore[no-untyped-def]
    kallsyms = write_kallsyms(tmp_path / "kallsyms", 0x130)
    facts = collect_symbol_facts(debian_inputs(debian, kallsyms=kallsyms))
    assert f"{kallsyms}: ipv4_confirm - nf_confirm = 0x130 there but 0x120 in the module file" in " ".join(
        facts.warnings
    )


def test_kallsyms_hidden_or_module_not_loaded(tmp_path, debian) -> None:  # type: ignore[no-untyped-def]
    hidden = tmp_path / "hidden"
    hidden.write_text("0000000000000000 T _text\n0000000000000000 t ipv4_confirm\t[nf_conntrack]\n")
    facts = collect_symbol_facts(debian_inputs(debian, kallsyms=hidden))
    assert any("kptr_restrict" in w for w in facts.warnings)
    unloaded = tmp_path / "unloaded"
    unloaded.write_text("ffffffff81000000 T _text\n")
    facts = collect_symbol_facts(debian_inputs(debian, kallsyms=unloaded))
    assert any("module not loaded or not built in" in w for w in facts.warnings)
    facts = collect_symbol_facts(debian_inputs(debian, system_map=unloaded))
    assert facts.warnings == ()  # System.map never lists module symbols: nothing to say


def test_release_mismatch_is_warned(tmp_path, debian) -> None:  # type: ignore[no-untyped-def]
    module = build_module(tmp_path, "nf_conntrack_ipv4_rhel7.c", "nf_conntrack_ipv4.ko")
    facts = collect_symbol_facts(ProfileInputs(kdir=debian.kdir, modules=[module]))
    assert facts.release == "3.10.0-1160.el7.x86_64"
    assert (
        f"headers tree is {debian.release} but nf_conntrack_ipv4's vermagic says 3.10.0-1160.el7.x86_64"
        in facts.warnings
    )


# --- other generations (compiled fixtures) --------------------------------------------------------------------


def test_rhel7_split_modules(tmp_path) -> None:  # type: ignore[no-untyped-def]
    v4 = build_module(tmp_path, "nf_conntrack_ipv4_rhel7.c", "nf_conntrack_ipv4.ko")
    v6 = build_module(tmp_path, "nf_hook_ops_layouts.c", "nf_conntrack_ipv6.ko", ["-DLAYOUT=2"])
    facts = collect_symbol_facts(ProfileInputs(modules=[v4, v6]))
    target = facts.confirm["ipv4"]
    # the POST_ROUTING hook at INT_MAX, not ipv4_helper at 300
    assert (target.function, target.module, target.section) == ("ipv4_confirm", "nf_conntrack_ipv4", ".text")
    image = elfread.load_module(v4)
    confirm = elfread.require_function(image, "ipv4_confirm")
    exported = [s for s in image.symbols if s.kind == "FUNC" and s.name in image.exports]
    nearest = min(exported, key=lambda s: abs(s.value - confirm.value))
    assert (target.anchor, target.delta) == (nearest.name, confirm.value - nearest.value)
    assert len(target.hooks) == 6 and not target.exported and target.traceable
    assert facts.module.name == "nf_conntrack_ipv4"
    assert facts.module.srcversion == "0A1B2C3D4E5F60718293A4B"
    assert facts.module.depends == ("nf_conntrack", "nf_defrag_ipv4")
    assert facts.release == "3.10.0-1160.el7.x86_64"
    assert facts.exports == {"need_ipv4_conntrack", "nf_ct_l3proto_ipv4_hidden_export"}
    v6t = facts.confirm["ipv6"]
    assert (v6t.function, v6t.module, v6t.anchor) == ("ipv6_confirm", "nf_conntrack_ipv6", None)
    assert "ipv6_confirm: no exported function in nf_conntrack_ipv6's .text: no anchor for its address" in (
        facts.warnings
    )
    assert "no Module.symvers: exports are only the conntrack modules' own" in facts.warnings


def test_g3_nf_confirm_is_the_hook(tmp_path) -> None:  # type: ignore[no-untyped-def]
    module = build_module(tmp_path, "nf_conntrack_g3.c", "nf_conntrack.ko")
    facts = collect_symbol_facts(ProfileInputs(modules=[module]))
    for family in ("ipv4", "ipv6"):
        target = facts.confirm[family]
        assert (target.function, target.anchor, target.delta, target.exported) == ("nf_confirm", "nf_confirm", 0, True)
    assert facts.release == "6.6.87"


def test_module_without_confirm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    module = build_module(tmp_path, "int unrelated(int x) { return x; }\n", "nf_conntrack.ko")
    with pytest.raises(SymbolError, match=r"no ipv4_confirm or nf_confirm function in nf_conntrack\.ko"):
        collect_symbol_facts(ProfileInputs(modules=[module]))


def test_no_modules_at_all() -> None:
    with pytest.raises(InputError, match="no nf_conntrack module found: pass --module"):
        collect_symbol_facts(ProfileInputs())


def test_a_module_that_is_not_elf(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bogus = tmp_path / "nf_conntrack.ko"
    bogus.write_text("nope")
    with pytest.raises(InputError, match=r"nf_conntrack\.ko: not an ELF file"):
        collect_symbol_facts(ProfileInputs(modules=[bogus]))


def test_release_with_headers_only(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "6.1.0-56-rt-amd64" / "build").mkdir(parents=True)
    monkeypatch.setattr(probe, "MODULES_ROOT", tmp_path)
    inputs = probe.default_inputs(release="6.1.0-56-rt-amd64")
    assert inputs.kdir == tmp_path / "6.1.0-56-rt-amd64" / "build"
    with pytest.raises(InputError, match=r"only headers are installed for 6\.1\.0-56-rt-amd64; install"):
        collect_symbol_facts(inputs)


# --- the reference kernel built from Debian's source (make repro-kernel) ----------------------------------------


def nm_values(path: Path) -> dict[str, int]:
    out = subprocess.run(["nm", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    values: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            values.setdefault(parts[2], int(parts[0], 16))
    return values


@pytest.mark.repro
def test_reference_kernel_profile() -> None:
    from nqgen import reprokernel

    built = reprokernel.find_built()
    if built is None:
        pytest.skip("the reference kernel is not built (make repro-kernel)")
    system_map = built.kdir / "System.map"
    inputs = ProfileInputs(
        kdir=built.kdir,
        modules=probe.find_conntrack_modules(built.modules_dir),
        vmlinux=built.vmlinux,
        system_map=system_map,
        config=built.kdir / ".config",
        symvers=built.kdir / "Module.symvers",
    )
    facts = collect_symbol_facts(inputs)
    assert facts.release == built.release
    nm = nm_values(Path(facts.module.path))
    target = facts.confirm["ipv4"]
    assert (target.function, target.anchor) == ("ipv4_confirm", "nf_confirm")
    assert target.delta == nm["ipv4_confirm"] - nm["nf_confirm"]
    assert target.traceable
    assert "kallsyms_lookup_name" not in facts.exports
    assert facts.warnings == ()  # vmlinux and System.map agree
    # the built vmlinux has its symbol table: addresses agree with System.map, ftrace sites with notrace files
    vmlinux = elfread.load_vmlinux(built.vmlinux)
    listing = symsources.parse_symbol_list(system_map)
    for name in ("nf_hook_slow", "sprint_symbol", "native_sched_clock"):
        (entry,) = listing.lookup(name)
        (sym,) = [s for s in vmlinux.find(name) if s.kind == "FUNC"]
        assert sym.value == entry.address
    assert vmlinux.is_traceable(elfread.require_function(vmlinux, "nf_hook_slow"))
    assert not vmlinux.is_traceable(elfread.require_function(vmlinux, "native_sched_clock"))  # tsc.c: no -pg
    symvers = symsources.parse_symvers(built.kdir / "Module.symvers")
    assert vmlinux.exports == {name for name, e in symvers.items() if e.module == "vmlinux"}


def test_builtin_conntrack_is_not_applicable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "config"
    config.write_text("CONFIG_MODULES=y\nCONFIG_NF_CONNTRACK=y\n")
    with pytest.raises(NotApplicableError, match="CONFIG_NF_CONNTRACK=y: conntrack is built into the kernel"):
        collect_symbol_facts(ProfileInputs(config=config))


def nm_system_map(vmlinux: Path, out: Path, slide: int = 0) -> Path:
    """A System.map the way the kernel's scripts/mksysmap makes one (nm -n), optionally shifted."""
    text = subprocess.run(["nm", "-n", str(vmlinux)], capture_output=True, text=True, check=True).stdout
    lines = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            lines.append(f"{int(parts[0], 16) + slide:016x} {parts[1]} {parts[2]}")
    out.write_text("\n".join(lines) + "\n")
    return out


def test_vmlinux_against_system_map_and_kallsyms(tmp_path) -> None:  # type: ignore[no-untyped-def]
    v4 = build_module(tmp_path, "nf_conntrack_ipv4_rhel7.c", "nf_conntrack_ipv4.ko")
    vmlinux_path = link_vmlinux(tmp_path, [build_module(tmp_path, "nf_conntrack_g3.c", "g3.o")])
    vmlinux = elfread.load_vmlinux(vmlinux_path)
    same = symsources.parse_symbol_list(nm_system_map(vmlinux_path, tmp_path / "System.map"))
    slid = symsources.parse_symbol_list(nm_system_map(vmlinux_path, tmp_path / "kallsyms", slide=0x2000000))
    assert probe.vmlinux_check(same, vmlinux, slide_allowed=False) == []
    assert probe.vmlinux_check(slid, vmlinux, slide_allowed=True) == []
    (warning,) = probe.vmlinux_check(slid, vmlinux, slide_allowed=False)
    assert "disagree on" in warning and "different builds" in warning
    facts = collect_symbol_facts(ProfileInputs(modules=[v4], vmlinux=vmlinux_path, system_map=tmp_path / "System.map"))
    assert facts.sources["vmlinux"] == str(vmlinux_path)
    assert "nf_confirm" in facts.exports  # from the vmlinux's __ksymtab
    assert not [w for w in facts.warnings if "different builds" in w]
    facts = collect_symbol_facts(ProfileInputs(modules=[v4], vmlinux=vmlinux_path, system_map=tmp_path / "kallsyms"))
    assert [w for w in facts.warnings if "different builds" in w]


def test_modules_from_different_builds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    v4 = build_module(tmp_path, "nf_conntrack_ipv4_rhel7.c", "nf_conntrack_ipv4.ko")
    v6 = build_module(tmp_path, "nf_hook_ops_layouts.c", "nf_conntrack_ipv6.ko", ["-DLAYOUT=2"])
    facts = collect_symbol_facts(ProfileInputs(modules=[v4, v6]))
    assert any(
        w.startswith("the conntrack modules come from different builds: nf_conntrack_ipv4:") for w in facts.warnings
    )


def test_default_inputs_from_a_kernel_build_tree(tmp_path, debian) -> None:  # type: ignore[no-untyped-def]
    """A build tree (not installed in /lib/modules) holds its modules, System.map and vmlinux itself."""
    kdir = tmp_path / "linux"
    (kdir / "include/generated").mkdir(parents=True)
    (kdir / "include/generated/utsrelease.h").write_text('#define UTS_RELEASE "6.1.192-nqgen-test"\n')
    (kdir / "net/netfilter").mkdir(parents=True)
    module = kdir / "net/netfilter/nf_conntrack.ko"
    module.write_bytes(debian.nf_conntrack.read_bytes())
    for name in ("System.map", "vmlinux", ".config", "Module.symvers"):
        (kdir / name).write_text("")
    inputs = probe.default_inputs(kdir=kdir)
    assert inputs.release == "6.1.192-nqgen-test"
    assert inputs.modules == [module]
    assert (inputs.system_map, inputs.vmlinux) == (kdir / "System.map", kdir / "vmlinux")
    assert (inputs.config, inputs.symvers) == (kdir / ".config", kdir / "Module.symvers")
