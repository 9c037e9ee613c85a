"""The RHEL header fixtures against the real trees they model (each test skips when its tree is absent).

The fixtures under tests/fixtures/headers/rhel7.7, rhel8.1 and rhel8.3 are small trees written by hand from the
real RHEL sources; every generation test of nqgen stands on them. Here each is compared with its real tree:
- every API decision nqgen derives (``probe_features``) is the same from the fixture as from the real files, given
  the same exports, module symbols and configuration (so only the headers differ);
- every header fact the fixture can show is the one the real tree shows; where the fixture leaves a file out
  (``net/netfilter/core.c``, ``netns/netfilter.h``, the confirm's C source) the decision it infers instead must
  still equal the one read from the real file (first point);
- every identifier of a fixture header occurs in the real header of the same path (a fixture invents nothing);
- every name in the fixture's ``Module.symvers`` is declared exported (``EXPORT_SYMBOL*``) in the real tree.

Real trees: the unpacked sources of the kernel builder (``$NQGEN_CACHE/src/rhel77``, ``src/rhel81``) or, when
absent, the bare git snapshots the issue names (RHEL 8.3 exists only as one: headers and C, no build files).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from nqgen import headers
from nqgen.profile import ConfigFlags

FIXTURES = Path(__file__).parent / "fixtures" / "headers"
CACHE = Path(os.environ.get("NQGEN_CACHE", "/var/cache/nqgen"))
MIRROR = Path("/work/.mirror")
ARCH_FTRACE_H = "arch/x86/include/asm/ftrace.h"


@dataclass(frozen=True)
class RealTree:
    source: Path | None  # an unpacked tree
    gitdir: Path  # a bare git snapshot, used when ``source`` is absent
    commit: str

    def available(self) -> str | None:
        """Why the tree cannot be read here, or None."""
        if self.source is not None and (self.source / headers.NETFILTER_H).is_file():
            return None
        if self.gitdir.is_dir() and shutil.which("git"):
            return None
        return f"neither {self.source} nor the git snapshot {self.gitdir} is here"

    def read(self, rel: str) -> bytes | None:
        if self.source is not None and (self.source / headers.NETFILTER_H).is_file():
            path = self.source / rel
            return path.read_bytes() if path.is_file() else None
        proc = subprocess.run(["git", f"--git-dir={self.gitdir}", "show", f"{self.commit}:{rel}"],
                              capture_output=True, check=False)
        return proc.stdout if proc.returncode == 0 else None

    def exporting_files(self, names: list[str]) -> dict[str, set[str]]:
        """For each of ``names`` that the tree declares exported (``EXPORT_SYMBOL*``), the files declaring it.
        Only kernel/ and net/ are searched: every export the fixtures list lives there (searching the whole of
        a bare git snapshot takes a minute)."""
        alternatives = "|".join(re.escape(n) for n in names)
        pattern = rf"EXPORT_SYMBOL[A-Z_]*[[:space:]]*\([[:space:]]*({alternatives})[[:space:]]*\)"
        if self.source is not None and (self.source / headers.NETFILTER_H).is_file():
            cmd = ["grep", "-roE", "--include=*.c", "--include=*.h", pattern, "kernel", "net"]
            cwd: Path | None = self.source
        else:
            cmd = ["git", f"--git-dir={self.gitdir}", "grep", "-oE", pattern, self.commit, "--", "kernel", "net"]
            cwd = None
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
        assert proc.returncode in (0, 1), proc.stderr
        found: dict[str, set[str]] = {}
        for line in proc.stdout.splitlines():
            path, _, decl = line.removeprefix(f"{self.commit}:").rpartition(":")
            if m := re.search(r"\(\s*(\w+)\s*\)", decl):
                found.setdefault(m.group(1), set()).add(path)
        return found


REAL = {
    "rhel7.7": RealTree(CACHE / "src/rhel77", MIRROR / "dcui+RHEL77/repo", "HEAD"),
    "rhel8.1": RealTree(CACHE / "src/rhel81", MIRROR / "cai-fuqiang+linux-4.18.0-147/repo", "17d780554"),
    "rhel8.3": RealTree(None, MIRROR / "dongzhiyan-stack+linux-4.18.0-240.el8/repo", "HEAD"),
}
# the G1 l3proto/conntrack module symbols every RHEL generation has (the same for fixture and real tree)
MODULE_SYMBOLS = frozenset({"ipv4_confirm", "ipv6_confirm", "nf_conntrack_l3proto_ipv4"})


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _real(generation: str) -> RealTree:
    tree = REAL[generation]
    if why := tree.available():
        pytest.skip(f"{generation}: {why}")
    return tree


def _copy_real(generation: str, tree: RealTree, dest: Path) -> Path:
    """The files nqgen reads, taken from the real tree; the fixture's .config (a source tree has none)."""
    for rel in (*headers.HEADER_FILES, ARCH_FTRACE_H):
        if rel == headers.DOT_CONFIG:
            continue
        data = tree.read(rel)
        if data is not None:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(data)
    shutil.copy(FIXTURES / generation / headers.DOT_CONFIG, dest / headers.DOT_CONFIG)
    return dest


def _exports(kdir: Path) -> dict[str, str]:
    """name -> owning module, from the fixture's Module.symvers (crc, name, module, kind)."""
    rows = [line.split("\t") for line in (kdir / "Module.symvers").read_text().splitlines() if "\t" in line]
    return {row[1]: row[2] for row in rows}


def _config(kdir: Path) -> ConfigFlags:
    text = (kdir / headers.DOT_CONFIG).read_text()
    return ConfigFlags(ftrace_with_regs=True, ftrace_with_args=False, kprobes=True,
                       livepatch="\nCONFIG_LIVEPATCH=y\n" in text, ct_events=True, ct_procfs=True, modules=True,
                       module_sig_force=False, x86_ibt=False, cfi_clang=False, kasan=False, known=True)


@pytest.mark.parametrize("generation", sorted(REAL))
def test_fixture_derives_what_the_real_tree_does(generation: str, tmp_path: Path) -> None:
    tree = _real(generation)
    fixture = FIXTURES / generation
    real = _copy_real(generation, tree, tmp_path / "real")
    exports = frozenset(_exports(fixture))
    got = {
        name: headers.probe_features(kdir, exports=exports, module_symbols=MODULE_SYMBOLS, config=_config(fixture))
        for name, kdir in (("fixture", fixture), ("real", real))
    }
    fields = [f.name for f in dataclasses.fields(got["real"]) if f.name != "evidence"]
    differ = {f: (getattr(got["fixture"], f), getattr(got["real"], f)) for f in fields
              if getattr(got["fixture"], f) != getattr(got["real"], f)}
    assert differ == {}, f"{generation}: fixture vs real tree (decision: (fixture, real)): {differ}"
    # the real tree decides NF_STOP from nf_hook_slow()'s code, which the fixtures leave out
    real_evidence = "\n".join(got["real"].evidence)
    assert "net/netfilter/core.c nf_hook_slow()" in real_evidence


@pytest.mark.parametrize("generation", sorted(REAL))
def test_fixture_header_facts_are_the_real_ones(generation: str, tmp_path: Path) -> None:
    tree = _real(generation)
    real = _copy_real(generation, tree, tmp_path / "real")
    facts = {name: headers.scan(headers.locate(kdir)) for name, kdir in (("fixture", FIXTURES / generation),
                                                                        ("real", real))}
    differ = {}
    for f in dataclasses.fields(facts["fixture"]):
        fixture_value, real_value = getattr(facts["fixture"], f.name), getattr(facts["real"], f.name)
        if f.name in ("files", "vrf_source") or fixture_value is None:
            continue  # what the fixture read / a file it leaves out (its inference is checked above)
        if fixture_value != real_value:
            differ[f.name] = (fixture_value, real_value)
    assert differ == {}, f"{generation}: header facts (fixture, real) differ: {differ}"


_IDENTIFIER = re.compile(r"\b[A-Za-z_]\w*\b")


@pytest.mark.parametrize("generation", sorted(REAL))
def test_fixture_headers_invent_nothing(generation: str) -> None:
    tree = _real(generation)
    fixture = FIXTURES / generation
    invented = {}
    for path in sorted(fixture.rglob("*.h")):
        rel = path.relative_to(fixture).as_posix()
        if rel.startswith("include/generated/"):
            continue  # produced by a build: a source tree has none
        data = tree.read(rel)
        assert data is not None, f"{generation}: the real tree has no {rel}"
        ours = set(_IDENTIFIER.findall(headers.strip_comments(path.read_text())))
        theirs = set(_IDENTIFIER.findall(headers.strip_comments(data.decode("utf-8", "replace"))))
        if ours - theirs:
            invented[rel] = sorted(ours - theirs)
    assert invented == {}, f"{generation}: identifiers not in the real headers: {invented}"


@pytest.mark.parametrize("generation", sorted(REAL))
def test_fixture_exports_are_declared_in_the_real_tree(generation: str) -> None:
    tree = _real(generation)
    owners = _exports(FIXTURES / generation)
    assert owners
    found = tree.exporting_files(sorted(owners))
    wrong = {}
    for name, owner in owners.items():
        files = found.get(name, set())
        # a module's export is declared in that module's directory (vmlinux: anywhere built in)
        where = "" if owner == "vmlinux" else owner.rpartition("/")[0] + "/"
        if not any(f.startswith(where) for f in files):
            wrong[name] = (owner, sorted(files))
    assert wrong == {}, f"{generation}: Module.symvers fixture vs real exports (owner, declared in): {wrong}"
