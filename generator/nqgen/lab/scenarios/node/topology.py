"""Addresses of the node scenario, the DNS data dnsmasq serves and the answers the client must get."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DOMAIN = "pods.test"
POD_NS = "pod"
UP_NS = "upstream"
POD_IF = "veth-pod"  # the node's end towards the pod
UP_IF = "veth-up"  # the node's end towards upstream


@dataclass(frozen=True)
class Family:
    """One address family's plan: subnets, addresses, the nameserver and the ruleset command."""

    name: str  # "ipv4" or "ipv6"
    iptables: str  # the legacy x_tables command
    pod_net: str
    pod: str  # the pod's address (with prefix)
    node_pod: str  # the node's address on the pod side (the pod's gateway)
    node_up: str  # the node's address towards upstream (what MASQUERADE writes)
    upstream: str  # the DNS/TFTP server (with prefix)

    @property
    def server(self) -> str:
        return self.upstream.split("/")[0]

    @property
    def node_up_addr(self) -> str:
        return self.node_up.split("/")[0]

    @property
    def pod_addr(self) -> str:
        return self.pod.split("/")[0]

    @property
    def gateway(self) -> str:
        return self.node_pod.split("/")[0]


IPV4 = Family("ipv4", "iptables", "10.244.1.0/24", "10.244.1.2/24", "10.244.1.1/24", "192.0.2.1/24", "192.0.2.53/24")
IPV6 = Family(
    "ipv6", "ip6tables", "fd00:244:1::/64", "fd00:244:1::2/64", "fd00:244:1::1/64", "2001:db8:1::1/64",
    "2001:db8:1::53/64",
)
FAMILIES = (IPV4, IPV6)


def expected(index: int) -> tuple[str, str]:
    """The A and AAAA answers of ``h<index>.pods.test`` (nq_lookup.c computes the same)."""
    a = ipaddress.IPv4Address(f"100.64.{(index >> 8) & 255}.{index & 255}")
    aaaa = ipaddress.IPv6Address(f"2001:db8:64::{index:x}")
    return str(a), str(aaaa)


def hosts_file(names: int) -> str:
    """dnsmasq's --addn-hosts data: every name with its A and AAAA address."""
    lines = []
    for i in range(names):
        a, aaaa = expected(i)
        lines.append(f"{a} h{i}.{DOMAIN}")
        lines.append(f"{aaaa} h{i}.{DOMAIN}")
    return "\n".join(lines) + "\n"
