"""Text-poke stress without any mitigation (issue 12, the Debian livepatch soak's lockup): is it ours?

The lockup left both vCPUs trapping forever on an int3 at ``nf_confirm+0`` that memory no longer held (the
kernel's kprobe int3 handler read the restored NOP, backed up and re-ran the instruction; the emulator ran the
int3 again). This boot has no module of ours: it toggles the kernel's own function tracer on ``nf_confirm``
(each toggle rewrites the same 5-byte call site through text_poke_bp, as livepatch's enable and disable do)
while racing UDP runs through nf_confirm on both vCPUs, and streams a record every ``per`` toggles. Run it with
qemu's default multi-threaded TCG and with ``--single-thread`` (every vCPU on one host thread) to tell a guest
bug from an emulator one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .kernel import default_cache_dir, resolve_image
from .qemu import QemuConfig, boot, monitor_commands
from .results import find_faults
from .runner import LabConfig
from .soak import _prologue, make_lab
from .soakwatch import SoakWatch


def poke_init(prologue: list[str], rounds: int, per: int, function: str) -> str:
    lines = [
        *prologue,
        "T=/sys/kernel/tracing",
        f"echo {function} > $T/set_ftrace_filter || finish 5",
        "( i=0; while [ ! -e /tmp/stop ]; do "
        "/bin/nq_udprace -r 4 -t 2 -f 46 -p 5000 -s $((20000 + (i % 5000) * 4)) -w 2000 -n c$i > /dev/null 2>&1; "
        "i=$((i + 1)); done ) &",
        "TR=$!",
        "usleep 500000",
        "c=0",
        f"while [ $c -lt {rounds} ]; do",
        "\tc=$((c + 1)); j=0",
        f"\twhile [ $j -lt {per} ]; do",
        "\t\techo function > $T/current_tracer; usleep 10000; echo nop > $T/current_tracer; usleep 10000",
        "\t\tj=$((j + 1))",
        "\tdone",
        f'\temit "{{\\"type\\":\\"cycle\\",\\"c\\":$c,\\"toggles\\":$((c * {per})),\\"t\\":$(up)}}"',
        "done",
        "touch /tmp/stop; wait $TR",
        "finish 0",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nqgen.lab.soakpoke", description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", type=Path, required=True, help="vmlinuz (or a built kernel) to boot")
    ap.add_argument("--modules-dir", type=Path, required=True)
    ap.add_argument("--kdir", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=300, help="records to stream")
    ap.add_argument("--per", type=int, default=20, help="tracer on/off toggles per record")
    ap.add_argument("--function", default="nf_confirm")
    ap.add_argument("--single-thread", action="store_true", help="qemu -accel tcg,thread=single")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--stall", type=float, default=90.0, help="no record for this long: dump the vCPUs and stop")
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args(argv)
    image = resolve_image(args.kernel, default_cache_dir())
    cfg = LabConfig(kernel=image, modules_dir=args.modules_dir, kdir=args.kdir, memory="1G" if image.kasan else "512M")
    lab, tmp = make_lab(cfg, args.work)
    with tmp:
        deps = lab.deps([])
        init = poke_init(_prologue("queue=-1", deps, lab.guest.release), args.rounds, args.per, args.function)
        run = args.work / ("poke-single" if args.single_thread else "poke-mttcg")
        run.mkdir(parents=True, exist_ok=True)
        (run / "initrd.cpio").write_bytes(lab._initramfs(init, [], deps))
        watch = SoakWatch(run / "poke.cycles.jsonl", f"poke-{args.function}", args.rounds, stall_s=args.stall)
        mon = run / "monitor.sock"
        qc = QemuConfig(kernel=image.boot_path, initrd=run / "initrd.cpio", smp=2, memory=cfg.memory,
                        timeout=args.timeout, accel="tcg,thread=single" if args.single_thread else "tcg",
                        append=("kasan_multi_shot " if image.kasan else "") + "no_timer_check",
                        monitor=mon)  # fmt: skip

        def stuck(results: str, console: str) -> str | None:
            """Before stopping a guest that stopped streaming: each vCPU's registers and the bytes at its RIP."""
            reason = watch(results, console)
            if reason is not None:
                try:
                    regs = monitor_commands(mon, ["info registers -a"])
                    rips = re.findall(r"RIP=([0-9a-f]{16})", regs)
                    rsps = re.findall(r"RSP=([0-9a-f]{16})", regs)
                    # the stack's first words: at an exception entry, the trapped RIP, CS and RFLAGS
                    cmds = [c for i, (rip, rsp) in enumerate(zip(rips, rsps, strict=False))
                            for c in (f"cpu {i}", f"x/8xb 0x{rip}", f"x/3i 0x{rip}", f"x/8gx 0x{rsp}")]  # fmt: skip
                    (run / "monitor.txt").write_text(regs + monitor_commands(mon, cmds))
                except OSError as exc:
                    (run / "monitor.txt").write_text(f"monitor: {exc}\n")
            return reason

        outcome = boot(qc, run, stuck)
    faults = find_faults(outcome.console)
    summary = {"accel": qc.accel, "rounds_done": watch.last_cycle, "toggles": watch.last_cycle * args.per,
               "rounds": args.rounds, "seconds": round(outcome.seconds, 1), "stopped": watch.stopped,
               "guest_exit": outcome.guest_exit, "reports": [f"{f.kind}: {f.title}" for f in faults],
               "int3_loop": "kprobe_int3_handler" in outcome.console or "asm_exc_int3" in outcome.console,
               "monitor": str(run / "monitor.txt") if (run / "monitor.txt").exists() else ""}  # fmt: skip
    watch.end(summary)
    print(json.dumps(summary, indent=2))
    return 0 if outcome.guest_exit == 0 and not faults else 5


if __name__ == "__main__":
    sys.exit(main())
