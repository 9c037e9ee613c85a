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
    "livepatch_api": "enable",
    "has_ecache_exist": True,
    "confirm_generation": "G2",
    "confirm_has_vrf_check": True,
    "fix_present": True,
    "kallsyms_lookup_name_exported": False,
    "nf_confirm_exported": True,
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
