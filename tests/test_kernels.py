"""nqgen.kernels: recipes, our patches against the real RHEL trees, sources (dir, tarball, .src.rpm), the cache.

Building a kernel takes an hour here, so these tests check every step that can be checked on its own with real
inputs; the built kernels themselves are checked in test_rhel_kernels.py (skipped when not built).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from nqgen import kernels, reprokernel
from nqgen.cli import cli
from nqgen.errors import InputError, UsageError
from nqgen.kernels import build as kbuild
from nqgen.kernels import recipes, source
from nqgen.kernels.kconfig import merge_config, missing_options, without_modules
from nqgen.kernels.runner import Runner
from nqgen.srcexports import scan


def _tree(root: Path, version: str = "3.10.0") -> Path:
    """The smallest directory nqgen.kernels.source accepts as a kernel tree."""
    root.mkdir(parents=True)
    v, p, s = version.split(".")
    (root / "Makefile").write_text(f"VERSION = {v}\nPATCHLEVEL = {p}\nSUBLEVEL = {s}\nEXTRAVERSION =\n")
    (root / "Kconfig").write_text("mainmenu \"test\"\n")
    (root / "kernel").mkdir()
    (root / "kernel/module.c").write_text("EXPORT_SYMBOL_GPL(klp_enable_patch);\nEXPORT_SYMBOL(printk);\n")
    (root / "net/core").mkdir(parents=True)
    (root / "net/core/dev.c").write_text("#define P(name) EXPORT_SYMBOL(param_ops_##name)\n"
                                         "#define R(size) EXPORT_SYMBOL(__asan_report_load##size##_noabort)\n"
                                         "#define T(reg) __EXPORT_THUNK(__x86_indirect_thunk_ ## reg)\n")
    return root


def _runner(tmp_path: Path) -> Runner:
    return Runner(tmp_path / "log", 0, lambda _msg: None)


# --- recipes and our patches --------------------------------------------------------------------------------


def test_every_recipe_names_existing_configs_and_patches() -> None:
    assert set(kernels.RECIPES) == {"rhel77", "rhel81", "rhel81-kasan-free", "debian61-repro"}
    for r in kernels.RECIPES.values():
        if r.legacy:
            continue
        frag = r.fragment_file()
        assert (frag is not None and frag.is_file()) or r.base is not None, r.name
        assert r.patch_files(), f"{r.name} has no patches"
        for p in r.patch_files():
            text = p.read_text()
            assert "\n--- a/" in text and "\n+++ b/" in text, p
            assert text.split("\n--- a/")[0].strip(), f"{p} does not say why it exists"
    assert kernels.get_recipe("rhel81-kasan-free").base == "rhel81"
    with pytest.raises(UsageError, match="unknown kernel recipe"):
        kernels.get_recipe("rhel99")


@pytest.mark.parametrize("name", ["rhel77", "rhel81", "rhel81-kasan-free"])
def test_patches_apply_to_the_real_tree(name: str, tmp_path: Path) -> None:
    recipe = kernels.get_recipe(name)
    assert recipe.default_source is not None
    src = Path(recipe.default_source)
    if not src.is_dir():
        pytest.skip(f"{src} is absent (extract the RHEL tree there, see README 'Test on your own kernel')")
    for p in recipe.patch_files():
        res = subprocess.run(["patch", "-p1", "--dry-run", "--forward", "--batch", "-d", str(src), "-i", str(p)],
                             capture_output=True, text=True, check=False)
        assert res.returncode == 0, f"{p.name} does not apply to {src}:\n{res.stdout}{res.stderr}"


def test_rhel77_fragment_keeps_what_the_lab_loads() -> None:
    frag = recipes.CONFIG_ROOT / "rhel77-qemu.fragment"
    wanted = frag.read_text()
    for opt in ("CONFIG_NF_CONNTRACK=m", "CONFIG_NF_CONNTRACK_IPV4=m", "CONFIG_NF_CONNTRACK_IPV6=m",
                "CONFIG_NETFILTER_NETLINK_QUEUE=m", "CONFIG_NF_CT_NETLINK=m", "CONFIG_LIVEPATCH=y",
                "CONFIG_KPROBES=y", "# CONFIG_MODULE_SIG is not set"):
        assert opt in wanted.splitlines(), opt
    assert "CONFIG_KASAN=y" in (recipes.CONFIG_ROOT / "rhel81-qemu.fragment").read_text().splitlines()


def test_distribution_config_without_modules_then_fragment() -> None:
    base = "CONFIG_A=m\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_NF_CONNTRACK=m\n"
    mono = without_modules(base)
    assert "# CONFIG_A is not set" in mono and "CONFIG_B=y" in mono and "CONFIG_NF_CONNTRACK=m" not in mono
    merged = merge_config(mono, "CONFIG_NF_CONNTRACK=m\n")
    assert "CONFIG_NF_CONNTRACK=m" in merged.splitlines()
    assert missing_options(merged, "CONFIG_NF_CONNTRACK=m\nCONFIG_A=m\n") == ["CONFIG_A=m (got unset)"]


# --- sources --------------------------------------------------------------------------------------------------


def test_source_kinds_and_bad_input(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "linux")
    assert source.kind(tree) == "dir"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a directory, a tarball"):
        source.kind(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="does not exist"):
        source.kind(tmp_path / "missing.tar.xz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a kernel source tree"):
        source.kind(tmp_path / "empty")


def test_directory_source_id_follows_content(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "linux")
    first = source.source_id(tree)
    assert source.source_id(tree) == first
    (tree / "kernel/module.c").write_text("changed, longer than before\n")
    assert source.source_id(tree) != first


def test_tarball_is_extracted_to_one_tree(tmp_path: Path) -> None:
    _tree(tmp_path / "src/linux-3.10.0")
    tarball = tmp_path / "linux-3.10.0.tar.xz"
    subprocess.run(["tar", "-cJf", str(tarball), "-C", str(tmp_path / "src"), "linux-3.10.0"], check=True)
    dest = tmp_path / "out/tree"
    dest.parent.mkdir()
    source.materialise(tarball, dest, tmp_path / "out/scratch", _runner(tmp_path))
    assert (dest / "kernel/module.c").is_file() and not (tmp_path / "out/scratch").exists()
    assert source.source_id(tarball).startswith("tarball linux-3.10.0.tar.xz ")


def test_src_rpm_gives_the_tree_and_its_configs(tmp_path: Path) -> None:
    """A .src.rpm made by the real rpmbuild, unpacked by rpm2cpio and cpio."""
    if shutil.which("rpmbuild") is None or shutil.which("rpm2cpio") is None:
        pytest.skip("rpmbuild or rpm2cpio is missing (scripts/install-deps installs rpm and rpm2cpio)")
    sources = tmp_path / "SOURCES"
    _tree(tmp_path / "t/linux-3.10.0-1.el7")
    sources.mkdir()
    subprocess.run(["tar", "-cJf", str(sources / "linux-3.10.0-1.el7.tar.xz"), "-C", str(tmp_path / "t"),
                    "linux-3.10.0-1.el7"], check=True)
    (sources / "kernel-3.10.0-x86_64.config").write_text("CONFIG_NF_CONNTRACK=m\n")
    spec = tmp_path / "kernel.spec"
    spec.write_text("Name: kernel\nVersion: 3.10.0\nRelease: 1.el7\nSummary: test\nLicense: GPLv2\n"
                    "Source0: linux-3.10.0-1.el7.tar.xz\nSource1: kernel-3.10.0-x86_64.config\n"
                    "%description\ntest\n")
    subprocess.run(["rpmbuild", "-bs", "--define", f"_topdir {tmp_path / 'rpm'}", "--define",
                    f"_sourcedir {sources}", "--define", f"_srcrpmdir {tmp_path}", str(spec)],
                   check=True, capture_output=True)
    srpm = next(tmp_path.glob("*.src.rpm"))
    dest = tmp_path / "out/tree"
    dest.parent.mkdir()
    source.materialise(srpm, dest, tmp_path / "out/scratch", _runner(tmp_path))
    assert (dest / "kernel/module.c").is_file()
    assert (dest / "configs/kernel-3.10.0-x86_64.config").read_text() == "CONFIG_NF_CONNTRACK=m\n"
    assert source.kind(srpm) == "srpm"


# --- keys, cache, API, command line ---------------------------------------------------------------------------


def test_key_follows_source_patches_and_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = _tree(tmp_path / "linux")
    r81, kf = kernels.get_recipe("rhel81"), kernels.get_recipe("rhel81-kasan-free")
    key = kbuild.recipe_key(r81, tree)
    assert kbuild.recipe_key(r81, tree) == key and kbuild.recipe_key(kf, tree) != key
    patches = tmp_path / "patches"
    shutil.copytree(recipes.PATCH_ROOT, patches)
    monkeypatch.setattr(recipes, "PATCH_ROOT", patches)
    assert kbuild.recipe_key(r81, tree) == key
    first = sorted((patches / "rhel81").glob("*.patch"))[0]
    first.write_text(first.read_text() + "\n")
    assert kbuild.recipe_key(r81, tree) != key


def test_find_built_reads_only_finished_builds(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "linux")
    assert kernels.find_built("rhel81", cache=tmp_path) is None
    key = kbuild.recipe_key(kernels.get_recipe("rhel81"), tree)
    root = tmp_path / "kernels/rhel81"
    (root / f"{key}.tmp").mkdir(parents=True)  # an unfinished build is never taken
    assert kernels.find_built("rhel81", tree, cache=tmp_path) is None
    (root / key).mkdir()
    meta = {"recipe": "rhel81", "release": "4.18.0-nqgen-rhel81", "image": "build/arch/x86/boot/bzImage",
            "vmlinux": "build/vmlinux", "modules_dir": "modules/lib/modules/4.18.0-nqgen-rhel81", "kdir": "build",
            "distro_kdir": None}
    (root / key / "kernel.json").write_text(json.dumps(meta))
    k = kernels.find_built("rhel81", tree, cache=tmp_path)
    assert k is not None and k.kdir == root / key / "build" and k.distro_kdir is None and k.key == key
    assert kernels.find_built("rhel81", cache=tmp_path) == k  # newest build, whatever the source
    res = CliRunner().invoke(cli, ["kernel", "show", "rhel81", "--shell"], env={"NQGEN_CACHE": str(tmp_path)})
    assert res.exit_code == 0 and f"KDIR={root / key / 'build'}\n" in res.output and "DISTRO_KDIR=''" in res.output


def test_debian61_repro_is_reprokernel_with_its_own_key(tmp_path: Path) -> None:
    try:
        inputs = reprokernel.load_inputs()
    except InputError as exc:
        pytest.skip(str(exc))
    assert kernels.find_built("debian61-repro", cache=tmp_path) is None
    final = tmp_path / "repro-kernel" / inputs.key
    final.mkdir(parents=True)
    (final / "reprokernel.json").write_text(json.dumps({"release": "6.1.192-nqgen-repro"}))
    k = kernels.find_built("debian61-repro", cache=tmp_path)
    assert k is not None and k.key == inputs.key and k.kdir == final / "build" and k.recipe == "debian61-repro"


def test_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NQGEN_CACHE", str(tmp_path))
    runner = CliRunner()
    res = runner.invoke(cli, ["kernel", "list"])
    assert res.exit_code == 0 and "rhel77" in res.output and "not built" in res.output
    res = runner.invoke(cli, ["kernel", "show", "rhel81"])
    assert res.exit_code == 1 and "not built" in res.output
    res = runner.invoke(cli, ["kernel", "build", "rhel99"])
    assert res.exit_code == 2
    res = runner.invoke(cli, ["kernel", "build", "rhel81", "--source", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "does not exist" in res.output


# --- exports declared in a source tree ------------------------------------------------------------------------


def test_source_exports_names_and_pasted_prefixes(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "linux")
    found = scan(tree)
    assert {"klp_enable_patch", "printk"} <= found.names
    assert found.prefixes == ("__asan_report_load", "__x86_indirect_thunk_", "param_ops_")
    assert found.declares("param_ops_uint") and found.declares("__asan_report_load4_noabort")
    assert found.declares("printk") and not found.declares("kfree")
    with pytest.raises(InputError, match="not a kernel source tree"):
        scan(tmp_path)


def test_source_exports_are_scanned_once_per_tree_in_a_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fleet repeats a tree under many targets: grep runs once per tree, a second tree gets its own answer."""
    import subprocess

    from nqgen import srcexports

    calls: list[object] = []
    real_run = subprocess.run

    def counting_run(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("cwd"))
        return real_run(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(srcexports.subprocess, "run", counting_run)
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    (two / "kernel" / "extra.c").write_text("EXPORT_SYMBOL_GPL(only_in_two);\n")
    with srcexports.remembered():
        first, again = scan(one), scan(one)
        assert first.names == again.names and "only_in_two" not in first.names
        assert "only_in_two" in scan(two).names
    assert calls == [one.resolve(), two.resolve()]
    # outside a fleet a tree may change between two calls: it is scanned again
    (one / "kernel" / "later.c").write_text("EXPORT_SYMBOL(added_later);\n")
    assert "added_later" in scan(one).names and len(calls) == 3


def test_finished_steps_survive_a_restart(tmp_path: Path) -> None:
    steps = kbuild._Steps(tmp_path)
    assert "source" not in steps
    steps.add("source")
    steps.add("patch 0001-a.patch")
    again = kbuild._Steps(tmp_path)  # what a resumed build reads
    assert "source" in again and "patch 0001-a.patch" in again and "config" not in again
