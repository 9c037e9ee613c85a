"""The ``node`` scenario: the crash's real-world setting, built from Debian's own software inside the guest.

Inside the guest only (qemu has no network device), in network namespaces created with iproute2's ``ip``:
a ``pod`` namespace behind a veth pair, an ``upstream`` namespace running ``dnsmasq`` (A and AAAA for a
few hundred names, and TFTP from its built-in server), and the node (the initial namespace) routing
between them with a real /``ip6tables-legacy`` ruleset: MASQUERADE of the pod subnets, an NFQUEUE rule for UDP
(``--queue-balance``, ``--queue-bypass``) served by a consumer that holds packets briefly, and the TFTP
conntrack helper attached through the raw table. ``conntrack -E`` listens to events. The pod's client is
glibc's resolver (``getaddrinfo(AF_UNSPEC)`` in several threads, linked against Debian's glibc) and
tftp-hpa's ``tftp``. The upstream namespace has no route back to the pod subnets, so an answer that
reaches the pod came back through the MASQUERADE translation.

Modules: ``topology`` (addresses, names, expected answers), ``userland`` (Debian programs and their
libraries in the initramfs), ``kmods`` (the kernel modules the ruleset needs, building the ones a
reference kernel left out from its own source), ``script`` (the guest's /init), ``results``,
``runner`` (the boots), ``report`` (tables, chart, COMPARISON.md section).
"""
