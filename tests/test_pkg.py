"""Issue 13: the target from vendor packages, signing, rpm/deb/DKMS packages, install/uninstall, nqgen-status.

Everything here is real: Debian's packages of the installed kernel (apt-get download), RPMs built with
rpmbuild, modules compiled against the installed headers, dkms run against the installed kernel, and the
installed Debian kernel booted under qemu for nqgen-status and the signature checks.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, DebianBuilt, DebianKernel, make_jobs, run_nqgen
from nqgen.pkg import hostfiles
from nqgen.pkg.archive import extract, member_path
from nqgen.pkg.frompkg import cache_root
from nqgen.pkg.guestcheck import GuestCase, GuestRun
from nqgen.pkg.status import status

ALL = ("advance-confirm", "advance-confirm-corrected", "ftrace", "hook-swap", "stop-hook", "livepatch")


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900, **kw)  # type: ignore[call-overload, no-any-return]


def _make(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(["make", "-s", *make_jobs(), "-C", str(out), f"NQGEN={sys.executable} -m nqgen", *args])


def _tree_snapshot(root: Path) -> dict[str, bytes | None]:
    snap: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            snap[os.path.relpath(p, root)] = Path(p).read_bytes()
    return snap


# ---- offline -------------------------------------------------------------------------------------------


def test_member_paths_never_leave_the_extraction_root() -> None:
    assert member_path("./usr/src/x/Makefile") == "usr/src/x/Makefile"
    assert member_path("/boot/config-1") == "boot/config-1"
    assert member_path("./usr/../../etc/passwd") is None
    assert member_path(".") is None


def test_not_a_package_is_one_line_input_error(tmp_path: Path) -> None:
    bogus = tmp_path / "kernel-devel-1.0.rpm"
    bogus.write_bytes(b"\xed\xab\xee\xdbnot really an rpm" * 10)
    proc = run_nqgen(["--from-package", str(bogus), "--profile-only"], cwd=tmp_path,
                     env={"NQGEN_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "not a package libarchive can read" in proc.stderr
    assert not list((tmp_path / "cache" / "packages").glob("*"))  # nothing half-extracted stays


# ---- real Debian packages of the installed kernel -------------------------------------------------------


def _deb_field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), name]).stdout.strip()


@pytest.fixture(scope="session")
def debian_debs(debian: DebianKernel) -> dict[str, Path]:
    """linux-headers-R, its -common and linux-kbuild, linux-image-R: downloaded once into $NQGEN_CACHE/debs."""
    if shutil.which("apt-get") is None:
        pytest.skip("needs apt-get")
    dest = cache_root() / "debs"
    dest.mkdir(parents=True, exist_ok=True)

    def get(name: str) -> Path:
        found = sorted(dest.glob(f"{name}_*.deb"))
        if not found:
            proc = _run(["apt-get", "download", name], cwd=dest)
            found = sorted(dest.glob(f"{name}_*.deb"))
            if not found:
                pytest.skip(f"apt-get download {name} failed: {proc.stderr.strip()[-200:]}")
        return found[-1]

    headers = get(f"linux-headers-{debian.release}")
    deps = [d.strip().split()[0] for d in _deb_field(headers, "Depends").split(",")]
    common = next(d for d in deps if d.startswith("linux-headers-") and d.endswith("-common"))
    kbuild = next(d for d in deps if d.startswith("linux-kbuild-"))
    return {"headers": headers, "common": get(common), "kbuild": get(kbuild),
            "image": get(f"linux-image-{debian.release}")}  # fmt: skip


def _profile(args: list[str], cwd: Path) -> dict[str, object]:
    proc = run_nqgen([*args, "--profile-only"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


def _same_target(a: dict[str, object], b: dict[str, object]) -> None:
    for key in ("release", "confirm"):
        assert a[key] == b[key], key
    fa, fb = a["features"], b["features"]
    assert isinstance(fa, dict) and isinstance(fb, dict)
    # the evidence names the files read: the extracted copies instead of the installed ones
    assert {k: v for k, v in fa.items() if k != "evidence"} == {k: v for k, v in fb.items() if k != "evidence"}
    assert len(fa["evidence"]) == len(fb["evidence"])
    assert a["exports"] == b["exports"]


def test_from_debian_packages_profiles_like_the_installed_kernel(
    debian: DebianKernel, debian_debs: dict[str, Path], tmp_path: Path
) -> None:
    args = [a for p in debian_debs.values() for a in ("--from-package", str(p))]
    from_pkgs = _profile(args, tmp_path)
    installed = _profile(["--kdir", str(debian.kdir)], tmp_path)
    _same_target(from_pkgs, installed)
    sources = from_pkgs["sources"]
    assert isinstance(sources, dict)
    assert str(cache_root() / "packages") in sources["module"]
    assert sources["module"].endswith(f"lib/modules/{debian.release}/kernel/net/netfilter/nf_conntrack.ko")


def test_from_debian_packages_builds_a_module_against_the_extracted_tree(
    debian: DebianKernel, debian_debs: dict[str, Path], tmp_path: Path
) -> None:
    args = [a for p in debian_debs.values() for a in ("--from-package", str(p))]
    proc = run_nqgen([*args, "--strategy", "ftrace", "--out", "out"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    kdir = json.loads((tmp_path / "out/inputs.json").read_text())["kdir"]
    assert kdir.startswith(str(cache_root() / "packages"))  # the extracted tree, not the host's
    build = _make(tmp_path / "out")
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    assert f"ok ftrace: nq_ftrace.ko vermagic '{debian.release} " in build.stdout


def test_debian_headers_without_their_common_package_are_refused(
    debian: DebianKernel, debian_debs: dict[str, Path], tmp_path: Path
) -> None:
    args = ["--from-package", str(debian_debs["headers"]), "--from-package", str(debian_debs["image"])]
    proc = run_nqgen([*args, "--profile-only"], cwd=tmp_path, env={"NQGEN_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 3
    assert f"add the linux-headers-{debian.release.rsplit('-', 1)[0]}-common package" in proc.stderr
    assert [p.name for p in (tmp_path / "cache" / "packages").iterdir()] == []


# ---- RPMs built here: an EL-style kernel-devel and kernel of the installed kernel ------------------------


def _rpmbuild(top: Path, name: str, root: Path, files: list[str]) -> Path:
    spec = top / f"{name}.spec"
    spec.write_text("\n".join([
        "%define __os_install_post %{nil}", "%define debug_package %{nil}", "%global _build_id_links none",
        f"Name: {name}", "Version: 1", "Release: 1", "Summary: test kernel package", "License: GPLv2",
        "AutoReqProv: no", "%description", "nqgen test", "%install", f"cp -a {root}/. %{{buildroot}}/",
        "%files", *files, "",
    ]))  # fmt: skip
    proc = _run(["rpmbuild", "-bb", "--quiet", "--define", f"_topdir {top}", "--define", "_binary_payload w1.xzdio",
                 str(spec)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-1500:]
    return next((top / "RPMS").rglob(f"{name}-1-1.*.rpm"))


@pytest.fixture(scope="module")
def el_rpms(debian: DebianKernel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The installed kernel as EL packages: kernel-devel (the headers trees under usr/src), an EL7-style kernel
    (conntrack .ko.xz, /boot/config-R, /boot/symvers-R.gz), and EL8's split kernel-core (config and symvers.gz
    in /lib/modules/R) + kernel-modules (the .ko.xz)."""
    if shutil.which("rpmbuild") is None:
        pytest.skip("needs rpmbuild (make deps installs rpm)")
    top = tmp_path_factory.mktemp("rpm")
    r = debian.release
    devel = top / "devel"
    arch_tree = debian.kdir.resolve()
    common = Path((arch_tree / "Makefile").read_text().split()[1]).parent
    for tree in (arch_tree, common):
        shutil.copytree(tree, devel / "usr/src" / tree.name, symlinks=True)
    kbuild = (arch_tree / "scripts").resolve().parent
    shutil.copytree(kbuild, devel / "usr/lib" / kbuild.name, symlinks=True)
    ko_xz = lzma.compress(debian.nf_conntrack.read_bytes(), check=lzma.CHECK_CRC32)
    symvers_gz = gzip.compress((arch_tree / "Module.symvers").read_bytes())
    config = debian.config.read_bytes()
    trees: dict[str, dict[str, bytes]] = {
        "kernel": {f"lib/modules/{r}/kernel/net/netfilter/nf_conntrack.ko.xz": ko_xz,
                   f"boot/config-{r}": config, f"boot/symvers-{r}.gz": symvers_gz},
        "kernel-core": {f"lib/modules/{r}/config": config, f"lib/modules/{r}/symvers.gz": symvers_gz},
        "kernel-modules": {f"lib/modules/{r}/kernel/net/netfilter/nf_conntrack.ko.xz": ko_xz},
    }  # fmt: skip
    rpms = {"kernel-devel": _rpmbuild(top, "kernel-devel", devel, ["/usr/src/*", "/usr/lib/*"])}
    for name, files in trees.items():
        for rel, data in files.items():
            (top / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (top / name / rel).write_bytes(data)
        rpms[name] = _rpmbuild(top, name, top / name, [f"/{rel}" for rel in files])
    return rpms


@pytest.mark.parametrize("layout", [("kernel-devel", "kernel"), ("kernel-devel", "kernel-core", "kernel-modules")],
                         ids=["el7", "el8"])  # fmt: skip
def test_from_rpm_packages_profiles_like_the_installed_kernel(
    debian: DebianKernel, el_rpms: dict[str, Path], layout: tuple[str, ...], tmp_path: Path
) -> None:
    rpms = [el_rpms[n] for n in layout]
    listing = _run(["rpm", "-qlp", *map(str, rpms)]).stdout
    assert "nf_conntrack.ko.xz" in listing and "symvers" in listing
    env = {"NQGEN_CACHE": str(tmp_path / "cache")}
    args = [a for p in rpms for a in ("--from-package", str(p))] + ["--profile-only"]
    proc = run_nqgen(args, tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    from_rpms = json.loads(proc.stdout)
    _same_target(from_rpms, _profile(["--kdir", str(debian.kdir)], tmp_path))
    assert from_rpms["sources"]["module"].endswith("nf_conntrack.ko.xz")
    assert from_rpms["sources"]["symvers"].endswith("Module.symvers")  # the devel tree's, not symvers.gz
    assert from_rpms["sources"]["config"].endswith(f"config-{debian.release}" if len(layout) == 2 else "/config")
    again = run_nqgen(args, tmp_path, env)
    assert again.returncode == 0 and len(list((tmp_path / "cache/packages").iterdir())) == 1  # cached by content


def test_an_rpm_without_the_modules_says_which_package_is_missing(el_rpms: dict[str, Path], tmp_path: Path) -> None:
    args = ["--from-package", str(el_rpms["kernel-devel"]), "--from-package", str(el_rpms["kernel-core"])]
    proc = run_nqgen([*args, "--profile-only"], tmp_path, {"NQGEN_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 3
    assert "no nf_conntrack module" in proc.stderr and "kernel-core and kernel-modules (EL8)" in proc.stderr


# ---- packaging, signing, install from a real out/ -------------------------------------------------------


@pytest.fixture(scope="module")
def built_out(debian_built: DebianBuilt) -> Path:
    """Every strategy generated for the installed Debian kernel and built against its headers (conftest: one
    build for the session; the targets here only add packages/ to it)."""
    return debian_built.out


def test_rpm_is_kmod_style_for_the_exact_kernel(debian: DebianKernel, built_out: Path, tmp_path: Path) -> None:
    proc = _make(built_out, "rpm", "STRATEGY=advance-confirm", "PARAMS=queues=2 queue_base=8", "BEFORE=myqueue")
    assert proc.returncode == 0, proc.stderr
    rpm = next((built_out / "packages").glob("kmod-nqgen-advance-confirm-*.rpm"))
    info = _run(["rpm", "-qlp", "--scripts", "--requires", "--conflicts", str(rpm)]).stdout
    r = debian.release
    assert f"/lib/modules/{r}/extra/nq_advance_confirm.ko" in info
    assert f"/lib/modules/{r}/kernel/net/netfilter/nf_conntrack.ko" in info  # the exact kernel's file
    assert f"depmod -a {r}" in info and "postinstall scriptlet" in info and "postuninstall scriptlet" in info
    assert "systemctl enable nqgen-nq_advance_confirm.service" in info
    assert "kmod-nqgen-ftrace" in info  # conflicts with the other strategies' packages
    extract(rpm, tmp_path, lambda _p: True)
    unit = (tmp_path / "usr/lib/systemd/system/nqgen-nq_advance_confirm.service").read_text()
    assert "Before=myqueue.service" in unit and "RequiredBy=myqueue.service" in unit
    conf = (tmp_path / "etc/modprobe.d/nqgen-nq_advance_confirm.conf").read_text()
    assert "options nq_advance_confirm queues=2 queue_base=8" in conf
    el7 = _make(built_out, "rpm", "STRATEGY=ftrace", "EL=el7")
    assert el7.returncode == 0, el7.stderr


def test_deb_depends_on_the_exact_kernel_image(debian: DebianKernel, built_out: Path) -> None:
    proc = _make(built_out, "deb", "STRATEGY=livepatch", "BEFORE=myqueue.service")
    assert proc.returncode == 0, proc.stderr
    deb = next((built_out / "packages").glob("nqgen-livepatch_*.deb"))
    contents = _run(["dpkg-deb", "-c", str(deb)]).stdout
    info = _run(["dpkg-deb", "-I", str(deb)]).stdout
    assert f"./lib/modules/{debian.release}/extra/nq_livepatch.ko" in contents
    for path in ("./usr/sbin/nqgen-status", "./usr/libexec/nqgen/nqgen-unload",
                 "./lib/systemd/system/nqgen-nq_livepatch.service", "./etc/modules-load.d/nqgen-nq_livepatch.conf"):
        assert path in contents  # fmt: skip
    assert f"Depends: linux-image-{debian.release}, kmod" in info
    assert "postinst" in info and "prerm" in info and "postrm" in info


def test_install_then_uninstall_leaves_the_root_exactly_as_it_was(built_out: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/modprobe.d").mkdir(parents=True)
    (root / "etc/modprobe.d/other.conf").write_text("options other x=1\n")
    (root / "usr/sbin").mkdir(parents=True)
    before = _tree_snapshot(root)
    proc = _make(built_out, "install", f"DESTDIR={root}", "STRATEGY=livepatch", "BEFORE=myqueue")
    assert proc.returncode == 0, proc.stderr
    unit = (root / "lib/systemd/system/nqgen-nq_livepatch.service").read_text()
    assert "ExecStop=/usr/libexec/nqgen/nqgen-unload nq_livepatch" in unit and "Before=myqueue.service" in unit
    assert (root / "etc/modules-load.d/nqgen-nq_livepatch.conf").read_text().endswith("nq_livepatch\n")
    assert os.access(root / "usr/sbin/nqgen-status", os.X_OK)
    again = _make(built_out, "install", f"DESTDIR={root}", "STRATEGY=livepatch")
    assert again.returncode != 0 and "already installed" in again.stderr
    several = _make(built_out, "install", f"DESTDIR={tmp_path}")
    assert several.returncode != 0 and "STRATEGY=<name>" in several.stderr
    proc = _make(built_out, "uninstall", f"DESTDIR={root}", "STRATEGY=livepatch")
    assert proc.returncode == 0, proc.stderr
    assert _tree_snapshot(root) == before


def test_unknown_parameter_is_refused_and_nothing_is_written(built_out: Path, tmp_path: Path) -> None:
    proc = _make(built_out, "install", f"DESTDIR={tmp_path}", "STRATEGY=hook-swap", "PARAMS=interval=5")
    assert proc.returncode != 0
    assert "nq_hook_swap has no parameter 'interval' (it has: interval_ms)" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("key")
    proc = _run(["openssl", "req", "-new", "-nodes", "-utf8", "-sha256", "-days", "3650", "-batch", "-x509",
                 "-subj", "/CN=nqgen test signing key/", "-outform", "PEM", "-out", str(d / "cert.pem"),
                 "-keyout", str(d / "key.pem")])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return d / "key.pem", d / "cert.pem"


def test_sign_uses_the_target_trees_sign_file(built_out: Path, signing_key: tuple[Path, Path], tmp_path: Path) -> None:
    key, cert = signing_key
    copy = tmp_path / "out"
    shutil.copytree(built_out, copy, symlinks=True)
    proc = _make(copy, "sign", "STRATEGY=stop-hook", f"KEY={key}", f"CERT={cert}")
    assert proc.returncode == 0, proc.stderr
    ko = copy / "stop-hook/nq_stop_hook.ko"
    assert _run(["modinfo", "-F", "signer", str(ko)]).stdout.strip() == "nqgen test signing key"
    again = _make(copy, "sign", "STRATEGY=stop-hook", f"KEY={key}", f"CERT={cert}")
    assert again.returncode != 0 and "already signed" in again.stderr


@pytest.mark.skipif(shutil.which("dkms") is None or os.geteuid() != 0, reason="needs dkms and root")
def test_dkms_builds_for_its_kernel_and_refuses_another_blindly(debian: DebianKernel, built_out: Path) -> None:
    proc = _make(built_out, "dkms", "STRATEGY=ftrace")
    assert proc.returncode == 0, proc.stderr
    tree = next((built_out / "packages/dkms").glob("nqgen-ftrace-*"))
    version = tree.name.split("-", 2)[2]
    name = f"nqgen-ftrace/{version}"
    env = {k: v for k, v in os.environ.items() if k != "NQGEN"}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"  # no nqgen on this PATH: the host has none
    try:
        steps = (["add", str(tree)], ["build", name, "-k", debian.release], ["install", name, "-k", debian.release])
        for step in steps:
            proc = _run(["dkms", *step], env=env)
            assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
        installed = Path(f"/lib/modules/{debian.release}/updates/dkms/nq_ftrace.ko")
        assert installed.is_file()
        assert _run(["modinfo", "-F", "vermagic", str(installed)]).stdout.startswith(debian.release + " ")
        base = debian.release.removesuffix("-amd64")
        other = next((r for r in ("-rt-amd64", "-cloud-amd64") if Path(f"/lib/modules/{base}{r}/build").is_dir()), None)
        if other is not None:
            krel = base + other
            proc = _run(["dkms", "build", name, "-k", krel], env=env)
            log = Path(f"/var/lib/dkms/nqgen-ftrace/{version}/build/make.log").read_text()
            assert proc.returncode != 0
            assert f"not rebuilt blindly for {krel}" in log, log[-800:]
            # with nqgen on the host, the build step re-runs nqgen against that kernel itself
            proc = _run(["dkms", "build", name, "-k", krel], env={**env, "NQGEN": f"{sys.executable} -m nqgen"})
            log = Path(f"/var/lib/dkms/nqgen-ftrace/{version}/build/make.log").read_text()
            if Path(f"/lib/modules/{krel}/kernel").is_dir():
                assert proc.returncode == 0 and f"nqgen checked {krel} and regenerated nq_ftrace" in log, log[-800:]
            else:  # headers only: nqgen says what is missing, and nothing is built
                assert proc.returncode != 0
                assert f"no nf_conntrack module found under /lib/modules/{krel}/kernel" in log, log[-800:]
                assert f"nqgen could not generate ftrace for {krel} (exit 3)" in log
    finally:
        _run(["dkms", "remove", name, "--all"], env=env)
        shutil.rmtree(f"/usr/src/{tree.name}", ignore_errors=True)
    assert not Path(f"/lib/modules/{debian.release}/updates/dkms/nq_ftrace.ko").exists()


# ---- in the VM: nqgen-status with each module loaded, and signature enforcement ------------------------

needs_vm = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or not Path("/bin/busybox").is_file(),
    reason="needs qemu-system-x86_64 and busybox-static",
)


@pytest.mark.vm
@needs_vm
def test_nqgen_status_in_the_guest_with_each_strategy_loaded(
    debian: DebianKernel, built_out: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    from nqgen.pkg.guestcheck import GuestCase, run_guest, sysfs_tree
    from nqgen.pkg.sign import sign

    root = tmp_path / "hostroot"
    cases = []
    modules = {}
    for strategy in ALL:
        hm = hostfiles.host_module(built_out, strategy)
        hostfiles.stage(hm, root, [], [])
        cases.append(GuestCase(hm.module, "built", hm.ko, hm.unload == "livepatch"))
        modules[hm.module] = hm
    signed = tmp_path / "nq_ftrace.ko"
    shutil.copy(built_out / "ftrace/nq_ftrace.ko", signed)
    sign(signed, *signing_key, debian.kdir)
    cases.append(GuestCase("nq_ftrace", "signed", signed))
    run = run_guest(debian.vmlinuz, debian.modules_dir, root, cases, tmp_path / "vm")
    assert run.done, run.console[-3000:]
    assert run.dep_failures == []
    assert [(c.module, c.variant) for c in run.cases] == [(c.module, c.variant) for c in cases]
    for case, res in zip(cases, run.cases, strict=True):
        hm = modules[case.module]
        assert res.insmod_rc == 0, res.insmod_output
        text = res.status_text
        assert f"running kernel: {debian.release}\n{case.module}: live\n" in text
        assert f"  strategy: {hm.strategy} (nqgen " in text and f"  target kernel: {debian.release}\n" in text
        params = sorted(k.rsplit("/", 1)[1] for k in res.sysfs if "/parameters/" in k)
        assert params == sorted(n for n, _ in hm.param_help)
        for name in params:
            assert f"{name}={res.sysfs[f'/sys/module/{case.module}/parameters/{name}']}" in text
        for counter in hm.counters:
            assert f" {counter}=" in text.split("  counters:")[1].split("\n")[0]
        if hm.unload == "livepatch":
            assert "  livepatch: enabled=1 transition=0\n" in text
        # Debian 6.1 carries the upstream fix: the status must say the mitigation is not needed
        assert res.status_rc == 1 and "carries the upstream fix (56b14ecec97f)" in text
        assert res.unload_rc == 0 and not res.still_loaded, res.unload_output
        py_text, py_rc = status(sysfs_tree(res.sysfs, tmp_path / f"sys-{case.module}-{case.variant}"),
                                root / "usr/share/nqgen", running=debian.release)  # fmt: skip

        def names_only(t: str) -> str:
            return "\n".join(" ".join(w.split("=")[0] for w in line.split()) if "counters:" in line else line
                             for line in t.splitlines())  # fmt: skip

        assert (names_only(py_text), py_rc) == (names_only(text), res.status_rc)
    assert run.final_status_rc == 3 and "no nqgen module is loaded" in run.final_status_text


# What busybox's insmod prints for EKEYREJECTED (strerror), and the kernel's own line for each refusal
# (kernel/module/signing.c: module_sig_check()).
KEY_REJECTED = "Key was rejected by service"


def _signature_cases(ko: Path, module: str, kdir: Path, test_key: tuple[Path, Path], other_key: tuple[Path, Path],
                     work: Path) -> list[GuestCase]:  # fmt: skip
    """unsigned, signed with a key the kernel does not trust, signed with the test key then altered, signed."""
    from nqgen.pkg.sign import is_signed, sign

    files = {v: work / f"{v}.ko" for v in ("unsigned", "other-key", "altered", "signed")}
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(ko, files["unsigned"])
    assert not is_signed(files["unsigned"])
    for variant, key in (("other-key", other_key), ("signed", test_key)):
        shutil.copy(ko, files[variant])
        sign(files[variant], *key, kdir)  # the kernel tree's own scripts/sign-file
    altered = bytearray(files["signed"].read_bytes())
    altered[len(altered) // 3] ^= 0x01  # one bit of the signed module changed after signing
    files["altered"].write_bytes(bytes(altered))
    return [GuestCase(module, v, f) for v, f in files.items()]


def _check_signature_verdicts(run: GuestRun, module: str, counters: tuple[str, ...]) -> None:
    assert run.done, run.console[-3000:]
    assert [c.variant for c in run.cases] == ["unsigned", "other-key", "altered", "signed"]
    unsigned, other, altered, loaded = run.cases
    for res in (unsigned, other, altered):
        assert res.insmod_rc != 0 and KEY_REJECTED in res.insmod_output, (res.variant, res.insmod_output)
        assert res.status_rc is None  # never got as far as loading
    assert "Loading of unsigned module is rejected" in unsigned.insmod_output
    assert "Loading of module with unavailable key is rejected" in other.insmod_output
    assert loaded.insmod_rc == 0, loaded.insmod_output
    assert f"{module}: live" in loaded.status_text
    assert loaded.sysfs[f"/sys/module/{module}/initstate"] == "live"
    assert {f"/sys/kernel/{module}/{c}" for c in counters} <= loaded.sysfs.keys()  # it runs: its counters are up
    assert loaded.unload_rc == 0 and not loaded.still_loaded, loaded.unload_output


@pytest.mark.vm
@needs_vm
def test_debian_kernel_trusting_the_test_key_through_uefi_db_loads_only_the_signed_module(
    debian: DebianKernel, built_out: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    """Debian's own kernel under OVMF whose db holds the test certificate, booted with module.sig_enforce=1:
    the firmware's db is how a Secure Boot host trusts a key (Debian loads it into the platform keyring and
    verifies modules against it). Unsigned, other-key and altered modules refused; the test-key one loads."""
    from nqgen.pkg import sigkernel, uefikeys
    from nqgen.pkg.guestcheck import run_guest

    test_key = sigkernel.test_key()
    firmware = uefikeys.boot_copy(uefikeys.firmware_trusting(test_key[1]), tmp_path / "vars.fd")
    hm = hostfiles.host_module(built_out, "ftrace")
    root = tmp_path / "hostroot"
    hostfiles.stage(hm, root, [], [])
    cases = _signature_cases(hm.ko, hm.module, debian.kdir, test_key, signing_key, tmp_path / "ko")
    # loglevel=6: the console also shows the keys the kernel loaded
    run = run_guest(debian.vmlinuz, debian.modules_dir, root, cases, tmp_path / "vm",
                    append="module.sig_enforce=1 loglevel=6", firmware=firmware)  # fmt: skip
    assert run.dep_failures == []  # Debian's own signed conntrack modules load
    assert "integrity: Loaded X.509 cert 'nqgen test module signing key: " in run.console
    _check_signature_verdicts(run, hm.module, hm.counters)


def test_status_script_is_posix_sh() -> None:
    script = ROOT / "generator/nqgen/pkg/nqgen-status.sh"
    for shell in ("sh", "/bin/busybox"):
        if shutil.which(shell) or Path(shell).is_file():
            args = [shell, "-n", str(script)] if shell == "sh" else [shell, "sh", "-n", str(script)]
            assert _run(args).returncode == 0


@pytest.mark.vm
@needs_vm
def test_an_enforcing_kernel_that_trusts_the_test_key_loads_the_signed_module_only(
    signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    """`make sig-kernel`: the reference kernel's source without KASAN, CONFIG_MODULE_SIG_FORCE and the test
    certificate in CONFIG_SYSTEM_TRUSTED_KEYS. One boot: unsigned, signed with another key, signed with the test
    key then altered: refused; signed with the test key (by `make -C out sign`): loads, runs and unloads."""
    from nqgen.pkg import sigkernel
    from nqgen.pkg.guestcheck import run_guest

    k = sigkernel.find_built()
    if k is None:
        pytest.skip("the signature-enforcing kernel is not built (make sig-kernel)")
    key, cert = sigkernel.key_paths()
    strategy = "advance-confirm-corrected"
    conntrack = k.modules_dir / "kernel/net/netfilter/nf_conntrack.ko"
    proc = run_nqgen(["--strategy", strategy, "--kdir", str(k.kdir), "--module", str(conntrack),
                      "--out", "out"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    build = _make(out)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    hm = hostfiles.host_module(out, strategy)
    cases = _signature_cases(hm.ko, hm.module, k.kdir, (key, cert), signing_key, tmp_path / "ko")
    signed = _make(out, "sign", f"KEY={key}", f"CERT={cert}")
    assert signed.returncode == 0, signed.stderr
    assert _run(["modinfo", "-F", "signer", str(hm.ko)]).stdout.strip() == "nqgen test module signing key"
    cases[-1] = dataclasses.replace(cases[-1], ko=hm.ko)  # the one `make sign` signed
    root = tmp_path / "hostroot"
    hostfiles.stage(hm, root, [], [])
    # loglevel=6: the console also shows the kernel's notice that it loaded the certificates into its keyring
    run = run_guest(k.image, k.modules_dir, root, cases, tmp_path / "vm", append="loglevel=6")
    cmdline = next(line for line in run.console.splitlines() if "command line:" in line.lower())
    assert "sig_enforce" not in cmdline  # enforcement is built in (CONFIG_MODULE_SIG_FORCE), not asked for
    assert "Loaded X.509 cert 'nqgen test module signing key: " in run.console
    assert run.dep_failures == []  # the kernel's own modules, signed at modules_install with its build key, load
    _check_signature_verdicts(run, hm.module, hm.counters)


def test_uefi_boot_passes_the_firmware_as_pflash_and_keeps_seabios_otherwise(tmp_path: Path) -> None:
    from nqgen.lab.qemu import QemuConfig, qemu_command

    plain = QemuConfig(kernel=tmp_path / "k", initrd=tmp_path / "i")
    uefi = QemuConfig(kernel=tmp_path / "k", initrd=tmp_path / "i", firmware=(tmp_path / "code", tmp_path / "vars"))
    assert not [a for a in qemu_command(plain, tmp_path / "c", tmp_path / "r") if "pflash" in a]
    assert [a for a in qemu_command(uefi, tmp_path / "c", tmp_path / "r") if "pflash" in a] == [
        f"if=pflash,format=raw,unit=0,readonly=on,file={tmp_path / 'code'}",
        f"if=pflash,format=raw,unit=1,file={tmp_path / 'vars'}",
    ]


def test_sig_kernel_inputs_are_the_reference_without_kasan_and_trust_the_test_key(tmp_path: Path) -> None:
    """Offline: what `make sig-kernel` would build, in a fresh cache (the key is made there, never in the repo)."""
    from nqgen import reprokernel
    from nqgen.errors import InputError
    from nqgen.kernels.kconfig import parse_config
    from nqgen.pkg import sigkernel

    try:
        ref = reprokernel.load_inputs()
    except InputError as exc:
        pytest.skip(str(exc))
    cache = tmp_path / "cache"
    assert sigkernel.find_built(cache) is None and not cache.exists()  # looking makes no key
    inputs = sigkernel.inputs(cache)
    key, cert = sigkernel.key_paths(cache)
    assert key.is_file() and cert.is_file() and key.parent.is_relative_to(cache)
    assert _run(["openssl", "x509", "-noout", "-subject", "-in", str(cert)]).stdout.strip() == (
        "subject=CN = nqgen test module signing key")
    want, have = parse_config(ref.fragment_text), parse_config(inputs.fragment_text)
    assert not [n for n in have if "KASAN" in n]
    assert {n: v for n, v in want.items() if "KASAN" not in n and n != "CONFIG_MODULE_SIG"}.items() <= have.items()
    for name in ("CONFIG_MODULE_SIG", "CONFIG_MODULE_SIG_FORCE", "CONFIG_MODULE_SIG_ALL", "CONFIG_MODULE_SIG_SHA256"):
        assert have[name] == "y"
    assert have["CONFIG_SYSTEM_TRUSTED_KEYS"] == f'"{cert}"'
    assert inputs.key != ref.key and inputs.patches == ref.patches
    assert sigkernel.inputs(cache).key == inputs.key  # the key is made once and reused
    assert sigkernel.find_built(cache) is None


def test_status_warns_about_another_kernel_and_a_foreign_module_file_in_sh_and_python(tmp_path: Path) -> None:
    """The warning branches the guest cannot reach (its module matches it): a tree laid out like sysfs."""
    sysfs, share = tmp_path / "sys", tmp_path / "share"
    for rel, value in {"module/nq_ftrace/initstate": "live", "module/nq_ftrace/srcversion": "AAAA",
                       "kernel/nq_ftrace/confirm_calls": "7", "module/nq_livepatch/initstate": "live"}.items():
        (sysfs / rel).parent.mkdir(parents=True, exist_ok=True)
        (sysfs / rel).write_text(value + "\n")  # fmt: skip
    share.mkdir()
    (share / "nq_ftrace.env").write_text("STRATEGY='ftrace'\nRELEASE='3.10.0-1160.el7.x86_64'\nFIX_PRESENT='0'\n"
                                         "SRCVERSION='BBBB'\nNQGEN_VERSION='0.1.0'\nUNLOAD='rmmod'\n")  # fmt: skip
    (share / "nq_livepatch.env").write_text("STRATEGY='livepatch'\nRELEASE='9.9.9'\nFIX_PRESENT='1'\n"
                                            "UNLOAD='livepatch'\n")  # fmt: skip
    env = {**os.environ, "NQGEN_SYSFS": str(sysfs), "NQGEN_SHARE": str(share), "NQGEN_RELEASE": "9.9.9"}
    sh = _run(["sh", str(ROOT / "generator/nqgen/pkg/nqgen-status.sh")], env=env)
    py_text, py_rc = status(sysfs, share, running="9.9.9")
    assert (sh.stdout, sh.returncode) == (py_text, py_rc)
    assert sh.returncode == 1
    assert "WARNING: nq_ftrace was generated for 3.10.0-1160.el7.x86_64, the running kernel is 9.9.9" in sh.stdout
    assert "WARNING: the loaded nq_ftrace (srcversion AAAA) is not the one nqgen installed (BBBB)" in sh.stdout
    assert "counters: confirm_calls=7" in sh.stdout
    assert "livepatch: not registered (disabled; the module can be removed)" in sh.stdout
    assert "WARNING: 9.9.9 already carries the upstream fix" in sh.stdout
