"""Tests for nqgen.reprokernel: cache key, the revert patch against the real source, the fragment, a real build."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from nqgen import reprokernel
from nqgen.errors import BuildError, InputError
from nqgen.reprokernel import (
    FRAGMENT_FILE,
    PATCH_FILE,
    PATCH_FILES,
    SOURCE_TARBALL,
    Inputs,
    ReproKernel,
    ensure_built,
    find_built,
    load_inputs,
    merge_config,
    missing_options,
    parse_config,
)

HEADER = "include/net/netfilter/nf_conntrack_core.h"
REFETCH = "if (ret == NF_ACCEPT)\n\t\t\t\tct = (struct nf_conn *)skb_nfct(skb);"


def _inputs(tmp_path: Path, patch_text: str | None = None, fragment_text: str | None = None) -> Inputs:
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    if not tarball.exists():
        tarball.write_bytes(b"not really a tarball")
    patch = tmp_path / "p.patch"
    fragment = tmp_path / "c.fragment"
    patch.write_text(PATCH_FILE.read_text() if patch_text is None else patch_text)
    fragment.write_text(FRAGMENT_FILE.read_text() if fragment_text is None else fragment_text)
    return load_inputs(tarball=tarball, patches=[patch], fragment=fragment)


# --- the cache key ------------------------------------------------------------------------------------------


def test_key_is_stable_for_the_same_inputs(tmp_path: Path) -> None:
    assert _inputs(tmp_path).key == _inputs(tmp_path).key


def test_key_changes_with_the_patch(tmp_path: Path) -> None:
    base = _inputs(tmp_path)
    changed = _inputs(tmp_path, patch_text=PATCH_FILE.read_text() + "\n")
    assert changed.key != base.key


def test_key_changes_with_the_fragment(tmp_path: Path) -> None:
    base = _inputs(tmp_path)
    changed = _inputs(tmp_path, fragment_text=FRAGMENT_FILE.read_text() + "CONFIG_KCSAN=y\n")
    assert changed.key != base.key


def test_key_changes_with_the_source(tmp_path: Path) -> None:
    base = _inputs(tmp_path)
    (tmp_path / "linux-source-6.1.tar.xz").write_bytes(b"a different, longer tarball")
    assert _inputs(tmp_path).key != base.key


def test_key_does_not_confuse_patch_and_fragment_boundaries(tmp_path: Path) -> None:
    a = _inputs(tmp_path, patch_text="ab", fragment_text="c")
    b = _inputs(tmp_path, patch_text="a", fragment_text="bc")
    assert a.key != b.key


def test_key_changes_with_the_set_of_patches(tmp_path: Path) -> None:
    base = _inputs(tmp_path)
    (tmp_path / "q.patch").write_text("--- a/x\n+++ b/x\n")
    more = load_inputs(tarball=base.tarball, patches=[tmp_path / "p.patch", tmp_path / "q.patch"],
                       fragment=tmp_path / "c.fragment")
    assert more.key != base.key


def test_missing_tarball_names_the_apt_package(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"apt-get install linux-source-6\.1"):
        load_inputs(tarball=tmp_path / "nope.tar.xz")


# --- the cache layout ---------------------------------------------------------------------------------------


def test_find_built_is_none_for_an_empty_cache(tmp_path: Path) -> None:
    assert find_built(tmp_path, inputs=_inputs(tmp_path)) is None


def test_an_unfinished_build_is_not_taken_as_done(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    cache = tmp_path / "cache"
    tmp = cache / f"{inputs.key}.tmp"
    tmp.mkdir(parents=True)
    (tmp / "reprokernel.json").write_text(json.dumps({"release": "6.1.192-nqgen-repro"}))
    assert find_built(cache, inputs=inputs) is None
    tmp.rename(cache / inputs.key)
    found = find_built(cache, inputs=inputs)
    assert found is not None
    assert found.release == "6.1.192-nqgen-repro"
    assert found.modules_dir == cache / inputs.key / "modules/lib/modules/6.1.192-nqgen-repro"
    assert found.kdir == cache / inputs.key / "build"


def test_a_failed_build_is_reported_and_not_cached(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)  # its tarball is not an xz archive: extraction fails at once
    cache = tmp_path / "cache"
    with pytest.raises(BuildError, match="extract source failed"):
        ensure_built(cache, inputs=inputs)
    assert find_built(cache, inputs=inputs) is None
    assert not (cache / inputs.key).exists()
    log = cache / f"{inputs.key}.tmp" / "build.log"
    assert "tar -xJf" in log.read_text()
    with pytest.raises(BuildError, match="extract source failed"):  # the stale .tmp is replaced, not reused
        ensure_built(cache, inputs=inputs)


def test_env_overrides_the_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NQGEN_CACHE", str(tmp_path))
    assert reprokernel.cache_dir() == tmp_path / "repro-kernel"
    assert reprokernel.cache_dir(tmp_path / "x") == tmp_path / "x"


def test_cli_check_fails_when_not_built(tmp_path: Path) -> None:
    result = CliRunner().invoke(reprokernel.main, ["--check", "--cache", str(tmp_path)])
    assert result.exit_code == 1
    assert "not built" in result.output


# --- the config fragment ------------------------------------------------------------------------------------


def test_fragment_asks_for_what_the_lab_needs() -> None:
    frag = parse_config(FRAGMENT_FILE.read_text())
    for name, value in {"CONFIG_NF_CONNTRACK": "m", "CONFIG_NF_CT_NETLINK": "m", "CONFIG_NETFILTER_NETLINK_QUEUE": "m",
                        "CONFIG_NF_CONNTRACK_EVENTS": "y", "CONFIG_NF_CONNTRACK_PROCFS": "y", "CONFIG_KASAN": "y",
                        "CONFIG_KASAN_INLINE": "y", "CONFIG_LIVEPATCH": "y", "CONFIG_DYNAMIC_FTRACE_WITH_REGS": "y",
                        "CONFIG_KPROBES": "y", "CONFIG_KALLSYMS_ALL": "y", "CONFIG_PVH": "y"}.items():
        assert frag.get(name) == value, name
    assert frag["CONFIG_DRM"] is None
    assert frag["CONFIG_DEBUG_INFO"] is None


def test_merge_replaces_the_base_lines() -> None:
    base = "CONFIG_NF_CONNTRACK=y\n# CONFIG_NETFILTER_ADVANCED is not set\nCONFIG_DRM=y\nCONFIG_OTHER=y\n"
    merged = parse_config(merge_config(base, FRAGMENT_FILE.read_text()))
    assert merged["CONFIG_NF_CONNTRACK"] == "m"
    assert merged["CONFIG_NETFILTER_ADVANCED"] == "y"
    assert merged["CONFIG_DRM"] is None
    assert merged["CONFIG_OTHER"] == "y"
    assert missing_options(merge_config(base, FRAGMENT_FILE.read_text()), FRAGMENT_FILE.read_text()) == []


def test_missing_options_reports_what_kconfig_dropped() -> None:
    fragment = FRAGMENT_FILE.read_text()
    config = merge_config("", fragment)
    config = config.replace("CONFIG_LIVEPATCH=y", "# CONFIG_LIVEPATCH is not set")
    config = config.replace("CONFIG_NF_CONNTRACK=m", "CONFIG_NF_CONNTRACK=y")
    config = config.replace("# CONFIG_DRM is not set", "CONFIG_DRM=m")
    assert sorted(missing_options(config, fragment)) == [
        "CONFIG_DRM not set (got m)", "CONFIG_LIVEPATCH=y (got unset)", "CONFIG_NF_CONNTRACK=m (got y)"]


# --- the patch against the real source ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the patches touch, copied from the real linux-source-6.1 tarball (one pass over it)."""
    if not SOURCE_TARBALL.is_file():
        pytest.skip(f"{SOURCE_TARBALL} missing (apt-get install linux-source-6.1)")
    dest = tmp_path_factory.mktemp("src") / "linux-source-6.1"
    wanted = {f"linux-source-6.1/{HEADER}": HEADER}
    with tarfile.open(SOURCE_TARBALL) as tar:
        for member in tar:
            if member.name in wanted:
                # extractfile, not extract(filter=...): Debian 12's Python 3.11.2 predates tar filters.
                src = tar.extractfile(member)
                assert src is not None
                out = dest / wanted.pop(member.name)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(src.read())
                if not wanted:
                    break
    assert not wanted, f"not in the tarball: {sorted(wanted)}"
    return dest


def test_every_patch_applies_to_the_real_source(real_source: Path) -> None:
    before = (real_source / HEADER).read_text()
    assert REFETCH in before  # the source has the fix: the patch has something to revert
    for patch in PATCH_FILES:
        subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)],
                       cwd=real_source, check=True, capture_output=True)
    after = (real_source / HEADER).read_text()
    assert REFETCH not in after
    assert "ret = __nf_conntrack_confirm(skb);" in after
    assert "nf_ct_deliver_cached_events(ct);" in after
    assert len(before.splitlines()) - len(after.splitlines()) == 3


# --- a real build -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built() -> ReproKernel:
    kernel = find_built()
    if kernel is None:
        pytest.skip("the reference kernel is not built (make repro-kernel)")
    return kernel


@pytest.mark.repro
def test_built_kernel_has_the_revert(built: ReproKernel) -> None:
    text = (built.kdir / HEADER).read_text()
    assert REFETCH not in text
    assert "ret = __nf_conntrack_confirm(skb);" in text


@pytest.mark.repro
def test_built_kernel_has_the_fragment_options(built: ReproKernel) -> None:
    config = (built.kdir / ".config").read_text()
    assert missing_options(config, FRAGMENT_FILE.read_text()) == []


@pytest.mark.repro
def test_built_kernel_has_its_files(built: ReproKernel) -> None:
    assert built.image.is_file()
    assert built.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert (built.kdir / "Module.symvers").is_file()
    assert (built.modules_dir / "kernel/net/netfilter/nf_conntrack.ko").is_file()
    assert (built.modules_dir / "modules.dep").is_file()
    assert (built.modules_dir / "build").resolve() == built.kdir.resolve()
    release = (built.kdir / "include/config/kernel.release").read_text().strip()
    assert release == built.release
