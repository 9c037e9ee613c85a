"""Boot one guest under qemu (TCG) and collect its console, its result port and its exit status."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabError

DEBUG_EXIT_PORT = 0xF4


@dataclass(frozen=True)
class QemuConfig:
    """How to boot: kernel, initramfs, machine size, command line and time limit."""

    kernel: Path
    initrd: Path
    smp: int = 2
    memory: str = "1G"
    timeout: float = 180.0
    append: str = ""
    qemu: str = "qemu-system-x86_64"
    # qemu -icount shift=N,sleep=off: the guest's clock counts executed instructions (2^N ns each) and skips idle
    # time, so guest-side timings measure the guest's own work, not the host's load (the cost lab uses it)
    icount: int | None = None
    # UEFI firmware as (code, variable store) pflash images, e.g. OVMF with a key in its db; None: SeaBIOS.
    # The variable store is written by the firmware: pass a copy.
    firmware: tuple[Path, Path] | None = None
    # qemu's -accel: "tcg" runs one host thread per vCPU (MTTCG); "tcg,thread=single" runs every vCPU on one
    accel: str = "tcg"
    # a human monitor on this unix socket (to read the vCPUs' registers and memory of a guest that hangs)
    monitor: Path | None = None


@dataclass(frozen=True)
class QemuOutcome:
    """What one boot left behind."""

    exit_code: int | None  # None when the lab killed qemu (time limit or a watcher's stop)
    timed_out: bool
    console: str  # ttyS0: the kernel's log and reports
    results: str  # ttyS1: JSON lines from the guest's init
    seconds: float
    command: tuple[str, ...]
    qemu_output: str = ""  # qemu's own stdout/stderr
    stopped: str = ""  # why the host stopped the guest early (a watcher's reason), "" if it did not

    @property
    def guest_exit(self) -> int | None:
        """The byte the guest wrote to isa-debug-exit, None if it never did (panic, reboot, timeout)."""
        if self.exit_code is None or self.exit_code % 2 == 0:
            return None
        return self.exit_code >> 1


# No 5-level paging: few real CPUs have it, and one boot of the KASAN reference kernel with it died at 0.002 s
# in a storm of "KASAN: wild-memory-access" reports on direct-map (ff11...) addresses.
CPU = "max,la57=off"
BASE_APPEND = "console=ttyS0 loglevel=5 oops=panic panic=-1 rdinit=/init"


def qemu_command(cfg: QemuConfig, console: Path, results: Path) -> list[str]:
    append = f"{BASE_APPEND} {cfg.append}".strip()
    firmware = []
    if cfg.firmware is not None:
        code, variables = cfg.firmware
        firmware = ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={variables}"]  # fmt: skip
    return [
        cfg.qemu,
        "-accel", cfg.accel,
        "-cpu", CPU,
        "-smp", str(cfg.smp),
        "-m", cfg.memory,
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-kernel", str(cfg.kernel),
        "-initrd", str(cfg.initrd),
        "-append", append,
        "-serial", f"file:{console}",
        "-serial", f"file:{results}",
        "-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x04",
        *(["-icount", f"shift={cfg.icount},sleep=off"] if cfg.icount is not None else []),
        *firmware,
        *(["-monitor", f"unix:{cfg.monitor},server=on,wait=off"] if cfg.monitor is not None else []),
    ]


# Called while the guest runs with what its result port and its console added since the last call (complete
# lines only); returns a reason to stop the guest now, or None to let it run.
Watcher = Callable[[str, str], "str | None"]


class Tail:
    """The complete lines a file gained since the last read (a serial port qemu writes as the guest emits)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> str:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return ""
        self.offset += len(data)
        data = self.partial + data
        cut = data.rfind(b"\n") + 1
        self.partial = data[cut:]
        return data[:cut].decode(errors="replace")


def run_watched(proc: subprocess.Popen[bytes], timeout: float, watch: Watcher, console: Path, results: Path,
                 poll: float) -> tuple[bool, str]:  # fmt: skip
    """Wait for qemu while feeding ``watch``; kill it at the time limit or when ``watch`` gives a reason."""
    res, con = Tail(results), Tail(console)
    deadline = time.monotonic() + timeout
    while True:
        try:
            proc.wait(timeout=max(0.0, min(poll, deadline - time.monotonic())))
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        reason = watch(res.read(), con.read())
        if finished:
            return False, ""
        if reason is not None:
            proc.kill()
            proc.wait()
            return False, reason
        if time.monotonic() >= deadline:
            proc.kill()
            proc.wait()
            return True, ""


def boot(cfg: QemuConfig, workdir: Path, watch: Watcher | None = None, poll: float = 2.0) -> QemuOutcome:
    """Run qemu until the guest exits or the time limit passes. ``watch`` (if given) sees the result port's and
    the console's new lines every ``poll`` seconds while the guest runs, and may stop it early."""
    if shutil.which(cfg.qemu) is None:
        raise LabError(f"{cfg.qemu} not found (apt-get install qemu-system-x86)")
    console = workdir / "console.log"
    results = workdir / "results.jsonl"
    cmd = qemu_command(cfg, console, results)
    start = time.monotonic()
    timed_out = False
    stopped = ""
    if watch is None:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=cfg.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, _ = proc.communicate()
    else:  # qemu's own output goes to a file: nobody reads a pipe while the watcher polls
        qemu_out = workdir / "qemu.out"
        with qemu_out.open("wb") as sink:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
            timed_out, stopped = run_watched(proc, cfg.timeout, watch, console, results, poll)
        out = qemu_out.read_bytes()
    seconds = time.monotonic() - start
    if not timed_out and not console.exists():
        raise LabError(f"qemu failed to start: {out.decode(errors='replace').strip()[:300]}")
    return QemuOutcome(
        exit_code=None if timed_out or stopped else proc.returncode,
        timed_out=timed_out,
        console=console.read_text(errors="replace") if console.exists() else "",
        results=results.read_text(errors="replace") if results.exists() else "",
        seconds=seconds,
        command=tuple(cmd),
        qemu_output=out.decode(errors="replace")[-2000:],
        stopped=stopped,
    )


def monitor_commands(socket_path: Path, commands: list[str], timeout: float = 20.0) -> str:
    """Run human-monitor ``commands`` on a running qemu's ``-monitor unix:`` socket; their output, in order."""
    import socket

    out: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))

        def until_prompt() -> str:
            buf = b""
            while not buf.endswith(b"(qemu) "):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return buf.decode(errors="replace")

        until_prompt()
        for cmd in commands:
            sock.sendall(cmd.encode() + b"\n")
            out.append(f"(qemu) {cmd}\n" + until_prompt().replace("\r", "").removesuffix("(qemu) "))
    return "".join(out)
