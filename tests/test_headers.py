"""nqgen.headers: API generation facts from a target's headers, per kernel generation.

The fixture trees under tests/fixtures/headers/<generation>/ hold the relevant declarations of each
kernel, copied in substance from that kernel's source (each file names its source at the top). The
real Debian 6.1 headers (and their -rt / -cloud flavours when installed) are probed as they are.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from conftest import DebianKernel
from nqgen import errors, headers
from nqgen.profile import ConfigFlags, KernelFeatures

FIXTURES = Path(__file__).parent / "fixtures" / "headers"


def config_flags(livepatch: bool = True, with_args: bool = True, known: bool = True) -> ConfigFlags:
    return ConfigFlags(
        ftrace_with_regs=True,
        ftrace_with_args=with_args,
        kprobes=True,
        livepatch=livepatch,
        ct_events=True,
        ct_procfs=True,
        modules=True,
        module_sig_force=False,
        x86_ibt=False,
        cfi_clang=False,
        kasan=False,
        known=known,
    )


def symvers_exports(path: Path) -> frozenset[str]:
    names = set()
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            names.add(fields[1])
    return frozenset(names)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("NQGEN_NO_CACHE", raising=False)


def probe(kdir: Path, module_symbols: frozenset[str] = frozenset(), **cfg: bool) -> KernelFeatures:
    exports = symvers_exports(kdir / "Module.symvers") if (kdir / "Module.symvers").exists() else frozenset()
    return headers.probe_features(kdir, exports=exports, module_symbols=module_symbols, config=config_flags(**cfg))


# ---------------------------------------------------------------------------------------------
# The real Debian 6.1 headers


DEBIAN_61 = {
    "hookfn_form": "priv_state",
    "registration": "pernet",
    "ops_has_owner": False,
    "skb_nfct_accessor": True,
    "skb_nfct_field": "_nfct",
    "has_nf_ct_is_untracked": False,
    "hook_storage": "entries",
    "nf_stop_honoured": False,
    "ftrace_regs_form": "ftrace_regs",
    "ftrace_set_ip": "ftrace_instruction_pointer_set",
    "ftrace_recursion_flag": "RECURSION",
    "ftrace_permanent": True,
    "livepatch_api": "enable",
    "has_ecache_exist": True,
    "confirm_generation": "G2",
    "confirm_has_vrf_check": True,
    "fix_present": True,
    "kallsyms_lookup_name_exported": False,
    "nf_confirm_exported": True,
    "nat_on_confirmed": "skipped",
}


def check(features: KernelFeatures, expected: dict[str, object]) -> None:
    got = {k: v for k, v in dataclasses.asdict(features).items() if k != "evidence"}
    wrong = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert not wrong, f"(got, expected): {wrong}\n" + "\n".join(features.evidence)
    assert set(expected) == set(got), "table must cover every feature"


def test_debian_61_real_headers(debian: DebianKernel) -> None:
    features = probe(debian.kdir, frozenset({"ipv4_confirm", "nf_confirm", "ipv6_confirm"}))
    check(features, DEBIAN_61)
    # One evidence line per decision, each naming what it was decided from.
    assert len(features.evidence) == len(DEBIAN_61)
    by_name = {line.split("=", 1)[0]: line for line in features.evidence}
    assert "typedef nf_hookfn(void *priv" in by_name["hookfn_form"]
    assert "linux-headers-" in by_name["hookfn_form"]  # found through the build dir's Makefile include
    assert "skb_nfct(skb)" in by_name["fix_present"]
    assert "guessed" not in "\n".join(features.evidence)


@pytest.mark.parametrize("flavour", ["rt-amd64", "cloud-amd64"])
def test_debian_61_flavours(debian: DebianKernel, flavour: str) -> None:
    kdir = Path(f"/usr/src/linux-headers-{debian.release.rsplit('-', 1)[0]}-{flavour}")
    if not (kdir / "Makefile").exists():
        pytest.skip(f"linux-headers-{flavour} is not installed (make deps installs it)")
    config = (kdir / ".config").read_text()
    livepatch = "\nCONFIG_LIVEPATCH=y\n" in config
    with_args = "\nCONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS=y\n" in config
    expected = dict(DEBIAN_61, livepatch_api="enable" if livepatch else "none")
    check(probe(kdir, frozenset({"ipv4_confirm", "nf_confirm"}), livepatch=livepatch, with_args=with_args), expected)


# ---------------------------------------------------------------------------------------------
# One minimal header tree per generation, checked against kernel-compat.md's matrix

# Upstream 4.19 (G1, pre-fix): the reference row; every other generation lists what differs from it.
UPSTREAM_419: dict[str, object] = {
    "hookfn_form": "priv_state",
    "registration": "pernet",
    "ops_has_owner": False,
    "skb_nfct_accessor": True,
    "skb_nfct_field": "_nfct",
    "has_nf_ct_is_untracked": False,
    "hook_storage": "entries",
    "nf_stop_honoured": False,
    "ftrace_regs_form": "pt_regs",
    "ftrace_set_ip": "regs_ip",
    "ftrace_recursion_flag": "RECURSION_SAFE",
    "ftrace_permanent": False,
    "livepatch_api": "register_enable",
    "has_ecache_exist": False,
    "confirm_generation": "G1",
    "confirm_has_vrf_check": False,
    "fix_present": False,
    "kallsyms_lookup_name_exported": True,
    "nf_confirm_exported": False,
    "nat_on_confirmed": "skipped",
}
RHEL7 = {
    **UPSTREAM_419,
    "hookfn_form": "ops_state",
    "registration": "global",
    "ops_has_owner": True,
    "skb_nfct_field": "nfct",
    "has_nf_ct_is_untracked": True,
    "hook_storage": "list",
    "nf_stop_honoured": True,
    "livepatch_api": "enable",
    "nat_on_confirmed": "rewrites_reply",
}
G2 = {"livepatch_api": "enable", "confirm_generation": "G2", "nf_confirm_exported": True}
FTRACE_REGS = {"ftrace_regs_form": "ftrace_regs", "ftrace_recursion_flag": "RECURSION"}
FIXED_6X = {"has_ecache_exist": True, "confirm_has_vrf_check": True, "fix_present": True}
UPSTREAM_515 = {
    **UPSTREAM_419, **G2, **FTRACE_REGS, "ftrace_set_ip": "ftrace_instruction_pointer_set",
    "kallsyms_lookup_name_exported": False, "ftrace_permanent": True,
}  # fmt: skip
G3_6X = {
    **UPSTREAM_515, **FIXED_6X, "confirm_generation": "G3", "ftrace_set_ip": "ftrace_regs_set_instruction_pointer",
}  # fmt: skip
GENERATIONS: dict[str, dict[str, object]] = {
    "rhel7-early": {**RHEL7, "hookfn_form": "okfn", "skb_nfct_accessor": False, "livepatch_api": "none"},
    "rhel7.9": RHEL7,
    "rhel8.3": {**UPSTREAM_419, "livepatch_api": "enable", "ftrace_permanent": True},
    "4.19": UPSTREAM_419,
    "5.4": {**UPSTREAM_419, **G2},
    "5.10": {**UPSTREAM_419, **G2, "kallsyms_lookup_name_exported": False, "ftrace_permanent": True},
    "5.15": UPSTREAM_515,
    "6.1-src": {**UPSTREAM_515, **FIXED_6X},
    "6.6": G3_6X,
    "6.12": G3_6X,
}
MODULE_SYMBOLS = {
    "G1": frozenset({"ipv4_confirm", "ipv4_helper"}),
    "G2": frozenset({"ipv4_confirm", "nf_confirm"}),
    "G3": frozenset({"nf_confirm"}),
}


def fixture_config(kdir: Path) -> ConfigFlags:
    text = (kdir / ".config").read_text()
    livepatch = "\nCONFIG_LIVEPATCH=y\n" in text
    return config_flags(livepatch=livepatch, with_args="CONFIG_DYNAMIC_FTRACE_WITH_ARGS=y" in text)


@pytest.mark.parametrize("generation", sorted(GENERATIONS))
def test_generation_fixture(generation: str) -> None:
    kdir = FIXTURES / generation
    expected = GENERATIONS[generation]
    features = headers.probe_features(
        kdir,
        exports=symvers_exports(kdir / "Module.symvers"),
        module_symbols=MODULE_SYMBOLS[str(expected["confirm_generation"])],
        config=fixture_config(kdir),
    )
    check(features, expected)
    assert len(features.evidence) == len(UPSTREAM_419)
    assert not any("DISAGREES" in line or "guessed" in line for line in features.evidence)


SOURCE_MARKERS = ("@", "kernel-compat.md", "Debian", "upstream v", "search index")


def test_every_fixture_file_names_its_source() -> None:
    for path in FIXTURES.rglob("*.[hc]"):
        if "generated" in path.parts:
            continue  # one-line utsrelease.h, as the kernel build writes it
        head = path.read_text()[:600]
        assert head.startswith("/*") and any(m in head for m in SOURCE_MARKERS), path


def test_rhel7_genksyms_branch_is_the_one_compiled() -> None:
    features = probe(FIXTURES / "rhel7.9")
    line = next(e for e in features.evidence if e.startswith("hookfn_form="))
    assert "const struct nf_hook_state *state)" in line and "(*okfn)" not in line


def test_source_tree_decides_nf_stop_and_vrf_from_code() -> None:
    features = probe(FIXTURES / "6.1-src", MODULE_SYMBOLS["G2"])
    by_name = {line.split("=", 1)[0]: line for line in features.evidence}
    assert "net/netfilter/core.c nf_hook_slow() does not handle NF_STOP" in by_name["nf_stop_honoured"]
    assert "nf_conntrack_proto.c ipv4_confirm() tests netif_is_l3_master" in by_name["confirm_has_vrf_check"]
    rhel7 = probe(FIXTURES / "rhel7-early", MODULE_SYMBOLS["G1"])
    assert rhel7.nf_stop_honoured
    assert any("nf_hook_slow() handles NF_STOP" in line for line in rhel7.evidence)


def test_stable_backport_of_the_fix_is_detected(tmp_path: Path) -> None:
    """5.15.45 and the other stable lines re-fetch ct but keep `likely(ret == NF_ACCEPT)` (no ecache test)."""
    kdir = _copy_tree("5.15", tmp_path / "kdir")
    core = kdir / "include/net/netfilter/nf_conntrack_core.h"
    text = core.read_text()
    old = "\t\tif (!nf_ct_is_confirmed(ct))\n\t\t\tret = __nf_conntrack_confirm(skb);\n"
    assert old in text
    core.write_text(
        text.replace(
            old,
            "\t\tif (!nf_ct_is_confirmed(ct)) {\n\t\t\tret = __nf_conntrack_confirm(skb);\n\n"
            "\t\t\tif (ret == NF_ACCEPT)\n\t\t\t\tct = (struct nf_conn *)skb_nfct(skb);\n\t\t}\n",
        )
    )
    assert probe(kdir, MODULE_SYMBOLS["G2"]).fix_present
    assert not probe(FIXTURES / "5.15", MODULE_SYMBOLS["G2"]).fix_present


@pytest.mark.parametrize("generation", ["5.15", "6.6"])
def test_set_ip_falls_back_to_regs_without_ftrace_with_args(tmp_path: Path, generation: str) -> None:
    kdir = _copy_tree(generation, tmp_path / "kdir")
    config = kdir / ".config"
    config.write_text(config.read_text().replace("CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS=y\n", ""))
    features = probe(kdir, MODULE_SYMBOLS["G2"], with_args=False)
    assert (features.ftrace_regs_form, features.ftrace_set_ip) == ("ftrace_regs", "regs_ip")


def test_module_that_disagrees_with_headers_is_flagged() -> None:
    features = probe(FIXTURES / "6.6", MODULE_SYMBOLS["G2"])
    assert features.confirm_generation == "G3"
    assert any("DISAGREES" in line for line in features.evidence)


# ---------------------------------------------------------------------------------------------
# Errors and edge cases


def test_missing_headers_directory_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(errors.InputError, match="does not exist") as info:
        headers.probe_features(
            tmp_path / "nope", exports=frozenset(), module_symbols=frozenset(), config=config_flags()
        )
    assert "\n" not in str(info.value)


def test_directory_without_netfilter_h_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "include" / "linux").mkdir(parents=True)
    with pytest.raises(errors.InputError, match=r"no include/linux/netfilter\.h"):
        headers.probe_features(tmp_path, exports=frozenset(), module_symbols=frozenset(), config=config_flags())


def test_tree_without_conntrack_core_header_is_an_input_error(tmp_path: Path) -> None:
    kdir = _copy_tree("5.10", tmp_path / "kdir")
    (kdir / "include/net/netfilter/nf_conntrack_core.h").unlink()
    with pytest.raises(errors.InputError, match=r"no include/net/netfilter/nf_conntrack_core\.h") as info:
        probe(kdir)
    assert "\n" not in str(info.value)


def test_unknown_hookfn_typedef_is_an_input_error(tmp_path: Path) -> None:
    kdir = _copy_tree("5.10", tmp_path / "kdir")
    netfilter = kdir / "include/linux/netfilter.h"
    netfilter.write_text(netfilter.read_text().replace("void *priv,", "unsigned long cookie,"))
    with pytest.raises(errors.InputError, match="unrecognised nf_hookfn typedef") as info:
        probe(kdir)
    assert "\n" not in str(info.value)


def test_no_kdir_decides_from_symbols_and_says_guessed() -> None:
    features = headers.probe_features(
        None,
        exports=frozenset({"nf_confirm", "klp_enable_patch", "nf_register_net_hook"}),
        module_symbols=frozenset({"ipv4_confirm", "nf_confirm"}),
        config=config_flags(),
    )
    assert features.confirm_generation == "G2"
    assert features.registration == "pernet"
    assert features.livepatch_api == "enable"
    assert features.nf_confirm_exported
    assert all("guessed" in line for line in features.evidence if not line.startswith(("kallsyms", "nf_confirm_")))


def test_no_kdir_rhel7_exports_give_global_registration() -> None:
    features = headers.probe_features(
        None,
        exports=frozenset({"nf_register_hook", "need_ipv4_conntrack", "kallsyms_lookup_name"}),
        module_symbols=frozenset({"ipv4_confirm"}),
        config=config_flags(),
    )
    assert (features.registration, features.hook_storage, features.confirm_generation) == ("global", "list", "G1")
    assert features.kallsyms_lookup_name_exported
    assert features.ftrace_regs_form == "pt_regs"


def test_strip_comments_and_genksyms() -> None:
    text = (
        "/* typedef int fake(void); */\n"
        "#ifndef __GENKSYMS__\n"
        "int real(int a, // not a param\n"
        "         int b);\n"
        "#else\n"
        "int real(int old);\n"
        "#endif\n"
        "#ifdef __GENKSYMS__\n"
        "int other(int old);\n"
        "#else\n"
        "int other(int new_one);\n"
        "#endif\n"
        "#ifdef CONFIG_X\n"
        "int kept(void);\n"
        "#endif\n"
    )
    clean = headers.clean_source(text)
    assert headers.find_params(clean, r"\bint\s+real") == ["int a", "int b"]
    assert headers.find_params(clean, r"\bint\s+other") == ["int new_one"]
    assert "fake" not in clean
    assert "kept" in clean and "#ifdef CONFIG_X" in clean


def _copy_tree(name: str, dest: Path) -> Path:
    src = FIXTURES / name
    if not src.is_dir():
        pytest.skip(f"fixture tree {name} missing")
    shutil.copytree(src, dest)
    return dest


def test_cache_is_used_and_invalidated_by_header_change(tmp_path: Path) -> None:
    kdir = _copy_tree("5.10", tmp_path / "kdir")
    first = probe(kdir)
    cache_files = list((tmp_path / "cache" / "nqgen").glob("headers-*.json"))
    assert len(cache_files) == 1
    # A tampered cache entry is what a hit returns: proves the cache is read.
    data = cache_files[0].read_text().replace('"hookfn_form": "priv_state"', '"hookfn_form": "okfn"')
    cache_files[0].write_text(data)
    assert probe(kdir).hookfn_form == "okfn"
    # NQGEN_NO_CACHE bypasses it.
    os.environ["NQGEN_NO_CACHE"] = "1"
    try:
        assert probe(kdir).hookfn_form == first.hookfn_form == "priv_state"
    finally:
        del os.environ["NQGEN_NO_CACHE"]
    # Changing a header read (size and mtime) makes a new key.
    core = kdir / "include/net/netfilter/nf_conntrack_core.h"
    core.write_text(core.read_text() + "\n/* touched */\n")
    assert probe(kdir).hookfn_form == "priv_state"
    assert len(list((tmp_path / "cache" / "nqgen").glob("headers-*.json"))) == 2
