"""nqgen.symsources: System.map/kallsyms, Module.symvers, .config and release parsing on real and written files."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from nqgen import symsources
from nqgen.errors import InputError
from nqgen.profile import ConfigFlags

# --- Module.symvers ------------------------------------------------------------------------------------------


def test_debian_symvers(debian) -> None:  # type: ignore[no-untyped-def]
    path = debian.kdir / "Module.symvers"
    entries = symsources.parse_symvers(path)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    assert len(entries) == len(lines)
    confirm = entries["nf_confirm"]
    assert (confirm.module, confirm.export_type, confirm.namespace) == (
        "net/netfilter/nf_conntrack",
        "EXPORT_SYMBOL_GPL",
        "",
    )
    assert entries["sprint_symbol"].module == "vmlinux"
    assert "kallsyms_lookup_name" not in entries
    for name in ("sprint_symbol", "register_ftrace_function", "ftrace_set_filter_ip", "klp_enable_patch"):
        assert name in entries


def test_symvers_gzipped(tmp_path, debian) -> None:  # type: ignore[no-untyped-def]
    packed = tmp_path / "Module.symvers.gz"
    packed.write_bytes(gzip.compress((debian.kdir / "Module.symvers").read_bytes()))
    assert symsources.parse_symvers(packed) == symsources.parse_symvers(debian.kdir / "Module.symvers")


@pytest.mark.parametrize(
    ("line", "module", "export", "namespace"),
    [
        ("0x1234abcd\tnf_confirm\tnet/netfilter/nf_conntrack", "net/netfilter/nf_conntrack", "", ""),
        ("0x1234abcd nf_confirm net/netfilter/nf_conntrack", "net/netfilter/nf_conntrack", "", ""),
        ("0x1234abcd\tnf_confirm\tnet/netfilter/nf_conntrack\tEXPORT_SYMBOL_GPL", "net/netfilter/nf_conntrack",
         "EXPORT_SYMBOL_GPL", ""),
        ("0x1234abcd\tnf_confirm\tNF_NS\tnet/netfilter/nf_conntrack\tEXPORT_SYMBOL_GPL",
         "net/netfilter/nf_conntrack", "EXPORT_SYMBOL_GPL", "NF_NS"),
        ("0x1234abcd\tnf_confirm\t\tnet/netfilter/nf_conntrack\tEXPORT_SYMBOL_GPL", "net/netfilter/nf_conntrack",
         "EXPORT_SYMBOL_GPL", ""),
        ("0x1234abcd\tnf_confirm\tnet/netfilter/nf_conntrack\tEXPORT_SYMBOL_GPL\tNF_NS",
         "net/netfilter/nf_conntrack", "EXPORT_SYMBOL_GPL", "NF_NS"),
        ("0x1234abcd\tnf_confirm\tnet/netfilter/nf_conntrack\tEXPORT_SYMBOL_GPL\t", "net/netfilter/nf_conntrack",
         "EXPORT_SYMBOL_GPL", ""),
    ],
)  # fmt: skip
def test_symvers_layouts(tmp_path, line, module, export, namespace) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "Module.symvers"
    path.write_text(line + "\n")
    entry = symsources.parse_symvers(path)["nf_confirm"]
    assert (entry.crc, entry.module, entry.export_type, entry.namespace) == (0x1234ABCD, module, export, namespace)


def test_symvers_duplicate_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "Module.symvers"
    path.write_text(
        "0x1\tnf_confirm\tnet/netfilter/nf_conntrack\tEXPORT_SYMBOL_GPL\t\n"
        "0x2\tnf_confirm\textra/other\tEXPORT_SYMBOL_GPL\t\n"
    )
    with pytest.raises(InputError, match=r"Module\.symvers:2: nf_confirm exported twice"):
        symsources.parse_symvers(path)


@pytest.mark.parametrize("text", ["hello world\n", "0xZZ\tsym\tvmlinux\tEXPORT_SYMBOL\t\n", "0x1\tsym\n", "\n"])
def test_symvers_malformed(tmp_path, text) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "Module.symvers"
    path.write_text(text)
    with pytest.raises(InputError, match=r"Module\.symvers"):
        symsources.parse_symvers(path)


# --- System.map / kallsyms ------------------------------------------------------------------------------------


def test_debian_placeholder_system_map(debian) -> None:  # type: ignore[no-untyped-def]
    if not symsources.is_placeholder_system_map(debian.system_map):
        pytest.skip(f"{debian.system_map} is a real System.map here")
    with pytest.raises(InputError, match="Debian's placeholder"):
        symsources.parse_symbol_list(debian.system_map)


def test_system_map_and_kallsyms_text(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "kallsyms"
    path.write_text(
        "ffffffff81000000 T _text\n"
        "ffffffff8123a0b0 T kallsyms_lookup_name\n"
        "ffffffffc0a08d70 T nf_confirm\t[nf_conntrack]\n"
        "ffffffffc0a08e90 t ipv4_confirm\t[nf_conntrack]\n"
        "ffffffffc0b00000 t ipv4_confirm\t[other_mod]\n"
    )
    listing = symsources.parse_symbol_list(path)
    assert len(listing.entries) == 5
    assert not listing.addresses_hidden
    (confirm,) = listing.lookup("ipv4_confirm", module="nf_conntrack")
    (anchor,) = listing.lookup("nf_confirm", module="nf_conntrack")
    assert confirm.address - anchor.address == 0x120
    assert len(listing.lookup("ipv4_confirm")) == 2
    assert listing.lookup("kallsyms_lookup_name", module="vmlinux")[0].module is None
    sym = confirm.to_symbol()
    assert (sym.kind, sym.binding, sym.value) == ("FUNC", "LOCAL", 0xFFFFFFFFC0A08E90)


def test_kallsyms_hidden_addresses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "kallsyms"
    path.write_text("0000000000000000 T _text\n0000000000000000 t ipv4_confirm\t[nf_conntrack]\n")
    assert symsources.parse_symbol_list(path).addresses_hidden


def test_real_proc_kallsyms_parses() -> None:
    path = Path("/proc/kallsyms")
    if not path.is_file():
        pytest.skip("no /proc/kallsyms")
    listing = symsources.parse_symbol_list(path)
    assert len(listing.entries) > 10000
    assert listing.lookup("_text") or listing.lookup("_stext")


@pytest.mark.parametrize("text", ["ffffffff81000000 T\n", "nothex T foo\n", "", "ffff T a b c\n"])
def test_symbol_list_malformed(tmp_path, text) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "System.map"
    path.write_text(text)
    with pytest.raises(InputError, match=r"System\.map"):
        symsources.parse_symbol_list(path)


# --- .config --------------------------------------------------------------------------------------------------


def test_debian_config_flags(debian) -> None:  # type: ignore[no-untyped-def]
    flags = symsources.config_flags(debian.config)
    assert flags == ConfigFlags(
        ftrace_with_regs=True,
        ftrace_with_args=True,
        kprobes=True,
        livepatch=True,
        ct_events=True,
        ct_procfs=True,
        modules=True,
        module_sig_force=False,
        x86_ibt=False,
        cfi_clang=False,
        kasan=False,
        known=True,
    )
    values = symsources.parse_config(debian.config)
    assert values["NF_CONNTRACK"] == "m"
    assert values["MODULE_SIG_FORCE"] == "n"


def test_config_module_value_counts_and_gzip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "config.gz"
    text = (
        '#\n# comment\n#\nCONFIG_KPROBES=y\nCONFIG_KASAN=m\n# CONFIG_LIVEPATCH is not set\nCONFIG_LOCALVERSION="-x"\n'
    )
    path.write_bytes(gzip.compress(text.encode()))
    flags = symsources.config_flags(path)
    assert (flags.kprobes, flags.kasan, flags.livepatch, flags.known) == (True, True, False, True)
    assert symsources.parse_config(path)["LOCALVERSION"] == "-x"


def test_no_config_is_unknown() -> None:
    flags = symsources.config_flags(None)
    assert not flags.known
    assert not any(getattr(flags, name) for name in symsources.CONFIG_OPTIONS)


@pytest.mark.parametrize("text", ["", "hello\n", "CONFIG_X=y\nrandom line\n"])
def test_config_malformed(tmp_path, text) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "config"
    path.write_text(text)
    with pytest.raises(InputError, match="config"):
        symsources.config_flags(path)


def test_config_missing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=r"config-none: no such file"):
        symsources.config_flags(tmp_path / "config-none")


# --- release ----------------------------------------------------------------------------------------------------


def test_debian_kernel_release(debian) -> None:  # type: ignore[no-untyped-def]
    assert symsources.kernel_release(debian.kdir) == debian.release


def test_release_from_kernel_release_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "include/config").mkdir(parents=True)
    (tmp_path / "include/config/kernel.release").write_text("3.10.0-1160.el7.x86_64\n")
    assert symsources.kernel_release(tmp_path) == "3.10.0-1160.el7.x86_64"
    (tmp_path / "include/generated").mkdir()
    (tmp_path / "include/generated/utsrelease.h").write_text('#define UTS_RELEASE "3.10.0-1160.el7.x86_64"\n')
    assert symsources.kernel_release(tmp_path) == "3.10.0-1160.el7.x86_64"


def test_release_from_unprepared_tree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="not a prepared kernel tree"):
        symsources.kernel_release(tmp_path)
    with pytest.raises(InputError, match="no such kernel headers directory"):
        symsources.kernel_release(tmp_path / "missing")


def test_release_version() -> None:
    assert symsources.release_version("6.1.0-56-amd64") == (6, 1, 0)
    assert symsources.release_version("3.10.0-1160.el7.x86_64") == (3, 10, 0)
    assert symsources.release_version("6.12") == (6, 12, 0)
    with pytest.raises(InputError):
        symsources.release_version("vmlinuz")


# --- read_capped -------------------------------------------------------------------------------------------------


def test_read_capped_plain_file_over_cap(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "big"
    path.write_bytes(bytes(2048))
    with pytest.raises(InputError, match="larger than"):
        symsources.read_capped(path, cap=1024)
    assert symsources.read_capped(path, cap=4096) == (bytes(2048), None)


@pytest.mark.parametrize("kind", ["xz", "gz", "zst"])
def test_read_capped_large_incompressible_file(tmp_path, kind) -> None:  # type: ignore[no-untyped-def]
    """Several MiB that do not compress: more than a pipe holds, in and out of the zstd command."""
    import random

    from elffixtures import compress

    data = random.Random(49561).randbytes(3 << 20)
    plain = tmp_path / "blob"
    plain.write_bytes(data)
    assert symsources.read_capped(compress(plain, kind)) == (data, kind)


@pytest.mark.parametrize("kind", ["xz", "gz", "zst"])
def test_read_capped_truncated_stream(tmp_path, kind) -> None:  # type: ignore[no-untyped-def]
    from elffixtures import compress

    plain = tmp_path / "text"
    plain.write_bytes(b"".join(b"line %d of a kernel symbol list\n" % i for i in range(20000)))
    packed = compress(plain, kind)
    packed.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(InputError, match=rf"text\.{kind}: (truncated|corrupt) {kind} data"):
        symsources.read_capped(packed)


def test_symbol_list_lookup_matches_whole_names_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "kallsyms"
    path.write_text(
        "ffffffff81000010 T synchronize_net_x\n"
        "ffffffff81000020 T x_synchronize_net\n"
        "ffffffff81000030 t helper\t[synchronize_net]\n"
        "ffffffff81000040 T synchronize_net\n"
    )
    listing = symsources.parse_symbol_list(path)
    assert [e.address for e in listing.lookup("synchronize_net")] == [0xFFFFFFFF81000040]
    assert listing.lookup("helper", module="synchronize_net")[0].address == 0xFFFFFFFF81000030
    assert not listing.lookup("helper", module="vmlinux")
    assert not listing.lookup("")


def test_symbol_list_other_layouts_parse_the_same(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lines = ["ffffffff81000000 T _text", "ffffffffc0a08e90 t ipv4_confirm\t[nf_conntrack]"]
    plain, crlf = tmp_path / "plain", tmp_path / "crlf"
    plain.write_text("\n".join(lines) + "\n")
    crlf.write_bytes(("\r\n".join(lines) + "\r\n\r\n").encode())
    fast, slow = symsources.parse_symbol_list(plain), symsources.parse_symbol_list(crlf)
    assert fast.entries == slow.entries and len(fast.entries) == 2
    assert slow.lookup("ipv4_confirm", module="nf_conntrack") == fast.lookup("ipv4_confirm", module="nf_conntrack")
    bad = tmp_path / "bad"
    bad.write_text("\n".join(lines) + "\nffffffff81000000 T\n")
    with pytest.raises(InputError, match=r"bad:3: not"):
        symsources.parse_symbol_list(bad)
