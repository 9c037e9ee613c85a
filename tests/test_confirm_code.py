"""Decisions taken from the conntrack module's own code, not from one header declaration or a version.

- G1 (the corrected confirm leaves helpers to their own hook) only when the ops array has a helper hook at
  NF_IP_PRI_CONNTRACK_HELPER, G2/G3 only when it has none; a tree where the two disagree is refused.
- The VRF check of 8e0538d8ee06 is read from the confirm function's machine code (a backport below 5.16
  included), on the compiled fixtures of tests/fixtures/gen and on Debian's own nf_conntrack.ko.
- The okfn hook form needs 'const struct nf_hook_ops *' first: upstream 3.10-3.12 start with the hook number.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import DebianKernel, run_nqgen
from elffixtures import build_module
from nqgen import elfread, errors, probe
from test_generations import G1_SRC, G2_SRC, G3_SRC, vermagic
from test_headers import FIXTURES as HEADER_TREES
from test_headers import probe as probe_headers

IFF_L3MDEV_MASTER_BIT = 18  # Debian 6.1 include/linux/netdevice.h


def nqgen(args: list[str], cwd: Path) -> tuple[int, str, str]:
    proc = run_nqgen(args, cwd, env={"XDG_CACHE_HOME": str(cwd / "cache")})
    return proc.returncode, proc.stdout, proc.stderr


def profile(kdir: Path, module: Path, cwd: Path) -> dict[str, object]:
    rc, stdout, stderr = nqgen(["--profile-only", "--kdir", str(kdir), "--module", str(module)], cwd)
    assert rc == 0, stderr
    data: dict[str, object] = json.loads(stdout)
    return data


def evidence(data: dict[str, object], name: str) -> str:
    features = data["features"]
    assert isinstance(features, dict)
    return next(line for line in features["evidence"] if line.startswith(name + "="))


# --- G1 <=> helper hook at NF_IP_PRI_CONNTRACK_HELPER -------------------------------------------------------


def test_static_nf_confirm_without_helper_hook_is_refused_not_classed_g1(tmp_path: Path) -> None:
    """Upstream 5.1-5.2: nf_confirm is static (no declaration in the headers) and runs the helpers; no helper hook."""
    ko = build_module(tmp_path, G2_SRC, "nf_conntrack.ko", ("-DNF_CONFIRM_STATIC", vermagic("4.19.1")))
    rc, stdout, stderr = nqgen(["--profile-only", "--kdir", str(HEADER_TREES / "4.19"), "--module", str(ko)], tmp_path)
    assert rc == 77, stdout + stderr
    assert "headers say G1" in stderr and "no helper hook at NF_IP_PRI_CONNTRACK_HELPER" in stderr
    assert len(stderr.strip().splitlines()) <= 2  # one-line error (and at most one warning line)
    rc, stdout, stderr = nqgen(
        ["--strategy", "all", "--kdir", str(HEADER_TREES / "4.19"), "--module", str(ko), "--out", str(tmp_path / "o")],
        tmp_path,
    )
    assert rc == 77 and not (tmp_path / "o").exists(), stdout + stderr


def test_helper_hook_beside_a_declared_nf_confirm_is_refused(tmp_path: Path) -> None:
    """G2 headers but the module still registers the helper hook: the corrected confirm would run helpers twice."""
    ko = build_module(tmp_path, G1_SRC, "nf_conntrack.ko", (vermagic("5.4.196"),))
    rc, stdout, stderr = nqgen(["--profile-only", "--kdir", str(HEADER_TREES / "5.4"), "--module", str(ko)], tmp_path)
    assert rc == 77, stdout + stderr
    assert "headers say G2" in stderr and "run it twice" in stderr and "ipv4_helper@POST_ROUTING" in stderr


@pytest.mark.parametrize(
    ("tree", "source", "cflags"),
    [("4.19", G1_SRC, ("-DKSYMTAB_PREL", vermagic("4.19.1"))), ("5.4", G2_SRC, (vermagic("5.4.196"),))],
)
def test_agreeing_ops_array_is_shown_as_evidence(
    tree: str, source: Path, cflags: tuple[str, ...], tmp_path: Path
) -> None:
    ko = build_module(tmp_path, source, "nf_conntrack.ko", cflags)
    line = evidence(profile(HEADER_TREES / tree, ko, tmp_path), "confirm_generation")
    assert "ops array helper hooks at 300" in line and line.endswith("(agrees)"), line


# --- the VRF check, from the code ---------------------------------------------------------------------------


@pytest.mark.parametrize("vrf", [True, False])
def test_vrf_backport_below_516_is_read_from_the_module(vrf: bool, tmp_path: Path) -> None:
    """A 5.10 header-only tree (version < 5.16) with a module that carries a backport of 8e0538d8ee06, or not."""
    cflags = (vermagic("5.10.119"), *(("-DVRF_CHECK",) if vrf else ()))
    ko = build_module(tmp_path, G2_SRC, "nf_conntrack.ko", cflags)
    data = profile(HEADER_TREES / "5.10", ko, tmp_path)
    features = data["features"]
    assert isinstance(features, dict)
    assert features["confirm_has_vrf_check"] is vrf
    assert "nf_conntrack.ko ipv4_confirm()" in evidence(data, "confirm_has_vrf_check")
    assert "disassembled" in evidence(data, "confirm_has_vrf_check")


def test_g3_nf_confirm_vrf_test_is_read_from_the_module(tmp_path: Path) -> None:
    ko = build_module(tmp_path, G3_SRC, "nf_conntrack.ko", (vermagic("6.6.87", True),))
    image = elfread.load_module(ko)
    target = probe.collect_symbol_facts(probe.ProfileInputs(modules=[ko])).confirm["ipv4"]
    facts = probe.confirm_code_facts(image, target)
    assert facts.where == "nf_conntrack.ko nf_confirm()"
    assert any(IFF_L3MDEV_MASTER_BIT in bits for bits in facts.l3mdev_bits)


def test_debian_module_carries_the_vrf_test(debian: DebianKernel, tmp_path: Path) -> None:
    """Debian 6.1's real ipv4_confirm tests IFF_L3MDEV_MASTER after the POST_ROUTING compare; the decision
    comes from that code even where the headers say nothing (a header-only 5.10 tree here)."""
    facts = probe.collect_symbol_facts(probe.ProfileInputs(modules=[debian.nf_conntrack])).code
    assert facts.where.endswith("ipv4_confirm()")
    assert any(IFF_L3MDEV_MASTER_BIT in bits for bits in facts.l3mdev_bits)
    line = evidence(profile(debian.kdir, debian.nf_conntrack, tmp_path), "confirm_has_vrf_check")
    assert "IFF_L3MDEV_MASTER (1 << 18" in line and "=true" in line, line
    rc, stdout, stderr = nqgen(
        ["--profile-only", "--kdir", str(HEADER_TREES / "5.10"), "--module", str(debian.nf_conntrack)], tmp_path
    )
    assert rc == 0, stderr
    assert json.loads(stdout)["features"]["confirm_has_vrf_check"] is True


def test_g1_module_has_no_vrf_test(tmp_path: Path) -> None:
    ko = build_module(tmp_path, G1_SRC, "nf_conntrack.ko", ("-DKSYMTAB_ABS", vermagic("4.18.0-240.el8.x86_64")))
    facts = probe.collect_symbol_facts(probe.ProfileInputs(modules=[ko])).code
    assert facts.l3mdev_bits == () and not facts.vrf_symbol
    assert facts.helper_hooks == ("ipv4_helper@POST_ROUTING", "ipv4_helper@LOCAL_IN")


# --- the okfn hook form ---------------------------------------------------------------------------------------


def test_hooknum_first_okfn_typedef_is_refused(tmp_path: Path) -> None:
    """Upstream 3.10-3.12: nf_hookfn(unsigned int hooknum, skb, in, out, okfn); nqgen's okfn hooks take the ops."""
    kdir = tmp_path / "kdir"
    shutil.copytree(HEADER_TREES / "rhel7-early", kdir)
    nf = kdir / "include/linux/netfilter.h"
    text = nf.read_text()
    old = "typedef unsigned int nf_hookfn(const struct nf_hook_ops *ops,"
    assert old in text
    nf.write_text(text.replace(old, "typedef unsigned int nf_hookfn(unsigned int hooknum,"))
    with pytest.raises(errors.NotApplicableError, match="unsigned int hooknum"):
        probe_headers(kdir)
    assert probe_headers(HEADER_TREES / "rhel7-early").hookfn_form == "okfn"
