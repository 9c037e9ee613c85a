"""The node scenario's /init: build the node from real programs, run the pod's lookups, report JSON lines.

It reuses the seed lab's shell helpers (``emit``, ``load``, ``counters``, ``ctstat``, ``taint``, the
livepatch wait and the unload block) so the common records parse the same way; the node adds
``node`` (setup steps), ``ruleset``, ``lookups``, ``tftp`` and ``capture`` (conntrack -E events and the
dnsmasq query log, gzip + base64) records.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from ...guest import DETECTOR_COUNTS, PRELUDE, RESULT_TTY, GuestModule, GuestPlan, patched_block, unload_block
from .topology import DOMAIN, FAMILIES, POD_IF, POD_NS, UP_IF, UP_NS

EXIT_DONE = 0
EXIT_DEP_FAILED = 3
EXIT_SETUP_FAILED = 6
TFTP_FILE = "blob.bin"
HOSTS_PATH = "/etc/nq-hosts"


@dataclass(frozen=True)
class NodeWorkload:
    """What the pod does, and how the node's NFQUEUE consumer behaves."""

    lookups: int = 200  # per family
    threads: int = 4  # getaddrinfo threads in the pod
    deadline_s: int = 30  # no new lookup starts after this (a NAT that drops answers costs 5-10 s each)
    names: int = 400  # names in dnsmasq's data
    health_lookups: int = 20  # per family, after the unload
    tftp: bool = True
    queue: bool = True  # the ruleset sends UDP through NFQUEUE
    queue_base: int = 0
    queue_count: int = 2  # --queue-balance BASE:BASE+COUNT-1
    queue_delay_us: int = 200
    queue_workers: int = 1  # 1: verdicts one at a time in arrival order; >1: a worker pool


@dataclass(frozen=True)
class NodePlan:
    """One boot of the node scenario."""

    run: str
    deps: tuple[GuestModule, ...]
    workload: NodeWorkload
    mitigation: GuestPlan | None = None  # a seed-lab plan carrying the mitigation's load/unload facts
    extra_queues: tuple[int, int] | None = None  # (base, count) the mitigation queues to itself
    dns_args: tuple[str, ...] = field(default_factory=tuple)
    detector: GuestModule | None = None  # nqlab_detect, loaded after the kernel's modules


def _q(value: str) -> str:
    return shlex.quote(value)


_NODE_HELPERS = r"""
step() {
	what=$1; shift
	"$@" > /tmp/step.out 2>&1
	rc=$?
	if [ $rc != 0 ]; then
		emit "{\"type\":\"node\",\"step\":\"$what\",\"rc\":$rc,\"b64\":\"$(b64 /tmp/step.out)\"}"
	fi
	return $rc
}
lookups() {
	/usr/sbin/ip netns exec __POD__ /usr/bin/nq_lookup -f "$2" -n "$3" -t "$THREADS" -d "$DEADLINE" \
		-D __DOMAIN__ -T "$1" \
		> /tmp/lookups.json 2> /tmp/lookups.err
	rc=$?
	cat /tmp/lookups.json > $R
	emit "{\"type\":\"program\",\"name\":\"$1\",\"rc\":$rc,\"stderr_b64\":\"$(b64 /tmp/lookups.err)\"}"
}
nameserver() {
	printf 'nameserver %s\n' "$1" > /etc/netns/__POD__/resolv.conf
}
tftp_get() {
	fam=$1; flag=$2; server=$3
	rm -f /tmp/tftp.$fam
	t0=$(cut -d ' ' -f 1 /proc/uptime)
	timeout 15 /usr/sbin/ip netns exec __POD__ /usr/bin/tftp $flag -m binary "$server" -c get __TFTP__ /tmp/tftp.$fam \
		> /tmp/tftp.err 2>&1
	rc=$?
	t1=$(cut -d ' ' -f 1 /proc/uptime)
	same=false
	cmp -s /srv/tftp/__TFTP__ /tmp/tftp.$fam && same=true
	head="\"type\":\"tftp\",\"family\":\"$fam\",\"rc\":$rc,\"same\":$same,\"t0\":$t0,\"t1\":$t1"
	emit "{$head,\"b64\":\"$(b64 /tmp/tftp.err)\"}"
}
capture() {
	if [ -e "$2" ]; then
		emit "{\"type\":\"capture\",\"what\":\"$1\",\"gz_b64\":\"$(gzip -c "$2" | base64 -w 0)\"}"
	else
		emit "{\"type\":\"capture\",\"what\":\"$1\",\"gz_b64\":null}"
	fi
}
"""


def _setup_lines() -> list[str]:
    lines = [
        f"step netns-pod $IP netns add {POD_NS} || finish {EXIT_SETUP_FAILED}",
        f"step netns-upstream $IP netns add {UP_NS} || finish {EXIT_SETUP_FAILED}",
        f"step veth-pod $IP link add {POD_IF} type veth peer name eth0 netns {POD_NS} || finish {EXIT_SETUP_FAILED}",
        f"step veth-up $IP link add {UP_IF} type veth peer name eth0 netns {UP_NS} || finish {EXIT_SETUP_FAILED}",
    ]
    for fam in FAMILIES:
        six = " nodad" if fam.name == "ipv6" else ""
        lines += [
            f"step addr-node-pod-{fam.name} $IP addr add {fam.node_pod} dev {POD_IF}{six}",
            f"step addr-node-up-{fam.name} $IP addr add {fam.node_up} dev {UP_IF}{six}",
            f"step addr-pod-{fam.name} $IP -n {POD_NS} addr add {fam.pod} dev eth0{six}",
            f"step addr-up-{fam.name} $IP -n {UP_NS} addr add {fam.upstream} dev eth0{six}",
        ]
    lines += [
        f"for l in {POD_IF} {UP_IF}; do step link-$l $IP link set $l up; done",
        f"for n in {POD_NS} {UP_NS}; do step lo-$n $IP -n $n link set lo up;"
        " step eth0-$n $IP -n $n link set eth0 up; done",
    ]
    for fam in FAMILIES:
        flag = "-6 " if fam.name == "ipv6" else ""
        lines.append(f"step route-pod-{fam.name} $IP -n {POD_NS} {flag}route add default via {fam.gateway}")
    # upstream gets no route back to the pod subnets: only a translated query can be answered
    lines += [
        "echo 1 > /proc/sys/net/ipv4/ip_forward",
        "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding",
    ]
    return lines


def _ruleset_lines(w: NodeWorkload) -> list[str]:
    lines = []
    last = w.queue_base + w.queue_count - 1
    for fam in FAMILIES:
        ipt = fam.iptables
        lines.append(
            f"step masq-{fam.name} /usr/sbin/{ipt} -t nat -A POSTROUTING -s {fam.pod_net} -o {UP_IF} -j MASQUERADE"
            f" || finish {EXIT_SETUP_FAILED}"
        )
        if w.queue:
            lines.append(
                f"step nfqueue-{fam.name} /usr/sbin/{ipt} -A FORWARD -p udp -j NFQUEUE"
                f" --queue-balance {w.queue_base}:{last} --queue-bypass || finish {EXIT_SETUP_FAILED}"
            )
        if w.tftp:
            lines.append(
                f"step tftp-helper-{fam.name} /usr/sbin/{ipt} -t raw -A PREROUTING -i {POD_IF} -p udp --dport 69"
                f" -j CT --helper tftp || finish {EXIT_SETUP_FAILED}"
            )
    lines.append(
        "{ /usr/sbin/iptables-save; /usr/sbin/ip6tables-save; } > /tmp/ruleset 2>&1; "
        'emit "{\\"type\\":\\"ruleset\\",\\"b64\\":\\"$(b64 /tmp/ruleset)\\"}"'
    )
    return lines


def _servers_lines(plan: NodePlan) -> list[str]:
    v4, v6 = FAMILIES
    dns = " ".join(_q(a) for a in plan.dns_args)
    lines = [
        f"$IP netns exec {UP_NS} /usr/sbin/dnsmasq -k -C /dev/null --no-resolv --no-hosts --addn-hosts={HOSTS_PATH}"
        f" --bind-interfaces --listen-address={v4.server} --listen-address={v6.server} -u root -g root"
        " --pid-file=/tmp/dnsmasq.pid --log-queries --log-facility=/tmp/dnsmasq.log --dns-forward-max=1000"
        # dnsmasq's own TFTP server: data leaves from a new port, so the reply needs the conntrack helper
        f" --enable-tftp --tftp-root=/srv/tftp {dns} > /tmp/dnsmasq.out 2>&1 &",
        "DNS=$!",
        "i=0",
        f"while ! grep -q 'read {HOSTS_PATH}' /tmp/dnsmasq.log 2>/dev/null && [ $i -lt 250 ]; do"
        " usleep 20000; i=$((i + 1)); done",
        f"grep -q 'read {HOSTS_PATH}' /tmp/dnsmasq.log 2>/dev/null || "
        '{ cat /tmp/dnsmasq.out /tmp/dnsmasq.log > /tmp/step.out 2>&1; '
        'emit "{\\"type\\":\\"node\\",\\"step\\":\\"dnsmasq\\",\\"rc\\":1,\\"b64\\":\\"$(b64 /tmp/step.out)\\"}"; '
        f"finish {EXIT_SETUP_FAILED}; }}",
        "/usr/sbin/conntrack -E > /tmp/ct.events 2> /tmp/ct.err &",
        "CT=$!",
    ]
    return lines


def _queue_lines(plan: NodePlan) -> list[str]:
    w = plan.workload
    ranges = []
    if w.queue:
        ranges.append((w.queue_base, w.queue_count))
    if plan.extra_queues is not None:
        ranges.append(plan.extra_queues)
    if not ranges:
        return ["Q="]
    lo = min(b for b, _ in ranges)
    hi = max(b + c for b, c in ranges)
    return [
        f"/bin/nq_nfqpool -b {lo} -c {hi - lo} -d {w.queue_delay_us} -w {w.queue_workers} -r /tmp/q.ready"
        " > /tmp/q.json 2>&1 &",
        "Q=$!",
        'wait_file /tmp/q.ready || emit "{\\"type\\":\\"error\\",\\"what\\":\\"queue-not-ready\\"}"',
    ]


def _traffic_lines(w: NodeWorkload, phase: str, first: int, count: int) -> list[str]:
    lines = []
    for fam in FAMILIES:
        lines.append(f"nameserver {fam.server}")
        lines.append(f"lookups {phase}-{fam.name} {first} {count}")
    if phase == "workload" and w.tftp:
        for fam in FAMILIES:
            flag = "-4" if fam.name == "ipv4" else "-6"
            lines.append(f"tftp_get {fam.name} {flag} {fam.server}")
    return lines


def render_node_init(plan: NodePlan) -> str:
    """The /init script of one node-scenario boot."""
    w = plan.workload
    helpers = (
        _NODE_HELPERS.replace("__POD__", POD_NS).replace("__DOMAIN__", DOMAIN).replace("__TFTP__", TFTP_FILE)
    )
    lines = [PRELUDE.replace("__TTY__", RESULT_TTY).replace("__COUNTS__", DETECTOR_COUNTS), helpers]
    m = plan.mitigation
    lines += [
        "PATH=/usr/sbin:/usr/bin:/bin",
        "IP=/usr/sbin/ip",
        "export PATH",
        f"RUN={_q(plan.run)}",
        f"THREADS={w.threads}",
        f"DEADLINE={w.deadline_s}",
        f"SD={_q(m.stats_dir or '') if m is not None else _q('')}",
        f"COUNTERS={_q(' '.join(m.counters) if m is not None else '')}",
        'emit "{\\"type\\":\\"boot\\",\\"run\\":\\"$RUN\\",\\"release\\":\\"$(uname -r)\\",\\"cpus\\":$(nproc)}"',
        "ip link set lo up",
        "taint boot",
    ]
    for mod in plan.deps:
        opt = "true" if mod.optional else "false"
        cmd = f"load dep {_q(mod.name)} {_q(mod.path)} {opt}"
        lines.append(cmd if mod.optional else f"{cmd} || finish {EXIT_DEP_FAILED}")
    lines.append("DET=")
    if plan.detector is not None:  # after nf_nat, so that nf_nat_setup_info is probed too
        d = plan.detector
        lines.append(f"load detector {_q(d.name)} {_q(d.path)} true && DET=1")
    lines += _setup_lines()
    lines += _ruleset_lines(w)
    lines += _servers_lines(plan)
    lines += _queue_lines(plan)
    lines += ["usleep 300000", "ctstat before", "detector before", "taint before", "MIT=0"]
    if m is not None and m.mitigation is not None:
        mod = m.mitigation
        params = " ".join(_q(p) for p in mod.params)
        lines.append(f"load mitigation {_q(mod.name)} {_q(mod.path)} false {params} && MIT=1")
        if m.unload == "livepatch":
            lines.append(patched_block(m))
        lines += ["counters loaded", "taint loaded"]
    lines += _traffic_lines(w, "workload", 0, w.lookups)
    # where the workload ends in the event stream and the query log (conntrack -E flushes every event)
    lines.append('emit "{\\"type\\":\\"marks\\",\\"phase\\":\\"workload\\",'
                 '\\"ctevents\\":$(wc -l < /tmp/ct.events),\\"dnsmasq\\":$(wc -l < /tmp/dnsmasq.log)}"')
    lines += ["counters workload", "ctstat workload", "detector workload", "taint workload"]
    if m is not None and m.mitigation is not None:
        lines += [unload_block(m), "counters unloaded", "taint unloaded"]
    lines += _traffic_lines(w, "health", w.lookups % max(w.names, 1), w.health_lookups)
    # no detector reading after the unload: the health lookups run unprotected by design (on 3.10 through NFQUEUE
    # nearly every lookup clashes), so stale uses and NAT on hashed entries are counted up to the workload's end
    lines += ["ctstat health", "taint health"]
    lines += [
        '[ -n "$Q" ] && kill -TERM $Q',
        "kill -TERM $CT $DNS 2>/dev/null",
        "wait",
        '[ -n "$Q" ] && cat /tmp/q.json > $R',
        "capture ctevents /tmp/ct.events",
        "capture dnsmasq /tmp/dnsmasq.log",
        "capture ruleset-errors /tmp/ct.err",
        f"finish {EXIT_DONE}",
    ]
    return "\n".join(lines) + "\n"
