"""Debian's own programs in the guest: each binary at its own path with the shared libraries ``ldd`` lists.

The node scenario runs the distribution's dynamically linked programs (iproute2's ``ip``, ``dnsmasq``,
``iptables-legacy``, ``conntrack``, tftp-hpa's client) and a resolver client linked against Debian's glibc. Each
binary and every library the host's ``ldd`` resolves for it are copied to the same absolute paths in the
initramfs (file contents, so the merged-/usr symlinks of the host do not matter); ``iptables``' extension
plugins, which are loaded with ``dlopen``, are copied with their own libraries.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ....errors import InputError
from ...initramfs import Cpio

# program path -> Debian package that provides it (for the error message)
PROGRAMS: dict[str, str] = {
    "/usr/sbin/ip": "iproute2",
    "/usr/sbin/dnsmasq": "dnsmasq-base",
    "/usr/sbin/xtables-legacy-multi": "iptables",
    "/usr/sbin/conntrack": "conntrack",
    "/usr/bin/tftp": "tftp-hpa",
}
# names through which xtables-legacy-multi picks the legacy x_tables front end
XTABLES_LINKS = ("iptables", "ip6tables", "iptables-legacy", "ip6tables-legacy")
XTABLES_PLUGINS = Path("/usr/lib/x86_64-linux-gnu/xtables")
_LDD_ARROW = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x[0-9a-f]+\)")
_LDD_DIRECT = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)")

# The guest's /etc: no passwd database lookups beyond root/nobody, and names resolve through DNS only.
ETC_FILES: dict[str, str] = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: dns\nservices: files\nprotocols: files\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "etc/resolv.conf": "# replaced per namespace through /etc/netns/<ns>/resolv.conf\n",
    "etc/protocols": "ip 0 IP\nicmp 1 ICMP\ntcp 6 TCP\nudp 17 UDP\nipv6-icmp 58 IPv6-ICMP\n",
    "etc/services": "domain 53/udp\ntftp 69/udp\n",
}


@dataclass(frozen=True)
class Userland:
    """Host files to copy: guest path -> host path."""

    files: dict[str, Path]

    def add_to(self, cpio: Cpio) -> None:
        for guest, host in sorted(self.files.items()):
            if not cpio.has(guest):
                cpio.copy(guest, host, 0o755)
        for name in XTABLES_LINKS:
            if not cpio.has(f"usr/sbin/{name}"):
                cpio.symlink(f"usr/sbin/{name}", "xtables-legacy-multi")
        for path, text in ETC_FILES.items():
            if not cpio.has(path):
                cpio.file(path, text.encode())
        for d in ("run", "var/run", "srv/tftp", "etc/netns/pod", "etc/netns/upstream"):
            cpio.directory(d)


def libraries(binary: Path) -> list[Path]:
    """The shared libraries (and the dynamic loader) ``ldd`` lists for ``binary``; [] for a static one."""
    if shutil.which("ldd") is None:
        raise InputError("ldd not found (apt-get install libc-bin)")
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    text = proc.stdout + proc.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if proc.returncode != 0:
        raise InputError(f"ldd {binary} failed: {text.strip()[:200]}")
    out: list[Path] = []
    for line in proc.stdout.splitlines():
        if "not found" in line:
            raise InputError(f"{binary}: library {line.split()[0]} not found on this host")
        m = _LDD_ARROW.match(line) or _LDD_DIRECT.match(line)
        if m:
            out.append(Path(m.groups()[-1]))
    return out


def collect(extra: dict[str, Path] | None = None) -> Userland:
    """Every program of :data:`PROGRAMS` plus ``extra`` (guest path -> host binary) with their libraries."""
    files: dict[str, Path] = {}
    missing = [f"{p} ({pkg})" for p, pkg in PROGRAMS.items() if not Path(p).is_file()]
    if missing:
        raise InputError(f"the node scenario needs {', '.join(missing)}: run scripts/install-deps")
    if not XTABLES_PLUGINS.is_dir():
        raise InputError(f"{XTABLES_PLUGINS} not found (apt-get install iptables)")
    binaries = {p.lstrip("/"): Path(p) for p in PROGRAMS}
    for so in sorted(XTABLES_PLUGINS.glob("*.so")):
        binaries[str(so).lstrip("/")] = so
    binaries.update(extra or {})
    for guest, host in binaries.items():
        files[guest] = host
        for lib in libraries(host):
            files.setdefault(str(lib).lstrip("/"), lib.resolve())
    return Userland(files)
