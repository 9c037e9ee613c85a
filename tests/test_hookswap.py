"""hook-swap: which kernels it is generated for, and its two lab scenarios on the real Debian kernel.

The ``race`` scenario holds hook registrations in init_net between the copy of the table (the confirm slot
holding hook-swap's pointer) and its publication while the module unloads; the ``window`` scenario enables
conntrack in fresh network namespaces and measures how long the new confirm slot runs the original.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import DebianBuilt, DebianKernel, run_nqgen
from elffixtures import build_module
from nqgen.lab.guest import GuestModule
from nqgen.lab.hookswap import Kind, Scenario, render_init, run_scenario
from nqgen.lab.kernel import default_cache_dir, resolve_image
from nqgen.lab.manifest import discover
from nqgen.lab.runner import LabConfig
from test_headers import FIXTURES as HEADER_TREES

G1_SRC = Path(__file__).parent / "fixtures" / "gen" / "nf_conntrack_g1.c"
NETNS_4_14 = """/* struct netns_nf as in upstream v4.14 include/net/netns/netfilter.h (other members omitted) */
struct netns_nf {
	struct nf_hook_entries __rcu *hooks[NFPROTO_NUMPROTO][NF_MAX_HOOKS];
};
"""
NETNS_4_19 = """/* struct netns_nf as in upstream v4.19 include/net/netns/netfilter.h (other members omitted) */
struct netns_nf {
	struct nf_hook_entries __rcu *hooks_ipv4[NF_INET_NUMHOOKS];
	struct nf_hook_entries __rcu *hooks_ipv6[NF_INET_NUMHOOKS];
};
"""


def _tree(tmp_path: Path, version: tuple[int, int, int], netns: str | None) -> Path:
    """The 4.19 fixture tree relabelled as ``version``, with or without include/net/netns/netfilter.h."""
    kdir = tmp_path / "kdir"
    shutil.copytree(HEADER_TREES / "4.19", kdir)
    release = ".".join(map(str, version))
    (kdir / "Makefile").write_text(
        f"VERSION = {version[0]}\nPATCHLEVEL = {version[1]}\nSUBLEVEL = {version[2]}\nEXTRAVERSION =\n"
    )
    (kdir / "include/config/kernel.release").write_text(release + "\n")
    (kdir / "include/generated/utsrelease.h").write_text(f'#define UTS_RELEASE "{release}"\n')
    if netns is not None:
        (kdir / "include/net/netns").mkdir(parents=True)
        (kdir / "include/net/netns/netfilter.h").write_text(netns)
    return kdir


def _generate(tmp_path: Path, kdir: Path, release: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "mod").mkdir()
    vermagic = f'-DVERMAGIC="{release} SMP mod_unload modversions "'
    ko = build_module(tmp_path / "mod", G1_SRC, "nf_conntrack.ko", ("-DKSYMTAB_PREL", vermagic))
    return run_nqgen(
        ["--strategy", "hook-swap", "--kdir", str(kdir), "--module", str(ko), "--out", str(tmp_path / "out")],
        tmp_path,
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )


@pytest.mark.parametrize("netns", [NETNS_4_14, None], ids=["netns-header", "version-only"])
def test_hook_swap_is_refused_where_hooks_are_per_pf_arrays(tmp_path: Path, netns: str | None) -> None:
    kdir = _tree(tmp_path, (4, 14, 1), netns)
    proc = _generate(tmp_path, kdir, "4.14.1")
    assert proc.returncode == 77, proc.stdout + proc.stderr
    assert "hooks[pf][hooknum] (4.9-4.15)" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_hook_swap_is_generated_where_netns_has_hooks_ipv4(tmp_path: Path) -> None:
    kdir = _tree(tmp_path, (4, 19, 1), NETNS_4_19)
    proc = _generate(tmp_path, kdir, "4.19.1")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "out/hook-swap/hook_swap.c").read_text()
    assert "net->nf.hooks_ipv4[hooknum]" in text and "nf_hook_entries_grow" in text
    profile = (tmp_path / "out/profile.json").read_text()
    assert "include/net/netns/netfilter.h has hooks_ipv4[]" in profile


def test_scenario_init_scripts_are_valid_shell() -> None:
    deps = (GuestModule("nf_conntrack", "/lib/modules/r/nf_conntrack.ko", "dep"),)
    helper = GuestModule("nqlab_ct", "/nqlab/nqlab_ct.ko", "helper", ("queue=-1",))
    mit = GuestModule("nq_hook_swap", "/nqlab/nq_hook_swap.ko", "mitigation", ("interval_ms=200",))
    kinds: tuple[Kind, ...] = ("race", "window", "unmatched")
    for kind in kinds:
        text = render_init(Scenario(kind=kind), deps, helper, mit)
        proc = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "interval_ms=200" in text and "nqlab_hookrace" in text
        assert ("load helper nqlab_ct" in text) == (kind != "unmatched")


# ---- real boots ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(debian: DebianKernel, debian_built: DebianBuilt) -> tuple[Path, LabConfig]:
    if shutil.which("qemu-system-x86_64") is None or not Path("/bin/busybox").is_file():
        pytest.skip("needs qemu-system-x86_64 and busybox-static")
    out = debian_built.out  # conftest: every strategy generated and built once for the session (read only here)
    image = resolve_image(debian.vmlinuz, default_cache_dir())
    cfg = LabConfig(kernel=image, modules_dir=debian.modules_dir, kdir=debian.kdir, memory="512M", timeout=400)
    return out, cfg


@pytest.mark.vm
def test_unload_leaves_no_pointer_into_freed_text_while_registrations_are_held(
    built: tuple[Path, LabConfig],
) -> None:
    out, cfg = built
    (manifest,) = discover(out, ("hook-swap",))
    result = run_scenario(cfg, manifest, Scenario(kind="race", cycles=2))
    d = result.to_dict()
    assert result.exercised, d  # registrations were held between copy and publish across the unloads
    assert len(result.cycles) == 2 and all(c["watched"] > 0 for c in result.cycles), d
    assert not result.problems, d  # no stale pointer, no page fault on the health flow
    # the pass after the barrier found the slot the held registration had copied
    assert any(c["passes"] >= 3 for c in result.cycles), d


@pytest.mark.vm
def test_a_new_conntrack_registration_never_runs_the_original_confirm(built: tuple[Path, LabConfig]) -> None:
    out, cfg = built
    (manifest,) = discover(out, ("hook-swap",))
    result = run_scenario(cfg, manifest, Scenario(kind="window", samples=4))
    d = result.to_dict()
    assert not result.problems, d
    # IPv4 and IPv6, in a fresh namespace and registered again there after conntrack let go of it: every new
    # confirm slot was already swapped when nf_ct_netns_get() returned
    kinds = result.windows_by_kind
    assert sorted(kinds) == ["IPv4 again", "IPv4 new", "IPv6 again", "IPv6 new"], d
    assert all(w == [0, 0, 0, 0] for w in kinds.values()), d


@pytest.mark.vm
def test_a_load_that_recognises_no_confirm_slot_warns_and_counts(built: tuple[Path, LabConfig]) -> None:
    out, cfg = built
    (manifest,) = discover(out, ("hook-swap",))
    result = run_scenario(cfg, manifest, Scenario(kind="unmatched"))
    d = result.to_dict()
    assert not result.problems, d
    assert result.unmatched >= 1 and result.warned, d


@pytest.mark.vm
def test_without_the_kretprobe_a_new_registration_waits_for_the_rescan(built: tuple[Path, LabConfig]) -> None:
    """The control for the test above: with every kprobe disarmed after the load, the same measurement sees each
    new confirm slot run the original until a rescan swaps it (so a 0 above is the kretprobe's doing, not a
    measurement that cannot see a window)."""
    out, cfg = built
    (manifest,) = discover(out, ("hook-swap",))
    result = run_scenario(cfg, manifest, Scenario(kind="window", samples=2, kprobes_off=True))
    d = result.to_dict()
    assert not result.problems and d["kprobes_enabled"] == 0, d
    assert len(result.windows_us) == 8 and all(w is not None and w > 0 for w in result.windows_us), d
