"""Every kernel generation end to end: `nqgen --profile-only` and `nqgen --strategy all` on its fixtures.

Each generation pairs a minimal header tree (tests/fixtures/headers/<generation>/, see test_headers.py) with a
module compiled here in the shape of that generation's nf_conntrack[_ipv4].ko (tests/fixtures/gen/, and the
symbols engineer's RHEL 7.9 module in tests/fixtures/elf/). The profile must match kernel-compat.md's matrix,
and the generated C must take that generation's branch: hook signature, registration, ftrace callback,
livepatch API and object.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DebianKernel, make_jobs, run_nqgen
from elffixtures import FIXTURES as ELF_FIXTURES
from elffixtures import build_module
from nqgen.headers import clean_source, split_params
from nqgen.strategies import NAMES
from test_headers import FIXTURES as HEADER_TREES
from test_headers import GENERATIONS

GEN_FIXTURES = Path(__file__).parent / "fixtures" / "gen"
INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Case:
    source: Path
    ko: str  # file name of the compiled module
    cflags: tuple[str, ...]
    confirm: str  # the ipv4 confirm function
    module: str  # the module that holds it (and the livepatch object name)
    ipv6: bool  # the module also has the IPv6 confirm
    skipped: frozenset[str] = frozenset()  # strategies that cannot work there


def vermagic(release: str, preempt: bool = False) -> str:
    return f'-DVERMAGIC="{release} SMP {"preempt " if preempt else ""}mod_unload modversions "'


G1_SRC = GEN_FIXTURES / "nf_conntrack_g1.c"
G2_SRC = GEN_FIXTURES / "nf_conntrack_g2.c"
G3_SRC = GEN_FIXTURES / "nf_conntrack_g3.c"
CASES = {
    # early RHEL 7: no nf_ct_seq_adjust (seqadj is 3.13) and no livepatch
    "rhel7-early": Case(
        GEN_FIXTURES / "nf_conntrack_ipv4_rhel7_okfn.c", "nf_conntrack_ipv4.ko",
        ("-DKSYMTAB_ABS", vermagic("3.10.0-123.el7.x86_64")), "ipv4_confirm", "nf_conntrack_ipv4", False,
        # no nf_ct_seq_adjust (the old nf_ct_nat_offset API): no faithful corrected confirm; no livepatch
        frozenset({"advance-confirm-corrected", "ftrace", "hook-swap", "stop-hook", "livepatch"}),
    ),
    # RHEL 7.7: the 7.9 module shape, livepatch through klp_register_patch (dcui/RHEL77's livepatch.h)
    "rhel7.7": Case(
        ELF_FIXTURES / "nf_conntrack_ipv4_rhel7.c", "nf_conntrack_ipv4.ko",
        (vermagic("3.10.0-1062.el7.x86_64"), '-DRHELVERSION="7.7"'), "ipv4_confirm", "nf_conntrack_ipv4", False,
    ),
    "rhel7.9": Case(
        ELF_FIXTURES / "nf_conntrack_ipv4_rhel7.c", "nf_conntrack_ipv4.ko", (), "ipv4_confirm", "nf_conntrack_ipv4",
        False,
    ),
    "rhel8.3": Case(
        G1_SRC, "nf_conntrack.ko", ("-DKSYMTAB_ABS", vermagic("4.18.0-240.el8.x86_64")), "ipv4_confirm",
        "nf_conntrack", True,
    ),
    "4.19": Case(
        G1_SRC, "nf_conntrack.ko", ("-DKSYMTAB_PREL", vermagic("4.19.1")), "ipv4_confirm", "nf_conntrack", True
    ),
    "5.4": Case(G2_SRC, "nf_conntrack.ko", (vermagic("5.4.196"),), "ipv4_confirm", "nf_conntrack", True),
    "5.10": Case(G2_SRC, "nf_conntrack.ko", (vermagic("5.10.119"),), "ipv4_confirm", "nf_conntrack", True),
    "5.15": Case(
        G2_SRC, "nf_conntrack.ko", ("-DHOOK_OPS_TYPE", vermagic("5.15.44")), "ipv4_confirm", "nf_conntrack", True
    ),
    "6.6": Case(G3_SRC, "nf_conntrack.ko", (vermagic("6.6.87", True),), "nf_confirm", "nf_conntrack", True),
    "6.12": Case(G3_SRC, "nf_conntrack.ko", (vermagic("6.12.33", True),), "nf_confirm", "nf_conntrack", True),
}  # fmt: skip


def release_of(kdir: Path) -> str:
    m = re.search(r'UTS_RELEASE "([^"]+)"', (kdir / "include/generated/utsrelease.h").read_text())
    assert m is not None
    return m[1]


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for generation, case in CASES.items():
        tmp = tmp_path_factory.mktemp(generation.replace(".", "_"))
        out[generation] = build_module(tmp, case.source, case.ko, case.cflags)
    return out


def nqgen(args: list[str], cwd: Path) -> tuple[int, str, str]:
    proc = run_nqgen(args, cwd, env={"XDG_CACHE_HOME": str(cwd / "cache")})
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("generation", sorted(CASES))
def test_profile_only(generation: str, modules: dict[str, Path], tmp_path: Path) -> None:
    case, kdir = CASES[generation], HEADER_TREES / generation
    rc, stdout, stderr = nqgen(["--profile-only", "--kdir", str(kdir), "--module", str(modules[generation])], tmp_path)
    assert rc == 0, stderr
    profile = json.loads(stdout)
    assert profile["release"] == release_of(kdir)
    assert "vermagic says" not in stderr  # module and headers agree on the release
    features = {k: v for k, v in profile["features"].items() if k != "evidence"}
    assert features == GENERATIONS[generation], "\n".join(profile["features"]["evidence"])

    ipv4 = profile["confirm"]["ipv4"]
    assert (ipv4["function"], ipv4["module"]) == (case.confirm, case.module)
    hooks = {(h["hook"], h["hook_name"], h["priority"]) for h in ipv4["hooks"]}
    assert {(case.confirm, "POST_ROUTING", INT_MAX), (case.confirm, "LOCAL_IN", INT_MAX)} <= hooks
    helper = {h for h in hooks if h[0] == "ipv4_helper"}
    if features["confirm_generation"] == "G1":  # the helper runs in its own hook at 300
        assert helper == {("ipv4_helper", "POST_ROUTING", 300), ("ipv4_helper", "LOCAL_IN", 300)}
    else:
        assert not helper
    assert ("ipv6" in profile["confirm"]) == case.ipv6
    if features["confirm_generation"] == "G3":  # one function serves both families
        assert profile["confirm"]["ipv6"]["function"] == "nf_confirm"


# --- the generated C -----------------------------------------------------------------------------------------


def hook_forms(text: str) -> set[str]:
    """The form of every netfilter hook function defined in ``text`` (nqgen's own hooks and corrected confirms)."""
    forms = set()
    clean = clean_source(text)
    for m in re.finditer(r"\bunsigned\s+int\s+\w+\s*\(", clean):
        params = _params_at(clean, m.end() - 1)
        if len(params) < 3 or "struct sk_buff" not in params[1]:
            continue
        if params[0].startswith("void") and "nf_hook_state" in params[-1] and len(params) == 3:
            forms.add("priv_state")
        elif "nf_hook_ops" in params[0] and "(*okfn)" in params[-1]:
            forms.add("okfn")
        elif "nf_hook_ops" in params[0] and "nf_hook_state" in params[-1]:
            forms.add("ops_state")
    return forms


def _params_at(text: str, open_index: int) -> list[str]:
    depth = 0
    for i in range(open_index, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return split_params(text[open_index + 1 : i])
    return []


def sources(strategy_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(strategy_dir.glob("*.[ch]")))


@pytest.mark.parametrize("generation", sorted(CASES))
def test_strategy_all_emits_what_works_with_that_generations_api(
    generation: str, modules: dict[str, Path], tmp_path: Path
) -> None:
    case, kdir = CASES[generation], HEADER_TREES / generation
    want = GENERATIONS[generation]
    out = tmp_path / "out"
    rc, stdout, stderr = nqgen(
        ["--strategy", "all", "--kdir", str(kdir), "--module", str(modules[generation]), "--out", str(out)], tmp_path
    )
    assert rc == 0, stderr
    emitted = {p.name for p in out.iterdir() if p.is_dir() and p.name in NAMES}
    assert emitted == set(NAMES) - case.skipped, stdout + stderr
    for name in case.skipped:  # each skip says why, in one line
        assert re.search(rf"^skipping {re.escape(name)}: \S.*$", stdout + stderr, re.M), stdout + stderr
    assert ("already carries the upstream fix" in stderr) == want["fix_present"]

    for name in emitted:
        text = sources(out / name)
        want_forms = set() if name == "hold-ref" else {want["hookfn_form"]}  # hold-ref registers no hook
        assert hook_forms(text) == want_forms, f"{name}: {hook_forms(text)}"
        if "nf_register" in text:
            global_reg = re.search(r"\bnf_register_hooks?\s*\(", text) is not None
            pernet_reg = re.search(r"\bnf_register_net_hooks?\s*\(", text) is not None
            assert (global_reg, pernet_reg) == (want["registration"] == "global", want["registration"] == "pernet")

    if "ftrace" in emitted:
        text = sources(out / "ftrace")
        callback_arg = "struct pt_regs *regs" if want["ftrace_regs_form"] == "pt_regs" else "struct ftrace_regs *fregs"
        assert callback_arg in text
        assert re.search(rf"FTRACE_OPS_FL_{want['ftrace_recursion_flag']}\b", text)
        if want["ftrace_set_ip"] != "regs_ip":
            assert f"{want['ftrace_set_ip']}(" in text
        # sysctl kernel.ftrace_enabled=0 must not turn the redirect off where the kernel can refuse it
        assert ("FTRACE_OPS_FL_PERMANENT" in text) == want["ftrace_permanent"]
        # G2: the exported nf_confirm (the bridge's conntrack calls it) is redirected too
        assert ("(unsigned long)nf_confirm;" in text) == (want["confirm_generation"] == "G2")
    if "livepatch" in emitted:
        text = sources(out / "livepatch")
        assert f'.name = "{case.module}"' in text
        assert f'.old_name = "{case.confirm}"' in text
        assert ("klp_register_patch(" in text) == (want["livepatch_api"] == "register_enable")
        assert ('.old_name = "nf_confirm"' in text) == (want["confirm_generation"] in ("G2", "G3"))
    for name in {"ftrace", "livepatch"} & emitted:
        counters = json.loads((out / name / "nqgen-module.json").read_text())["counters"]
        assert ("nf_confirm_calls" in counters) == (want["confirm_generation"] == "G2")


# --- Debian 6.1 header flavours: generated for the real module, compiled for real -----------------------------


@pytest.mark.parametrize("flavour", ["rt-amd64", "cloud-amd64"])
def test_debian_flavour_builds_every_strategy(debian: DebianKernel, flavour: str, tmp_path: Path) -> None:
    """The generated C compiles without warnings, with W=1, against Debian's -rt (PREEMPT_RT) and -cloud headers."""
    kdir = Path(f"/usr/src/linux-headers-{debian.release.rsplit('-', 1)[0]}-{flavour}")
    if not (kdir / "Makefile").is_file():
        pytest.skip(f"linux-headers-{flavour} is not installed (make deps installs it)")
    out = tmp_path / "out"
    rc, stdout, stderr = nqgen(
        ["--strategy", "all", "--kdir", str(kdir), "--module", str(debian.nf_conntrack), "--out", str(out)], tmp_path
    )
    assert rc == 0, stderr
    emitted = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name in NAMES)
    assert emitted, stdout + stderr
    # build only: `make` would also run `nqgen verify`, whose vermagic check needs the flavour's own module
    # W=1 (issue 12): -Wextra, -Wmissing-prototypes, ... must stay silent too (amd64: tests/test_kstyle.py)
    make = subprocess.run(
        ["make", *make_jobs(), "-C", str(out), "W=1", *emitted], capture_output=True, text=True, timeout=1200
    )
    log = make.stdout + make.stderr
    assert make.returncode == 0, log[-3000:]
    assert not re.search(r"\bwarning:", log, re.IGNORECASE), log[-3000:]
    release = release_of(kdir)
    for name in emitted:
        (ko,) = (out / name).glob("*.ko")
        info = subprocess.run(["/sbin/modinfo", "-F", "vermagic", str(ko)], capture_output=True, text=True, check=True)
        assert info.stdout.startswith(release + " "), (name, info.stdout)
