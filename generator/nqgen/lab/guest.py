"""The guest's plan for one boot and the busybox ``/init`` script that carries it out.

Every result leaves the guest as one JSON object per line on the second serial port (/dev/ttyS1);
free text (insmod's stderr, kernel log chunks, /proc/net/stat/nf_conntrack) travels base64-encoded
inside those objects.  The console (ttyS0) is kept for the kernel's own reports.  The last record is
``{"type":"done"}``; then the init writes the exit byte to qemu's isa-debug-exit port.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

RESULT_TTY = "/dev/ttyS1"
WORKLOAD_DPORT = 5000
HEALTH_DPORT = 5001
SPORT_BASE = 20000
MAX_ROUNDS = 40000
EXIT_DONE = 0  # qemu exits with (v << 1) | 1 = 1
EXIT_DEP_FAILED = 3
EXIT_HELPER_FAILED = 4
DETECTOR_COUNTS = "/sys/module/nqlab_detect/parameters/counts"


@dataclass(frozen=True)
class GuestModule:
    """A module the guest loads with insmod."""

    name: str
    path: str  # path inside the guest
    role: str  # "dep", "helper" or "mitigation"
    params: tuple[str, ...] = ()
    optional: bool = False


@dataclass(frozen=True)
class Workload:
    """What traffic the guest drives."""

    rounds: int = 500
    threads: int = 2
    families: str = "46"  # "4", "6" or "46"
    queue_delay_us: int = 200
    health_rounds: int = 50
    drain_ms: int = 1500


@dataclass(frozen=True)
class GuestPlan:
    """Everything one boot does."""

    run: str
    deps: tuple[GuestModule, ...]
    helper: GuestModule
    mitigation: GuestModule | None
    workload: Workload
    stats_dir: str | None = None
    counters: tuple[str, ...] = ()
    unload: str = "rmmod"  # "rmmod" or "livepatch"
    livepatch_sysfs: str | None = None
    ftrace_permanent: bool | None = None  # None: not an ftrace-based module, no sysctl check
    patched: tuple[str, ...] = ()  # functions the kernel must show as patched while the module is loaded
    bridge: bool = False  # after the workload, ping out through a bridge (nf_conntrack_bridge calls nf_confirm)
    queue_base: int | None = None  # the NFQUEUE consumer binds queue_base..queue_base+queue_count-1
    queue_count: int = 0
    detector: GuestModule | None = None  # the stale-use detector, loaded after the kernel's modules
    # a second generated module loaded before the mitigation and left loaded (does it coexist?)
    companion: GuestModule | None = None
    companion_livepatch_sysfs: str | None = None  # its livepatch directory when it is a livepatch


_PRELUDE = r"""#!/bin/sh
PATH=/bin:/sbin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp
R=__TTY__
stty -F $R raw -echo 2>/dev/null
b64() { base64 -w 0 "$1" 2>/dev/null; }
emit() { printf '%s\n' "$1" > $R; }
finish() {
	dmesg -c > /tmp/kmsg 2>/dev/null
	emit "{\"type\":\"log\",\"phase\":\"end\",\"b64\":\"$(b64 /tmp/kmsg)\"}"
	emit "{\"type\":\"done\",\"code\":$1}"
	sync
	printf "\\$(printf '%03o' "$1")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
	poweroff -f
}
log() {
	dmesg -c > /tmp/kmsg 2>/dev/null
	[ -s /tmp/kmsg ] && emit "{\"type\":\"log\",\"phase\":\"$1\",\"b64\":\"$(b64 /tmp/kmsg)\"}"
	return 0
}
load() {
	role=$1; name=$2; path=$3; opt=$4; shift 4
	log "before-$name"
	insmod "$path" "$@" 2>/tmp/insmod.err
	rc=$?
	dmesg -c > /tmp/kmsg 2>/dev/null
	up=$(cut -d ' ' -f 1 /proc/uptime)
	head="\"type\":\"insmod\",\"role\":\"$role\",\"module\":\"$name\",\"optional\":$opt,\"rc\":$rc,\"uptime\":$up"
	emit "{$head,\"stderr_b64\":\"$(b64 /tmp/insmod.err)\",\"dmesg_b64\":\"$(b64 /tmp/kmsg)\"}"
	return $rc
}
counters() {
	[ -n "$SD" ] || return 0
	out=""
	sep=""
	for c in $COUNTERS; do
		v=$(head -n 1 "$SD/$c" 2>/dev/null | tr -d ' \n')
		case "$v" in ''|*[!0-9-]*) v=null;; esac
		out="$out$sep\"$c\":$v"
		sep=","
	done
	present=false
	[ -d "$SD" ] && present=true
	emit "{\"type\":\"counters\",\"phase\":\"$1\",\"present\":$present,\"values\":{$out}}"
}
ctstat() {
	if [ -r /proc/net/stat/nf_conntrack ]; then
		emit "{\"type\":\"ctstat\",\"phase\":\"$1\",\"b64\":\"$(base64 -w 0 /proc/net/stat/nf_conntrack)\"}"
	else
		emit "{\"type\":\"ctstat\",\"phase\":\"$1\",\"b64\":null}"
	fi
}
taint() {
	up=$(cut -d ' ' -f 1 /proc/uptime)
	emit "{\"type\":\"taint\",\"phase\":\"$1\",\"value\":$(cat /proc/sys/kernel/tainted),\"uptime\":$up}"
}
traffic() {
	/bin/nq_udprace -r "$2" -t "$5" -f "$FAMILIES" -p "$3" -s "$4" -w "$DRAIN" -n "$1" \
		> /tmp/traffic.json 2> /tmp/traffic.err
	rc=$?
	cat /tmp/traffic.json > $R
	emit "{\"type\":\"program\",\"name\":\"$1\",\"rc\":$rc,\"stderr_b64\":\"$(b64 /tmp/traffic.err)\"}"
}
detector() {
	[ -n "$DET" ] || return 0
	c=$(cat __COUNTS__ 2>/dev/null)
	[ -n "$c" ] || c=null
	emit "{\"type\":\"detector\",\"phase\":\"$1\",\"counts\":$c}"
}
wait_file() {
	i=0
	while [ ! -e "$1" ] && [ $i -lt 250 ]; do usleep 20000; i=$((i + 1)); done
	[ -e "$1" ]
}
"""


def _q(value: str) -> str:
    return shlex.quote(value)


def render_init(plan: GuestPlan) -> str:
    """The /init script for one boot."""
    w = plan.workload
    lines = [_PRELUDE.replace("__TTY__", RESULT_TTY).replace("__COUNTS__", DETECTOR_COUNTS)]
    lines.append(f"RUN={_q(plan.run)}")
    lines.append(f"THREADS={w.threads}")
    lines.append(f"FAMILIES={_q(w.families)}")
    lines.append(f"DRAIN={w.drain_ms}")
    lines.append(f"SD={_q(plan.stats_dir or '')}")
    lines.append(f"COUNTERS={_q(' '.join(plan.counters))}")
    lines.append(
        'emit "{\\"type\\":\\"boot\\",\\"run\\":\\"$RUN\\",\\"release\\":\\"$(uname -r)\\",'
        '\\"cpus\\":$(nproc)}"'
    )
    lines.append("ip link set lo up")
    lines.append("taint boot")
    for mod in plan.deps:
        opt = "true" if mod.optional else "false"
        cmd = f"load dep {_q(mod.name)} {_q(mod.path)} {opt}"
        lines.append(cmd if mod.optional else f"{cmd} || finish {EXIT_DEP_FAILED}")
    lines.append("DET=")
    if plan.detector is not None:
        d = plan.detector
        lines.append(f"load detector {_q(d.name)} {_q(d.path)} true && DET=1")
    lines.append("/bin/nq_ctevents -r /tmp/ev.ready > /tmp/ev.json 2>&1 &")
    lines.append("EV=$!")
    lines.append('wait_file /tmp/ev.ready || emit "{\\"type\\":\\"error\\",\\"what\\":\\"ctevents-not-ready\\"}"')
    helper_params = " ".join(_q(p) for p in plan.helper.params)
    lines.append(
        f"load helper {_q(plan.helper.name)} {_q(plan.helper.path)} false {helper_params}"
        f" || finish {EXIT_HELPER_FAILED}"
    )
    lines.append("Q=")
    if plan.queue_base is not None and plan.queue_count > 0:
        lines.append(
            f"/bin/nq_queue -b {plan.queue_base} -c {plan.queue_count} -d {w.queue_delay_us}"
            " -r /tmp/q.ready > /tmp/q.json 2>&1 &"
        )
        lines.append("Q=$!")
        lines.append('wait_file /tmp/q.ready || emit "{\\"type\\":\\"error\\",\\"what\\":\\"queue-not-ready\\"}"')
    if plan.companion is not None:
        c = plan.companion
        cparams = " ".join(_q(p) for p in c.params)
        lines.append(f"load companion {_q(c.name)} {_q(c.path)} false {cparams} && CMP=1")
        if plan.companion_livepatch_sysfs is not None:
            lines.append(_livepatch_wait_block(_q(plan.companion_livepatch_sysfs), "CMP"))
    lines.append("ctstat before")
    lines.append("detector before")
    lines.append("taint before")
    lines.append("MIT=0")
    if plan.mitigation is not None:
        m = plan.mitigation
        params = " ".join(_q(p) for p in m.params)
        lines.append(f"load mitigation {_q(m.name)} {_q(m.path)} false {params} && MIT=1")
        if plan.unload == "livepatch":
            lines.append(_patched_block(plan))
        if plan.patched:
            lines.append(_patched_functions_block(plan))
        if plan.ftrace_permanent is not None:
            lines.append(_ftrace_enabled_block(plan))
        lines.append("counters loaded")
        lines.append("taint loaded")
    lines.append(f"traffic workload {w.rounds} {WORKLOAD_DPORT} {SPORT_BASE} $THREADS")
    lines.append("counters workload")
    lines.append("ctstat workload")
    lines.append("detector workload")
    lines.append("taint workload")
    if plan.mitigation is not None and plan.bridge:
        lines.append(_bridge_block(plan))
    if plan.mitigation is not None:
        lines.append(_unload_block(plan))
        lines.append("counters unloaded")
        lines.append("taint unloaded")
    # one sender per flow: no clash race, so a vulnerable kernel cannot fault here on its own bug
    lines.append(f"traffic health {w.health_rounds} {HEALTH_DPORT} {SPORT_BASE + w.rounds} 1")
    lines.append("ctstat health")
    lines.append("taint health")
    lines.append('[ -n "$Q" ] && kill -TERM $Q')
    lines.append("kill -TERM $EV")
    lines.append("wait")
    lines.append("[ -n \"$Q\" ] && cat /tmp/q.json > $R")
    lines.append("cat /tmp/ev.json > $R")
    lines.append("detector end")
    lines.append(f"finish {EXIT_DONE}")
    return "\n".join(lines) + "\n"


def _livepatch_dir(plan: GuestPlan) -> str:
    assert plan.mitigation is not None
    return _q(plan.livepatch_sysfs or f"/sys/kernel/livepatch/{plan.mitigation.name}")


def _patched_block(plan: GuestPlan) -> str:
    """Wait until the mitigation's livepatch transition finished, so the workload runs fully patched."""
    return _livepatch_wait_block(_livepatch_dir(plan), "MIT")


def _livepatch_wait_block(lp_dir: str, loaded_var: str) -> str:
    """Wait until the livepatch in ``lp_dir`` finished its transition (when ``$loaded_var`` is 1)."""
    return (
        f'if [ "${loaded_var}" = 1 ]; then\n'
        f"\tLP={lp_dir}\n"
        "\ti=0\n"
        '\twhile [ "$(cat "$LP/transition" 2>/dev/null)" != 0 ] && [ $i -lt 300 ]; do\n'
        "\t\tusleep 100000\n\t\ti=$((i + 1))\n\tdone\n"
        '\tEN=$(cat "$LP/enabled" 2>/dev/null || echo missing)\n'
        '\tTR=$(cat "$LP/transition" 2>/dev/null || echo missing)\n'
        # the tasks still unpatched (patch_state 0) keep the transition open: name them (4.12+ has the file)
        '\tPEND=""\n'
        '\tif [ "$TR" = 1 ]; then\n'
        "\t\tfor t in /proc/[0-9]*/task/[0-9]*; do\n"
        '\t\t\t[ "$(cat "$t/patch_state" 2>/dev/null)" = 0 ] || continue\n'
        '\t\t\tPEND="$PEND${PEND:+ }$(tr -d \'"\\\\ \' < "$t/comm" 2>/dev/null):${t##*/}"\n'
        "\t\tdone\n"
        "\tfi\n"
        '\temit "{\\"type\\":\\"livepatch\\",\\"enabled\\":\\"$EN\\",\\"transition\\":\\"$TR\\",'
        '\\"waited_ms\\":$((i * 100)),\\"pending\\":\\"$PEND\\"}"\n'
        "fi"
    )


def _patched_functions_block(plan: GuestPlan) -> str:
    """Whether the kernel itself lists each function as patched: livepatch's sysfs function directories, or
    ftrace's enabled_functions (tracefs) with an IPMODIFY ("I") record."""
    assert plan.mitigation is not None
    names = " ".join(_q(n) for n in plan.patched)
    if plan.unload == "livepatch":
        test = '[ -n "$(ls -d "$LP"/*/"$fn",* 2>/dev/null)" ]'
        how = "livepatch-sysfs"
        setup = f"\tLP={_livepatch_dir(plan)}\n"
    else:
        test = 'grep "^$fn " "$EF" 2>/dev/null | grep -q " I"'
        how = "ftrace-enabled_functions"
        # tracefs came with 4.1; 3.10 (RHEL 7) has the same file under debugfs
        setup = (
            "\tmount -t tracefs nodev /sys/kernel/tracing 2>/dev/null\n"
            "\tEF=/sys/kernel/tracing/enabled_functions\n"
            '\tif [ ! -r "$EF" ]; then\n'
            "\t\tmount -t debugfs nodev /sys/kernel/debug 2>/dev/null\n"
            "\t\tEF=/sys/kernel/debug/tracing/enabled_functions\n"
            "\tfi\n"
        )
    return (
        'if [ "$MIT" = 1 ]; then\n'
        f"{setup}"
        f"\tfor fn in {names}; do\n"
        f"\t\tP=false\n\t\t{test} && P=true\n"
        f'\t\temit "{{\\"type\\":\\"patched\\",\\"function\\":\\"$fn\\",\\"present\\":$P,\\"how\\":\\"{how}\\"}}"\n'
        "\tdone\n"
        "fi"
    )


def _ftrace_enabled_block(plan: GuestPlan) -> str:
    """Try ``sysctl kernel.ftrace_enabled=0`` with the module loaded, record whether the kernel refused, and
    put 1 back: with FTRACE_OPS_FL_PERMANENT the kernel refuses (EBUSY) instead of turning the redirect off."""
    expect = "true" if plan.ftrace_permanent else "false"
    return (
        'if [ "$MIT" = 1 ] && [ -w /proc/sys/kernel/ftrace_enabled ]; then\n'
        "\techo 0 > /proc/sys/kernel/ftrace_enabled 2>/tmp/fe.err\n"
        "\tFRC=$?\n"
        "\tFV=$(cat /proc/sys/kernel/ftrace_enabled)\n"
        "\techo 1 > /proc/sys/kernel/ftrace_enabled 2>/dev/null\n"
        f'\temit "{{\\"type\\":\\"ftrace_enabled\\",\\"write_rc\\":$FRC,\\"value_after\\":\\"$FV\\",'
        f'\\"expect_refused\\":{expect},\\"stderr_b64\\":\\"$(b64 /tmp/fe.err)\\"}}"\n'
        "fi"
    )


def _bridge_block(plan: GuestPlan) -> str:
    """Send IPv4 and IPv6 pings out through a bridge (a dummy port), so nf_conntrack_bridge's POST_ROUTING hook
    calls nf_confirm() on them: the patched nf_confirm must count them in nf_confirm_calls."""
    return (
        'if [ "$MIT" = 1 ]; then\n'
        "\tBR=false\n"
        "\t: > /tmp/br.err\n"
        "\tip link add nqd0 type dummy 2>>/tmp/br.err && ip link add nqbr0 type bridge 2>>/tmp/br.err"
        " && ip link set nqd0 master nqbr0 2>>/tmp/br.err && ip link set nqd0 up 2>>/tmp/br.err"
        " && BR=true\n"
        '\tif [ "$BR" = true ]; then\n'
        "\t\techo 0 > /proc/sys/net/ipv6/conf/nqbr0/accept_dad 2>/dev/null\n"
        "\t\tip link set nqbr0 up 2>>/tmp/br.err && ip addr add 10.77.0.1/24 dev nqbr0 2>>/tmp/br.err"
        " && arp -s 10.77.0.2 02:00:00:00:00:02 2>>/tmp/br.err || BR=false\n"
        "\tfi\n"
        '\tNB=$(head -n 1 "$SD/nf_confirm_calls" 2>/dev/null | tr -d " \\n")\n'
        '\tif [ "$BR" = true ]; then\n'
        "\t\tping -c 3 -W 1 10.77.0.2 > /dev/null 2>&1\n"
        "\t\tping6 -c 3 -W 1 -I nqbr0 ff02::1 > /dev/null 2>&1\n"
        "\tfi\n"
        '\tNA=$(head -n 1 "$SD/nf_confirm_calls" 2>/dev/null | tr -d " \\n")\n'
        '\temit "{\\"type\\":\\"bridge\\",\\"setup\\":$BR,\\"nf_confirm_before\\":${NB:-null},'
        '\\"nf_confirm_after\\":${NA:-null},\\"stderr_b64\\":\\"$(b64 /tmp/br.err)\\"}"\n'
        "\tcounters bridge\n"
        "fi"
    )


def _unload_block(plan: GuestPlan) -> str:
    assert plan.mitigation is not None
    name = _q(plan.mitigation.name)
    if plan.unload == "livepatch":
        lp = _livepatch_dir(plan)
        # a disable while the enable transition is pending reverses it mid-way (the soak's lockups): wait first
        disable = (
            f"LP={lp}\n"
            "\ti=0\n"
            '\twhile [ -e "$LP/transition" ] && [ "$(cat "$LP/transition" 2>/dev/null)" != 0 ]'
            " && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); done\n"
            "\tENWAIT=$((i * 100))\n"
            '\techo 0 > "$LP/enabled" 2>/tmp/unload.err\n'
            "\tDRC=$?\n"
            "\ti=0\n"
            '\twhile [ -e "$LP/transition" ] && [ "$(cat "$LP/transition" 2>/dev/null)" != 0 ]'
            " && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); done\n"
            '\tTR=$(cat "$LP/transition" 2>/dev/null || echo gone)\n'
            "\tWAITED=$((i * 100))\n"
            "\t[ -e \"$LP\" ] && [ \"$TR\" = 0 ] && usleep 200000\n"
        )
        method = "livepatch"
    else:
        disable = "DRC=0\n\tTR=none\n\tWAITED=0\n\tENWAIT=0\n\t: > /tmp/unload.err\n"
        method = "rmmod"
    return (
        'if [ "$MIT" = 1 ]; then\n'
        f"\tlog before-unload\n\t{disable}"
        f"\trmmod {name} 2>>/tmp/unload.err\n"
        "\tRRC=$?\n"
        "\tdmesg -c > /tmp/kmsg 2>/dev/null\n"
        "\tLOADED=false\n"
        f"\tgrep -q '^{plan.mitigation.name} ' /proc/modules && LOADED=true\n"
        f'\temit "{{\\"type\\":\\"unload\\",\\"method\\":\\"{method}\\",\\"disable_rc\\":$DRC,'
        '\\"transition\\":\\"$TR\\",\\"enable_wait_ms\\":$ENWAIT,\\"waited_ms\\":$WAITED,\\"rmmod_rc\\":$RRC,\\"still_loaded\\":$LOADED,'
        '\\"stderr_b64\\":\\"$(b64 /tmp/unload.err)\\",\\"dmesg_b64\\":\\"$(b64 /tmp/kmsg)\\"}"\n'
        "fi"
    )


# Shared with the lab's scenarios (nqgen.lab.scenarios): the shell helpers and the mitigation blocks.
PRELUDE = _PRELUDE
patched_block = _patched_block
unload_block = _unload_block
