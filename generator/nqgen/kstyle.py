"""Kernel coding style: the kernel's own ``scripts/checkpatch.pl`` run on generated trees.

checkpatch.pl comes from Debian's ``linux-source-6.1`` tarball: the script and the two data files it reads
(``spelling.txt``, ``const_structs.checkpatch``) are extracted once into ``$NQGEN_CACHE/checkpatch/<key>/``
(default ``/var/cache/nqgen``; the key follows the source package version), and run with
``--no-tree --strict`` on every ``.c`` and ``.h`` of a tree. ``python -m nqgen.kstyle DIR...`` prints the
findings and exits 1 when any of them is an error or a warning.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError, InputError
from .reprokernel import CACHE_ENV, DEFAULT_CACHE, SOURCE_TARBALL, source_id

SCRIPTS = ("checkpatch.pl", "spelling.txt", "const_structs.checkpatch")
_FINDING = re.compile(
    r"^(?P<file>[^:]+):(?P<line>\d+): (?P<level>ERROR|WARNING|CHECK):(?P<type>[A-Z0-9_]+): (?P<msg>.*)$"
)


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    level: str  # ERROR, WARNING or CHECK
    type: str  # checkpatch's message type, e.g. LONG_LINE
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.level}:{self.type}: {self.message}"


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return (Path(env) if env else DEFAULT_CACHE) / "checkpatch"


def checkpatch(tarball: Path = SOURCE_TARBALL, root: Path | None = None) -> Path:
    """The path of checkpatch.pl, extracted from the kernel source tarball on first use."""
    key = hashlib.sha256(source_id(tarball).encode()).hexdigest()[:16]
    dest = (root or cache_root()) / key
    script = dest / "scripts" / SCRIPTS[0]
    if all((dest / "scripts" / name).is_file() for name in SCRIPTS):
        return script
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=dest.parent))
    try:
        (tmp / "scripts").mkdir()
        wanted = set(SCRIPTS)
        with tarfile.open(tarball, "r|*") as tar:  # one pass over the stream; stop once all three are out
            for member in tar:
                name = member.name.split("/", 1)[-1]
                base = name.removeprefix("scripts/")
                if name.startswith("scripts/") and base in wanted and member.isfile():
                    src = tar.extractfile(member)
                    if src is None:
                        continue
                    (tmp / "scripts" / base).write_bytes(src.read())
                    wanted.discard(base)
                    if not wanted:
                        break
        if wanted:
            raise InputError(f"{tarball} has no scripts/{', scripts/'.join(sorted(wanted))}")
        (tmp / "scripts" / SCRIPTS[0]).chmod(0o755)
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first: use its copy
            if not script.is_file():
                raise
    except (OSError, tarfile.TarError) as exc:
        raise InputError(f"cannot extract checkpatch.pl from {tarball}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return script


def sources(trees: Iterable[Path]) -> list[Path]:
    """Every C source and header of the trees, in a stable order (not Kbuild's generated ``*.mod.c``)."""
    return sorted(
        p
        for t in trees
        for p in t.rglob("*")
        if p.suffix in (".c", ".h") and not p.name.endswith(".mod.c") and p.is_file()
    )


def run(files: Sequence[Path], script: Path | None = None, jobs: int | None = None) -> list[Finding]:
    """checkpatch.pl --no-tree --strict on the files; every finding it prints, in file order.

    The files are split over ``jobs`` checkpatch processes run side by side (default: one per core); checkpatch
    judges each ``-f`` file on its own, so the findings are the same as from one run.
    """
    if not files:
        return []
    script = script or checkpatch()
    cmd = ["perl", str(script), "--no-tree", "--strict", "--terse", "--show-types", "--no-summary", "-f"]
    n = max(1, min(jobs or os.cpu_count() or 1, len(files)))
    chunks = [list(files[i::n]) for i in range(n)]
    procs = [
        subprocess.Popen([*cmd, *map(str, chunk)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for chunk in chunks
    ]
    outputs: list[str] = []
    failure = ""
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            failure = failure or "checkpatch.pl timed out after 900 s"
        if not failure and (proc.returncode not in (0, 1) or stderr.strip()):
            failure = f"checkpatch.pl failed (exit {proc.returncode}): {stderr.strip()[:300]}"
        outputs.append(stdout)
    if failure:
        raise BuildError(failure)
    findings: list[Finding] = []
    for line in (line for out in outputs for line in out.splitlines()):
        m = _FINDING.match(line)
        if m:
            findings.append(Finding(m["file"], int(m["line"]), m["level"], m["type"], m["msg"]))
        elif line.strip():
            raise BuildError(f"checkpatch.pl printed an unexpected line: {line[:200]}")
    order = {str(f): i for i, f in enumerate(files)}
    return sorted(findings, key=lambda f: (order.get(f.file, len(order)), f.line))


def main(argv: Sequence[str] | None = None) -> int:
    trees = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not trees:
        print("usage: python -m nqgen.kstyle DIR...", file=sys.stderr)
        return 2
    try:
        findings = run(sources(trees))
    except (InputError, BuildError) as exc:
        print(f"nqgen.kstyle: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for f in findings:
        print(f)
    bad = [f for f in findings if f.level != "CHECK"]
    print(f"checkpatch --strict: {len(findings)} findings ({len(bad)} errors or warnings)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
