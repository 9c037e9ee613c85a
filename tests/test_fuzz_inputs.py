"""Hostile input to the readers test_fuzz.py does not cover (issue 12 part 3): everything else nqgen reads from
the user.

- the kernel release of a headers tree (``include/generated/utsrelease.h``, ``include/config/kernel.release``),
  which names ``/lib/modules/<release>`` and goes into every generated module's vermagic;
- the fleet target list (``nqgen --targets LIST``: one ``NAME --kdir PATH --module PATH ...`` per line, shell
  quoting, comments);
- a kernel source tree's ``EXPORT_SYMBOL*()`` declarations (``nqgen.srcexports``, read through grep);
- vendor packages (``--from-package``: tar/cpio/rpm/deb members through libarchive): nothing may be written
  outside the extraction directory, however the members' symbolic and hard links are arranged, and a bomb stops
  at the cap;
- oversized files where nqgen reads a header tree.

As in test_fuzz.py: each case ends in a correct result or an nqgen error with a one-line message (hypothesis
shrinks any other exception), under a watchdog and an address-space cap. ``NQGEN_FUZZ_EXAMPLES`` cases per reader.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nqgen import headers, srcexports, symsources
from nqgen.errors import InputError, NqgenError
from nqgen.fleet import targets as fleet_targets
from nqgen.pkg import archive, frompkg
from test_fuzz import FUZZ, bounded_memory, mutated, outcome, workdir
from test_headers import FIXTURES as HEADER_TREES

# --- the kernel release of a headers tree --------------------------------------------------------------------------

_RELEASE = st.from_regex(r"\A[0-9]\.[0-9]{1,2}(\.[0-9]{1,3})?[A-Za-z0-9._+~-]{0,40}\Z")


@given(_RELEASE, st.booleans())
@FUZZ
def test_fuzz_kernel_release_model(release: str, uts: bool) -> None:
    kdir = workdir()
    try:
        if uts:
            (kdir / "include/generated").mkdir(parents=True)
            (kdir / "include/generated/utsrelease.h").write_text(f'#define UTS_RELEASE "{release}"\n')
        else:
            (kdir / "include/config").mkdir(parents=True)
            (kdir / "include/config/kernel.release").write_text(release + "\n")
        assert outcome(lambda: symsources.kernel_release(kdir)) == release
    finally:
        shutil.rmtree(kdir, ignore_errors=True)


def test_fuzz_kernel_release_hostile() -> None:
    uts_seed = b'#define UTS_RELEASE "6.1.0-57-amd64"\n'
    rel_seed = b"4.18.0-147.el8.x86_64\n"
    kdir = workdir()
    (kdir / "include/generated").mkdir(parents=True)
    (kdir / "include/config").mkdir(parents=True)
    uts = kdir / "include/generated/utsrelease.h"
    rel = kdir / "include/config/kernel.release"

    @FUZZ
    @given(st.one_of(mutated(uts_seed).map(lambda d: (d, None)), mutated(rel_seed).map(lambda d: (None, d)),
                     st.tuples(st.none() | st.binary(max_size=200), st.binary(max_size=200))))  # fmt: skip
    def case(files: tuple[bytes | None, bytes | None]) -> None:
        for path, data in zip((uts, rel), files, strict=True):
            path.unlink(missing_ok=True)
            if data is not None:
                path.write_bytes(data)
        res = outcome(lambda: symsources.kernel_release(kdir))
        if isinstance(res, str):  # what uname -r can print: it becomes a path component and vermagic
            assert res and res.isprintable() and not any(c.isspace() for c in res) and "/" not in res, repr(res)
            assert len(res) <= 64 and res not in (".", "..")

    try:
        with bounded_memory():
            case()
    finally:
        shutil.rmtree(kdir, ignore_errors=True)


def test_a_release_with_a_newline_or_a_slash_is_refused(tmp_path: Path) -> None:
    """Regression: UTS_RELEASE "6.1\\n0" came back with its newline, "../../etc" as a path into /lib/modules."""
    (tmp_path / "include/generated").mkdir(parents=True)
    uts = tmp_path / "include/generated/utsrelease.h"
    for bad in ('"6.1\n0"', '"../../etc"', '"6.1 x"', '"' + "6" * 65 + '"'):
        uts.write_text(f"#define UTS_RELEASE {bad}\n")
        res = outcome(lambda: symsources.kernel_release(tmp_path))
        assert isinstance(res, InputError) and "not a kernel release string" in str(res), (bad, res)


# --- the fleet target list -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_base() -> Path:
    """A directory with one usable headers tree and module file, for list files to name."""
    base = workdir()
    shutil.copytree(HEADER_TREES / "6.1-src", base / "kdir")
    (base / "nf_conntrack.ko").write_bytes(b"\x7fELF")  # the list reader only assembles inputs
    (base / "dirtarget").mkdir()
    shutil.copytree(HEADER_TREES / "6.1-src", base / "dirtarget" / "build")
    (base / "dirtarget" / "nf_conntrack.ko").write_bytes(b"\x7fELF")
    return base


_NAME = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,20}\Z")


@given(st.lists(st.tuples(_NAME, st.booleans(), st.sampled_from(["", "  # a comment", "\t"])), min_size=1,
                max_size=12, unique_by=lambda t: t[0]))  # fmt: skip
@FUZZ
def test_fuzz_targets_list_model(fleet_base: Path, rows: list[tuple[str, bool, str]]) -> None:
    lines = ["# fleet", ""]
    for name, as_dir, tail in rows:
        if as_dir:
            lines.append(f"{name} dirtarget{tail}")
        else:
            lines.append(f"{shlex.quote(name)} --kdir 'kdir' --module nf_conntrack.ko{tail}")
    spec = fleet_base / "list"
    spec.write_text("\n".join(lines) + "\n")
    got = outcome(lambda: fleet_targets.load(spec))
    assert isinstance(got, list), got
    assert [t.name for t in got] == [r[0] for r in rows]
    for t in got:
        assert t.problem is None, t
        assert t.inputs.kdir is not None and t.inputs.kdir.is_dir() and t.inputs.modules


_LIST_TOKENS = [
    "t1", "t2", "a.b", "-x", "../up", "bad/name", "--kdir", "--module", "--config", "--symvers", "--vmlinux",
    "--system-map", "--kallsyms", "--bogus", "kdir", "nf_conntrack.ko", "dirtarget", "missing", "/", "/dev/null",
    "..", ".", "'", '"', "\\", "#", " ", "\t", "''", "x\x00y", "é", "\udcff", "$HOME", "~",
]  # fmt: skip


def test_fuzz_targets_list_hostile(fleet_base: Path) -> None:
    spec = fleet_base / "hostile-list"
    seed = b"k1 --kdir kdir --module nf_conntrack.ko\nk2 dirtarget\n# c\nk3 --kdir kdir --module nf_conntrack.ko\n"
    token_lines = st.lists(st.lists(st.sampled_from(_LIST_TOKENS), max_size=8).map(" ".join), min_size=1,
                           max_size=6).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogateescape"))  # fmt: skip

    @FUZZ
    @given(st.one_of(mutated(seed), token_lines, st.binary(max_size=400)))
    def case(data: bytes) -> None:
        spec.write_bytes(data)
        got = outcome(lambda: fleet_targets.load(spec))
        if isinstance(got, NqgenError):  # UsageError (exit 2) for a malformed list, one line (checked by outcome)
            return
        names = [t.name for t in got]
        assert got and len(set(names)) == len(names)
        for t in got:
            assert fleet_targets.NAME_RE.match(t.name), t.name
            if t.problem is not None:
                assert "\n" not in t.problem, t.problem
            else:
                assert t.inputs.kdir is not None and t.inputs.kdir.is_dir() and t.inputs.modules, t

    with bounded_memory():
        case()


# --- EXPORT_SYMBOL declarations of a source tree ---------------------------------------------------------------------


def _source_tree(root: Path, module_c: bytes, dev_c: bytes) -> None:
    for rel, data in (("kernel/module.c", module_c), ("net/core/dev.c", dev_c)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


_C_IDENT = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,30}\Z")


@given(st.sets(_C_IDENT, min_size=1, max_size=30), st.sampled_from(["EXPORT_SYMBOL", "EXPORT_SYMBOL_GPL",
                                                                     "EXPORT_SYMBOL_NS_GPL"]))  # fmt: skip
@FUZZ
def test_fuzz_source_exports_model(names: set[str], macro: str) -> None:
    root = workdir()
    try:
        ns = ", NET" if macro.endswith("NS_GPL") else ""
        body = "".join(f"int {n}(void) {{ return 0; }}\n{macro}({n}{ns});\n" for n in sorted(names))
        _source_tree(root, body.encode(), b"/* nothing exported here */\n")
        res = outcome(lambda: srcexports.scan(root))
        assert isinstance(res, srcexports.SourceExports), res
        assert res.names == names and not res.prefixes
        assert all(res.declares(n) for n in names)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_fuzz_source_exports_hostile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LC_ALL", "C")  # the caller's locale must not matter (grep matches bytes in C)
    seed = b"".join(b"EXPORT_SYMBOL_GPL(sym_%d);\nEXPORT_SYMBOL(param_ops_##name);\n" % i for i in range(20))
    root = workdir()
    _source_tree(root, seed, seed)

    @FUZZ
    @given(st.one_of(mutated(seed), st.binary(max_size=1024)), st.binary(max_size=64))
    def case(data: bytes, extra: bytes) -> None:
        _source_tree(root, data, b"EXPORT_SYMBOL(" + extra + b")\n")
        res = outcome(lambda: srcexports.scan(root))
        if isinstance(res, srcexports.SourceExports):
            assert all(n.isidentifier() for n in res.names), res.names

    try:
        with bounded_memory():
            case()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_undecodable_bytes_in_a_source_tree_are_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: grep's output was decoded strictly, so under LC_ALL=C (grep then matches bytes) one Latin-1 byte
    inside EXPORT_SYMBOL() raised UnicodeDecodeError."""
    monkeypatch.setenv("LC_ALL", "C")
    _source_tree(tmp_path, b"EXPORT_SYMBOL(caf\xe9);\nEXPORT_SYMBOL_GPL(fine);\n", b"")
    res = outcome(lambda: srcexports.scan(tmp_path))
    assert isinstance(res, srcexports.SourceExports) and "fine" in res.names, res


# --- vendor packages: members written below one directory, never elsewhere ----------------------------------------

_MEMBER_PATHS = ["usr/src/t", "usr/src/t/Makefile", "usr/src/t/include", "usr/src/t/include/x.h", "usr/src/up",
                 "usr/src/up/escape", "usr/src/abs", "usr/src/abs/escape", "usr/src/t/../../../escape",
                 "/usr/src/t/y", "boot/config-1", "usr/src/loop", "usr/src/loop/z"]  # fmt: skip
_LINK_TARGETS = ["/", "..", "../..", "../../..", "../../../outside", "OUTSIDE", "t", "t/include", "/etc",
                 "usr/src/t/Makefile", "boot/config-1", "loop", "../../../outside/victim"]  # fmt: skip


@st.composite
def _tar_members(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    """(kind, name, link target or content) members; OUTSIDE is replaced by a directory outside the extraction."""
    kinds = st.sampled_from(["file", "dir", "symlink", "hardlink"])
    return draw(st.lists(st.tuples(kinds, st.sampled_from(_MEMBER_PATHS), st.sampled_from(_LINK_TARGETS)),
                         min_size=1, max_size=10))  # fmt: skip


def _tar(members: list[tuple[str, str, str]], outside: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for kind, name, target in members:
            info = tarfile.TarInfo(name)
            target = target.replace("OUTSIDE", str(outside))
            data = b""
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, target
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, target
            else:
                data = b"content of " + name.encode() + b"\n"
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _nothing_outside(outside: Path) -> None:
    assert [p.name for p in outside.iterdir()] == ["victim"], sorted(outside.iterdir())
    assert (outside / "victim").read_bytes() == b"precious\n"


def test_fuzz_package_members() -> None:
    top = workdir()
    outside = top / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious\n")
    pkg = top / "pkg.tar"

    @FUZZ
    @given(st.one_of(_tar_members().map(lambda m: _tar(m, outside)), mutated(_tar(
        [("dir", "usr/src/t", ""), ("symlink", "usr/src/up", "../.."), ("file", "usr/src/t/Makefile", "")],
        outside), header_bias=512)))  # fmt: skip
    def case(data: bytes) -> None:
        dest = top / "dest"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        pkg.write_bytes(data)
        res = outcome(lambda: archive.extract(pkg, dest, frompkg.wanted))
        _nothing_outside(outside)
        if isinstance(res, archive.Extracted):
            for rel in res.files:
                path = dest / rel
                assert archive._inside(dest, path) and path.is_file(), rel

    try:
        with bounded_memory():
            case()
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_member_below_a_link_out_of_the_tree_is_refused(tmp_path: Path) -> None:
    """Regression: "usr/src/x -> /outside" then "usr/src/x/victim" wrote through the link, outside the cache."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious\n")
    pkg = tmp_path / "evil.tar"
    pkg.write_bytes(_tar([("symlink", "usr/src/abs", str(outside)), ("file", "usr/src/abs/victim", "")], outside))
    dest = tmp_path / "dest"
    dest.mkdir()
    res = outcome(lambda: archive.extract(pkg, dest, frompkg.wanted))
    assert isinstance(res, InputError) and "symbolic link that leaves" in str(res), res
    _nothing_outside(outside)
    pkg.write_bytes(_tar([("hardlink", "usr/src/t/shadow", str(outside / "victim"))], outside))
    res = outcome(lambda: archive.extract(pkg, dest, frompkg.wanted))
    assert isinstance(res, InputError), res  # a hard link to a file outside is not made either
    assert not (dest / "usr/src/t/shadow").exists()


def test_a_package_bomb_stops_at_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64 MiB member of zeros in a tiny compressed package: refused at the cap (16 MiB here), not written on."""
    monkeypatch.setenv(symsources.CAP_ENV, "16")
    pkg = tmp_path / "bomb.tar.xz"
    with tarfile.open(pkg, "w:xz", preset=0) as tf:
        info = tarfile.TarInfo("usr/src/t/zeros.h")
        info.size = 64 << 20
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    assert pkg.stat().st_size < 1 << 20
    dest = tmp_path / "dest"
    dest.mkdir()
    with bounded_memory():
        res = outcome(lambda: archive.extract(pkg, dest, frompkg.wanted))
    assert isinstance(res, InputError) and "expands to more than 16 MiB" in str(res), res
    assert (dest / "usr/src/t/zeros.h").stat().st_size <= 17 << 20


# --- header trees: a file far larger than any kernel source --------------------------------------------------------


def test_an_oversized_header_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a sparse 4 GiB netfilter.h was read whole (a MemoryError under the cap, an OOM without)."""
    monkeypatch.setenv("NQGEN_NO_CACHE", "1")
    kdir = tmp_path / "kdir"
    shutil.copytree(HEADER_TREES / "6.1-src", kdir)
    with open(kdir / headers.NETFILTER_H, "r+b") as fh:
        fh.truncate(4 << 30)
    with bounded_memory():
        res = outcome(lambda: headers.scan(headers.locate(kdir)))
    assert isinstance(res, InputError) and "larger than 16 MiB" in str(res), res
    os.truncate(kdir / headers.NETFILTER_H, 0)


def test_a_damaged_hook_typedef_is_quoted_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (make fuzz, 5.15 tree): a netfilter.h whose nf_hookfn typedef swallowed the next 1500 characters
    was quoted whole in the one-line error; now the quote stops at 160 characters."""
    monkeypatch.setenv("NQGEN_NO_CACHE", "1")
    kdir = tmp_path / "kdir"
    shutil.copytree(HEADER_TREES / "5.15", kdir)
    header = kdir / headers.NETFILTER_H
    junk = "struct sk_buff *skb, " * 100
    text, n = re.subn(r"typedef\s+unsigned\s+int\s+nf_hookfn\([^;]*;",
                      f"typedef unsigned int nf_hookfn(void *priv, {junk}int (*okfn)(struct sk_buff *));",
                      header.read_text(), count=1)  # fmt: skip
    assert n == 1
    header.write_text(text)
    res = outcome(lambda: headers.scan(headers.locate(kdir)))
    assert isinstance(res, NqgenError) and len(str(res)) < 600, (len(str(res)), res)
