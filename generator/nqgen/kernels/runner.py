"""Running kernel build steps: output appended to a log, progress lines on stderr, one build per key at a time."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import BuildError

Say = Callable[[str], None]


def sayer(tag: str) -> Say:
    """A progress printer: ``[tag HH:MM:SS] message`` on stderr."""

    def say(msg: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return say


class Runner:
    """Runs build steps with their output appended to the log, printing progress (a line a minute)."""

    def __init__(self, log: Path, nice: int, say: Say) -> None:
        self.log = log
        self.nice = nice
        self.say = say

    def run(self, argv: Sequence[str], cwd: Path, what: str, stdin: Path | None = None,
            capture: bool = False) -> str:
        cmd = list(argv)
        if self.nice and cmd[0] == "make":
            cmd = ["nice", "-n", str(self.nice), *cmd]
        self.say(f"{what}: {' '.join(cmd)}")
        start = time.monotonic()
        with self.log.open("a") as log:
            log.write(f"\n### {what}: {' '.join(cmd)} (in {cwd})\n")
            log.flush()
            fin = stdin.open("rb") if stdin is not None else subprocess.DEVNULL
            try:
                try:
                    proc = subprocess.Popen(cmd, cwd=cwd, stdin=fin,
                                            stdout=subprocess.PIPE if capture else log,
                                            stderr=log, text=True)
                except OSError as exc:
                    raise BuildError(f"{what}: cannot run {cmd[0]}: {exc.strerror}") from exc
                out = ""
                if capture:
                    out, _ = proc.communicate()
                else:
                    last = start
                    while proc.poll() is None:
                        time.sleep(1)
                        if time.monotonic() - last >= 60:
                            last = time.monotonic()
                            self.say(f"{what}: running {int(last - start) // 60} min, "
                                     f"log {self.log.stat().st_size // 1024} KiB")
            finally:
                if stdin is not None and not isinstance(fin, int):
                    fin.close()
        if proc.returncode != 0:
            raise BuildError(f"{what} failed (exit {proc.returncode}); see {self.log}")
        self.say(f"{what}: done in {time.monotonic() - start:.0f} s")
        return out


@contextmanager
def locked(root: Path, key: str, say: Say) -> Iterator[None]:
    """Hold ``<root>/<key>.lock``: a second build of the same key waits for the first."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"{key}.lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another build of {key} is running; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
