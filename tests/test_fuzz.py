"""Hostile input to every reader of the generator, fuzzed with hypothesis (issue 12 part 3).

Readers: ELF modules and vmlinux (nqgen.elfread, plus the ops-array decoder the probe runs on a module),
compressed modules (xz, gzip, zstd), System.map / kallsyms, Module.symvers and .config (nqgen.symsources), and the
header parser (nqgen.headers). Each case must end in a correct result or in an nqgen InputError with a one-line
message (which the CLI prints as one line and exit 3); anything else — another exception, i.e. a traceback at the
CLI — fails the test, and hypothesis shrinks it to a minimal input. Hangs: every case runs under a watchdog alarm.
Memory: the peak RSS of the process may not grow by more than MAX_RSS_GROWTH over a whole run.

Two kinds of case per text reader: a *model* drawn by hypothesis and rendered as the file (the parse must give
back exactly the model: correctness), and *hostile* bytes (mutations of a valid file and raw garbage: robustness).
ELF readers start from small real objects compiled here (a module shaped like RHEL 7's nf_conntrack_ipv4.ko and
a linked vmlinux) and damage bytes, header fields and section-table fields.

Case count per reader: ``NQGEN_FUZZ_EXAMPLES`` (``make fuzz`` sets 10000; ``make test`` runs the default, 150).
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import os
import resource
import shutil
import signal
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import run_nqgen
from elffixtures import build_module, link_vmlinux
from nqgen import elfread, headers, symsources
from nqgen.errors import InputError, NqgenError
from nqgen.profile import ConfigFlags
from test_headers import FIXTURES as HEADER_TREES

EXAMPLES = int(os.environ.get("NQGEN_FUZZ_EXAMPLES", "150"))
WATCHDOG_S = 60  # a case that runs this long is a hang (the slowest real case takes well under a second)
MAX_RSS_GROWTH = 1 << 30  # bytes over a whole run of one reader
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
T = TypeVar("T")


class Hang(AssertionError):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise Hang(f"a reader ran longer than {WATCHDOG_S} s on one input")


def outcome(fn: Callable[[], T]) -> T | NqgenError:
    """Run one reader on one input: its result or its nqgen error (checked to be one line, as the CLI prints it
    with its exit code: 3 for an InputError, 77 for a kernel nqgen can emit nothing for); nothing else."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(WATCHDOG_S)
    try:
        return fn()
    except NqgenError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "\r" not in msg and len(msg) < 2000, repr(msg)
        return exc
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))


@contextlib.contextmanager
def bounded_memory() -> Iterator[None]:
    """Run a whole fuzz run with the address space capped at its current size + MAX_RSS_GROWTH (RLIMIT_AS, so an
    unbounded allocation fails as MemoryError inside the case, which is not an InputError: the case fails), and
    check the peak RSS afterwards too. A reader that expanded a bomb or allocated per claimed section cannot pass."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + MAX_RSS_GROWTH
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        yield
    except MemoryError as exc:
        raise AssertionError(f"a reader needed more than {MAX_RSS_GROWTH >> 20} MiB more address space") from exc
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert after - before < MAX_RSS_GROWTH, f"peak RSS grew by {(after - before) >> 20} MiB"


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="nqgen-fuzz-"))


# --- byte mutations ---------------------------------------------------------------------------------------------

_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1, 5_000_000]


@st.composite
def mutated(draw: st.DrawFn, original: bytes, *, header_bias: int = 0) -> bytes:
    """``original`` with bytes flipped, words overwritten with edge values, a region cut, duplicated or truncated."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["byte", "word", "cut", "dup", "truncate"]))
        limit = header_bias if header_bias and draw(st.booleans()) else len(data)
        if not data:
            break
        at = draw(st.integers(0, max(0, min(limit, len(data)) - 1)))
        if op == "byte":
            data[at] = draw(st.integers(0, 255))
        elif op == "word":
            width = draw(st.sampled_from([2, 4, 8]))
            value = draw(st.sampled_from(_INTERESTING) | st.integers(0, 2**64 - 1)) % (1 << (8 * width))
            data[at : at + width] = value.to_bytes(width, "little")
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 256))]
        elif op == "dup":
            data[at:at] = data[at : at + draw(st.integers(1, 256))] * draw(st.integers(1, 4))
        else:
            del data[at:]
    return bytes(data)


# --- ELF: modules and vmlinux ----------------------------------------------------------------------------------

_SHDR = struct.Struct("<IIQQQQIIQQ")  # name type flags addr offset size link info addralign entsize


def shdr_field_edits(data: bytes) -> st.SearchStrategy[bytes]:
    """Section-table damage: one field of one section header set to a hostile value (sizes, offsets, links)."""
    shoff = struct.unpack_from("<Q", data, 40)[0]
    shnum = struct.unpack_from("<H", data, 60)[0]
    fields = {"type": 4, "offset": 24, "size": 32, "link": 40, "info": 44, "entsize": 56}

    @st.composite
    def edit(draw: st.DrawFn) -> bytes:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            index = draw(st.integers(0, shnum - 1))
            name = draw(st.sampled_from(sorted(fields)))
            width = 4 if name in ("type", "link", "info") else 8
            value = draw(st.sampled_from(_INTERESTING) | st.integers(0, 2 ** (8 * width) - 1)) % (1 << (8 * width))
            at = shoff + index * _SHDR.size + fields[name]
            out[at : at + width] = value.to_bytes(width, "little")
        return bytes(out)

    return edit()


@pytest.fixture(scope="module")
def elf_seeds() -> dict[str, bytes]:
    tmp = workdir()
    try:
        module = build_module(tmp, "nf_conntrack_ipv4_rhel7.c", "nf_conntrack_ipv4.ko")
        vmlinux = link_vmlinux(tmp, [module])
        return {"module": module.read_bytes(), "vmlinux": vmlinux.read_bytes()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_image(image: elfread.ElfImage) -> None:
    """What any successfully parsed image must satisfy (the result is usable, not garbage)."""
    names = set(image.sections)
    for sym in image.symbols:
        assert sym.section in names or sym.section in ("", "*ABS*", "*COM*"), sym
    for section, offset in image.traceable_sites:
        assert section in names and offset >= 0
    for key, values in image.modinfo.items():
        assert isinstance(key, str) and all(isinstance(v, str) for v in values)


def read_module(data: bytes) -> elfread.ElfImage | InputError:
    def run() -> elfread.ElfImage:
        image = elfread.parse_elf(data, "fuzz.ko", expect="module")
        check_image(image)
        for name in ("ipv4_conntrack_ops",):  # what the probe decodes on such a module
            if any(s.kind == "OBJECT" for s in image.find(name)):
                elfread.decode_ops_array(image, name)
        return image

    return outcome(run)


def test_seeds_parse(elf_seeds: dict[str, bytes]) -> None:
    """The unmutated seeds give the full result, so the mutations below start from a correct parse."""
    mod = read_module(elf_seeds["module"])
    assert isinstance(mod, elfread.ElfImage) and mod.find("ipv4_confirm") and mod.traceable_sites
    vml = outcome(lambda: elfread.parse_elf(elf_seeds["vmlinux"], "vmlinux", expect="vmlinux"))
    assert isinstance(vml, elfread.ElfImage) and vml.kind == "vmlinux" and vml.build_id


def test_fuzz_elf_module_bytes(elf_seeds: dict[str, bytes]) -> None:
    seed = elf_seeds["module"]

    @FUZZ
    @given(st.one_of(mutated(seed, header_bias=64), shdr_field_edits(seed), st.binary(max_size=512)))
    def case(data: bytes) -> None:
        read_module(data)

    with bounded_memory():
        case()


def test_fuzz_elf_vmlinux_bytes(elf_seeds: dict[str, bytes]) -> None:
    seed = elf_seeds["vmlinux"]

    @FUZZ
    @given(st.one_of(mutated(seed, header_bias=64), shdr_field_edits(seed)))
    def case(data: bytes) -> None:
        res = outcome(lambda: elfread.parse_elf(data, "vmlinux", expect="vmlinux"))
        if isinstance(res, elfread.ElfImage):
            check_image(res)

    with bounded_memory():
        case()


def test_millions_of_sections_are_refused_at_once(elf_seeds: dict[str, bytes]) -> None:
    """A header claiming 5 million sections (extended numbering: e_shnum 0, count in section 0's sh_size) and
    one claiming 65535 sections past the end of the file are clean errors, not an allocation."""
    seed = bytearray(elf_seeds["module"])
    shoff = struct.unpack_from("<Q", seed, 40)[0]
    extended = bytearray(seed)
    struct.pack_into("<H", extended, 60, 0)
    struct.pack_into("<Q", extended, shoff + 32, 5_000_000)
    many = bytearray(seed)
    struct.pack_into("<H", many, 60, 0xFFFF)
    with bounded_memory():
        for data in (extended, many):
            res = read_module(bytes(data))
            assert isinstance(res, InputError), res


# --- compressed modules -------------------------------------------------------------------------------------------


def _compress(kind: str, data: bytes) -> bytes:
    if kind == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if kind == "gz":
        return gzip.compress(data)
    proc = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True)
    return proc.stdout


@pytest.mark.parametrize("kind", ["xz", "gz", "zst"])
def test_fuzz_compressed_modules(elf_seeds: dict[str, bytes], kind: str) -> None:
    if kind == "zst" and shutil.which("zstd") is None:
        pytest.skip("the zstd command is not installed (make deps installs zstd)")
    packed = _compress(kind, elf_seeds["module"])
    tmp = workdir()
    path = tmp / f"nf_conntrack_ipv4.ko.{kind}"

    @FUZZ
    @given(st.one_of(mutated(packed, header_bias=32), st.just(packed)))
    def case(data: bytes) -> None:
        path.write_bytes(data)
        res = outcome(lambda: elfread.load_module(path))
        if data == packed:
            assert isinstance(res, elfread.ElfImage) and res.compression == kind
        elif isinstance(res, elfread.ElfImage):
            check_image(res)

    try:
        with bounded_memory():
            case()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("kind", ["xz", "gz", "zst"])
def test_decompression_bomb_is_capped(kind: str) -> None:
    """A module that expands to more than the cap (256 MiB of zeros from a few hundred KiB) is refused."""
    if kind == "zst" and shutil.which("zstd") is None:
        pytest.skip("the zstd command is not installed")
    tmp = workdir()
    path = tmp / f"bomb.ko.{kind}"
    chunk = bytes(1 << 20)
    total = (symsources.MAX_DECOMPRESSED >> 20) + 16
    try:
        if kind == "gz":
            comp = zlib.compressobj(9, zlib.DEFLATED, 31)
            path.write_bytes(b"".join([*(comp.compress(chunk) for _ in range(total)), comp.flush()]))
        elif kind == "xz":
            xz = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=0)
            path.write_bytes(b"".join([*(xz.compress(chunk) for _ in range(total)), xz.flush()]))
        else:
            with open(path, "wb") as fh:
                proc = subprocess.Popen(["zstd", "-q", "-c", "-1"], stdin=subprocess.PIPE, stdout=fh)
                assert proc.stdin is not None
                for _ in range(total):
                    proc.stdin.write(chunk)
                proc.stdin.close()
                assert proc.wait() == 0
        assert path.stat().st_size < 16 << 20
        with bounded_memory():
            res = outcome(lambda: elfread.load_module(path))
        assert isinstance(res, InputError) and "more than" in str(res), res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- text readers: System.map / kallsyms, Module.symvers, .config ----------------------------------------------

_IDENT = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_.$]{0,40}\Z")
_NM_TYPES = st.sampled_from(list("TtDdBbRrWwVvAaUuNn"))


def text_file(content: bytes | str, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(prefix="nqgen-fuzz-", suffix=suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(content.encode() if isinstance(content, str) else content)
    return Path(name)


def read_text_reader(fn: Callable[[Path], T], content: bytes | str, suffix: str = "") -> T | InputError:
    path = text_file(content, suffix)
    try:
        return outcome(lambda: fn(path))
    finally:
        path.unlink()


_symbol_rows = st.lists(
    st.tuples(st.integers(0, 2**64 - 1), _NM_TYPES, _IDENT, st.none() | _IDENT.filter(lambda s: "]" not in s)),
    min_size=1,
    max_size=40,
)


@given(_symbol_rows, st.sampled_from(["\n", "\r\n"]), st.sampled_from([" ", "\t"]))
@FUZZ
def test_fuzz_symbol_list_model(rows: list[tuple[int, str, str, str | None]], eol: str, sep: str) -> None:
    text = eol.join(
        f"{addr:016x}{sep}{kind}{sep}{name}" + (f"\t[{mod}]" if mod else "") for addr, kind, name, mod in rows
    )
    res = read_text_reader(symsources.parse_symbol_list, text + eol)
    assert isinstance(res, symsources.SymbolList), res
    assert [(e.address, e.type, e.name, e.module) for e in res.entries] == rows


def test_fuzz_symbol_list_hostile() -> None:
    seed = b"".join(
        f"ffffffff{0x81000000 + i * 16:08x} {'Tt'[i % 2]} sym_{i}{' [nf_conntrack]' if i % 3 == 0 else ''}\n".encode()
        for i in range(40)
    )

    @FUZZ
    @given(st.one_of(mutated(seed), st.binary(max_size=2048), st.text(max_size=2048).map(str.encode)))
    def case(data: bytes) -> None:
        res = read_text_reader(symsources.parse_symbol_list, data)
        if isinstance(res, symsources.SymbolList):
            assert res.entries and all(e.name and len(e.type) == 1 for e in res.entries)

    with bounded_memory():
        case()


_symvers_rows = st.dictionaries(
    _IDENT,
    st.tuples(
        st.integers(0, 2**32 - 1),
        st.from_regex(r"\A(vmlinux|[a-z0-9_/-]{1,30})\Z"),
        st.sampled_from(["EXPORT_SYMBOL", "EXPORT_SYMBOL_GPL"]),
        st.sampled_from(["", "CRYPTO_INTERNAL", "NET_NS"]),
    ),
    min_size=1,
    max_size=30,
)


@given(_symvers_rows, st.sampled_from(["5.9+", "5.4", "4.x"]))
@FUZZ
def test_fuzz_symvers_model(rows: dict[str, tuple[int, str, str, str]], layout: str) -> None:
    lines = []
    for name, (crc, module, export, ns) in rows.items():
        if layout == "5.9+":
            lines.append(f"0x{crc:08x}\t{name}\t{module}\t{export}\t{ns}")
        elif layout == "5.4":
            lines.append(f"0x{crc:08x}\t{name}\t{ns}\t{module}\t{export}")
        else:
            lines.append(f"0x{crc:08x}\t{name}\t{module}\t{export}")
    res = read_text_reader(symsources.parse_symvers, "\n".join(lines) + "\n")
    assert isinstance(res, dict), res
    got = {n: (e.crc, e.module, e.export_type, e.namespace) for n, e in res.items()}
    want = {n: (crc, m, e, "" if layout == "4.x" else ns) for n, (crc, m, e, ns) in rows.items()}
    assert got == want


def test_fuzz_symvers_hostile() -> None:
    seed = b"".join(
        f"0x{i * 7919:08x}\tsym_{i}\tnet/netfilter/nf_conntrack\tEXPORT_SYMBOL_GPL\t\n".encode() for i in range(40)
    )

    @FUZZ
    @given(st.one_of(mutated(seed), st.binary(max_size=2048)))
    def case(data: bytes) -> None:
        res = read_text_reader(symsources.parse_symvers, data)
        if isinstance(res, dict):
            assert res and all(e.name == n and e.module for n, e in res.items())

    with bounded_memory():
        case()


_config_values = st.dictionaries(
    st.from_regex(r"\A[A-Z0-9_]{1,30}\Z"),
    st.sampled_from(["y", "m", "n"]) | st.integers(-(2**40), 2**40).map(str) | st.from_regex(r'\A"[a-z0-9 ._-]*"\Z'),
    min_size=1,
    max_size=40,
)


@given(_config_values, st.booleans())
@FUZZ
def test_fuzz_config_model(values: dict[str, str], gz: bool) -> None:
    text = "#\n# Automatically generated file; DO NOT EDIT.\n#\n" + "".join(
        f"# CONFIG_{k} is not set\n" if v == "n" else f"CONFIG_{k}={v}\n" for k, v in values.items()
    )
    content = gzip.compress(text.encode()) if gz else text.encode()
    res = read_text_reader(symsources.parse_config, content, ".gz" if gz else "")
    assert res == {k: v.strip('"') for k, v in values.items()}
    flags = read_text_reader(symsources.config_flags, content, ".gz" if gz else "")
    assert isinstance(flags, ConfigFlags) and flags.known
    assert flags.livepatch == (values.get("LIVEPATCH") in ("y", "m"))


def test_fuzz_config_hostile() -> None:
    seed = b"".join(
        f"CONFIG_OPT_{i}={'ym'[i % 2]}\n# CONFIG_OFF_{i} is not set\n".encode() for i in range(30)
    ) + b'CONFIG_LIVEPATCH=y\nCONFIG_LOCALVERSION="-x"\n'

    @FUZZ
    @given(st.one_of(mutated(seed), st.binary(max_size=2048), mutated(gzip.compress(seed), header_bias=16)))
    def case(data: bytes) -> None:
        res = read_text_reader(symsources.config_flags, data)
        if isinstance(res, ConfigFlags):
            assert res.known

    with bounded_memory():
        case()


def test_huge_text_input_is_refused_before_parsing() -> None:
    """A 'System.map' of hundreds of MiB (far beyond a real one's ~6 MiB) is an error, not millions of objects."""
    line = b"ffffffff81000000 T some_symbol_name\n"
    path = text_file(b"")
    try:
        with open(path, "wb") as fh:
            block = line * ((1 << 20) // len(line))
            for _ in range((symsources.MAX_TEXT >> 20) + 2):
                fh.write(block)
        with bounded_memory():
            for fn in (symsources.parse_symbol_list, symsources.parse_symvers, symsources.parse_config):
                res = outcome(lambda fn=fn: fn(path))  # type: ignore[misc]
                assert isinstance(res, InputError) and "larger than" in str(res), res
    finally:
        path.unlink()


# --- headers ---------------------------------------------------------------------------------------------------

_C_TOKENS = [
    "(", ")", "{", "}", ";", ",", "*", "/*", "*/", "//", "\\\n", "\n", "#define ", "#if 0\n", "#endif\n",
    "typedef ", "struct ", "unsigned int ", "nf_hookfn", "nf_hook_ops", "nf_conntrack_confirm", "skb_nfct",
    "static inline ", "int ", "void *priv", "struct sk_buff *skb", "const struct nf_hook_state *state",
    "__nf_conntrack_confirm(skb)", "return ", "if (", "nfct", "_nfct", "ftrace_regs", "klp_enable_patch",
    '"', "'", "\x00", "\xff", "é",
]  # fmt: skip


@st.composite
def mutated_text(draw: st.DrawFn, original: str) -> str:
    text = original
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "dup"]))
        if op == "insert":
            text = text[:at] + "".join(draw(st.lists(st.sampled_from(_C_TOKENS), min_size=1, max_size=8))) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 400)) :]
        else:
            piece = text[at : at + draw(st.integers(1, 400))]
            text = text[:at] + piece * draw(st.integers(2, 50)) + text[at:]
    return text


@pytest.mark.parametrize("generation", ["rhel7.9", "6.1-src", "5.15"])
def test_fuzz_headers(generation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NQGEN_NO_CACHE", "1")
    tmp = workdir()
    kdir = tmp / generation
    shutil.copytree(HEADER_TREES / generation, kdir)
    config = symsources.config_flags(kdir / ".config")
    exports = frozenset(symsources.parse_symvers(kdir / "Module.symvers"))
    tree = headers.locate(kdir)
    files = [rel for rel in tree.files() if (kdir / rel).is_file()]
    originals = {rel: (kdir / rel).read_text(encoding="utf-8", errors="replace") for rel in files}

    def probe() -> object:
        return headers.probe_features(kdir, exports=exports, module_symbols=frozenset(), config=config)

    baseline = outcome(probe)
    assert not isinstance(baseline, InputError), baseline

    @FUZZ
    @given(st.sampled_from(files).flatmap(lambda rel: st.tuples(st.just(rel), mutated_text(originals[rel]))))
    def case(edit: tuple[str, str]) -> None:
        rel, text = edit
        assume(text != originals[rel])
        (kdir / rel).write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            outcome(probe)
        finally:
            (kdir / rel).write_text(originals[rel], encoding="utf-8")

    try:
        with bounded_memory():
            case()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the command line: what the user sees -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "option,content",
    [
        ("--module", b"\x7fELF\x02\x01\x01" + b"\xff" * 200),
        ("--system-map", b"ffffffff81000000 T ok\nnot a line\n"),
        ("--symvers", b"0x1\n"),
        ("--config", b"CONFIG_X=y\ngarbage\n"),
    ],
)
def test_cli_hostile_input_is_one_line_exit_3(option: str, content: bytes, tmp_path: Path) -> None:
    bad = tmp_path / ("bad.ko" if option == "--module" else "bad")
    bad.write_bytes(content)
    args = ["--profile-only", "--kdir", str(HEADER_TREES / "6.1-src"), option, str(bad)]
    if option != "--module":
        seed = build_module(tmp_path, "nf_conntrack_g3.c", "nf_conntrack.ko")
        args += ["--module", str(seed)]
    res = run_nqgen(args, tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert res.returncode == 3, (res.returncode, res.stderr)
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("nqgen: error: "), res.stderr
    assert "Traceback" not in res.stderr
