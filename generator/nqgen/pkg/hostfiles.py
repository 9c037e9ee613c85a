"""What a host gets for one generated module: the files laid out in a staging root, shared by install, rpm, deb.

Laid out (R = the target release, M = the module name, e.g. nq_ftrace):
  lib/modules/R/extra/M.ko                   the module (signed when a key is given)
  etc/modprobe.d/nqgen-M.conf                 its parameters (``options M ...``)
  etc/modules-load.d/nqgen-M.conf             loads it early at boot
  lib/systemd/system/nqgen-M.service          (usr/lib/... on EL) loads it, ordered Before= the NFQUEUE
                                              consumer; unloads it on stop (a livepatch through sysfs)
  usr/share/nqgen/M.env                       what nqgen-status reports (strategy, target, fix, srcversion)
  usr/sbin/nqgen-status, usr/libexec/nqgen/nqgen-unload
                                              POSIX shell (hosts may lack a modern Python)
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .. import __version__
from ..errors import InputError
from ..lab.manifest import Manifest, load_manifest
from ..lab.modtree import modinfo

STATUS_SCRIPT = "usr/sbin/nqgen-status"
UNLOAD_SCRIPT = "usr/libexec/nqgen/nqgen-unload"
_PARAM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^\s'\"\\;&|`$]*$")
_SERVICE = re.compile(r"^[A-Za-z0-9:_.@-]+$")


@dataclass(frozen=True)
class HostModule:
    """One built module and the facts its host files carry."""

    strategy: str
    module: str
    ko: Path
    release: str
    fix_present: bool
    unload: str
    livepatch_sysfs: str | None
    stats_dir: str | None
    counters: tuple[str, ...]
    srcversion: str
    param_help: tuple[tuple[str, str], ...]  # (name, description) from the module's modinfo
    conntrack_file: str | None = None  # /lib/modules/R/kernel/.../nf_conntrack.ko[.xz] it was generated from

    @property
    def unit(self) -> str:
        return f"nqgen-{self.module}.service"


def built_strategies(out: Path) -> list[str]:
    """The strategies of an out/ tree whose module is built, in the out/ Makefile's order."""
    generated = _json(out / "inputs.json").get("generated")
    names = [n for n in generated if isinstance(n, str)] if isinstance(generated, list) else []
    return [n for n in names if (out / n / "nqgen-module.json").is_file() and _ko(out, n).is_file()]


def _ko(out: Path, strategy: str) -> Path:
    m = load_manifest(out / strategy / "nqgen-module.json")
    return m.ko


def _json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}: not an nqgen output directory") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def pick(out: Path, strategy: str | None) -> list[str]:
    """The strategies to act on: the named one, else every built one."""
    built = built_strategies(out)
    if strategy is None:
        if not built:
            raise InputError(f"{out}: no built module: run `make -C {out}` first")
        return built
    if strategy not in built:
        have = ", ".join(built) or "none"
        raise InputError(f"{out}: strategy {strategy} is not generated and built here (built: {have})")
    return [strategy]


def pick_one(out: Path, strategy: str | None) -> str:
    """Exactly one strategy: a host loads one mitigation (ftrace and livepatch even exclude each other)."""
    names = pick(out, strategy)
    if len(names) > 1:
        raise InputError(f"{out} holds {len(names)} built modules ({', '.join(names)}): a host loads one; "
                         "name it with STRATEGY=<name> (--strategy)")  # fmt: skip
    return names[0]


def host_module(out: Path, strategy: str) -> HostModule:
    m: Manifest = load_manifest(out / strategy / "nqgen-module.json")
    if not m.ko.is_file():
        raise InputError(f"{m.ko} is not built: run `make -C {out}` first")
    profile = _json(out / "profile.json")
    features = profile.get("features")
    info = modinfo(m.ko)
    vermagic = (info.get("vermagic") or [""])[0]
    release = str(profile.get("release") or "")
    if vermagic.split(" ", 1)[0] != release:
        raise InputError(f"{m.ko} was built for {vermagic.split(' ', 1)[0] or '?'}, out/ targets {release}")
    module = profile.get("module")
    mod_path = str(module.get("path", "")) if isinstance(module, dict) else ""
    marker = f"/lib/modules/{release}/kernel/"
    conntrack_file = "/lib/modules/" + mod_path.split("/lib/modules/", 1)[1] if marker in mod_path else None
    help_ = []
    for line in info.get("parm", []):
        name, _, desc = line.partition(":")
        help_.append((name.strip(), desc.strip()))
    return HostModule(
        strategy=m.strategy,
        module=m.module,
        ko=m.ko,
        release=release,
        fix_present=bool(isinstance(features, dict) and features.get("fix_present")),
        unload=m.unload,
        livepatch_sysfs=m.livepatch_sysfs,
        stats_dir=m.stats_dir,
        counters=m.counters,
        srcversion=(info.get("srcversion") or [""])[0],
        param_help=tuple(help_),
        conntrack_file=conntrack_file,
    )


def check_params(hm: HostModule, params: str) -> list[str]:
    """``name=value`` words, each naming a parameter the module has; InputError otherwise."""
    words = params.split()
    known = {n for n, _ in hm.param_help}
    for w in words:
        if not _PARAM.match(w):
            raise InputError(f"parameter {w!r}: expected name=value without spaces or shell characters")
        name = w.split("=", 1)[0]
        if name not in known:
            have = ", ".join(sorted(known)) or "none"
            raise InputError(f"{hm.module} has no parameter {name!r} (it has: {have})")
    return words


def check_services(before: list[str]) -> list[str]:
    out = []
    for s in before:
        if not _SERVICE.match(s):
            raise InputError(f"--before {s!r}: not a systemd unit name")
        out.append(s if "." in s else s + ".service")
    return out


def script_text(name: str) -> str:
    return resources.files("nqgen.pkg").joinpath(name).read_text()


def modprobe_conf(hm: HostModule, params: list[str]) -> str:
    lines = [f"# nqgen {hm.strategy} mitigation for {hm.release} (CVE-2022-49561); parameters:"]
    lines += [f"#   {n}: {d}" for n, d in hm.param_help] or ["#   (none)"]
    if params:
        lines.append(f"options {hm.module} {' '.join(params)}")
    return "\n".join(lines) + "\n"


def unit_text(hm: HostModule, before: list[str]) -> str:
    order = " ".join(before)
    stop = f"/usr/libexec/nqgen/nqgen-unload {hm.module}"
    lines = [
        "[Unit]",
        f"Description=nqgen {hm.strategy} mitigation of the conntrack confirm use-after-free (CVE-2022-49561)",
        "Documentation=man:modprobe(8)",
        "After=systemd-modules-load.service",
        *([f"Before={order}"] if order else []),
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        f"ExecStart=/sbin/modprobe {hm.module}",
        f"ExecStop={stop}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    if before:
        lines.append(f"RequiredBy={order}")
    return "\n".join(lines) + "\n"


def env_text(hm: HostModule) -> str:
    pairs = {
        "NQGEN_VERSION": __version__,
        "STRATEGY": hm.strategy,
        "MODULE": hm.module,
        "RELEASE": hm.release,
        "FIX_PRESENT": "1" if hm.fix_present else "0",
        "UNLOAD": hm.unload,
        "LIVEPATCH_SYSFS": hm.livepatch_sysfs or "",
        "STATS_DIR": hm.stats_dir or "",
        "COUNTERS": " ".join(hm.counters),
        "SRCVERSION": hm.srcversion,
    }
    return "".join(f"{k}='{v}'\n" for k, v in pairs.items())


def el_flavour(release: str) -> str | None:
    """'el7', 'el8', ... from a RHEL/CentOS release (3.10.0-1160.el7.x86_64), else None."""
    m = re.search(r"\.(el\d+)", release)
    return m[1] if m else None


def layout_for(release: str) -> str:
    return "el" if el_flavour(release) else "debian"


def unit_dir(layout: str) -> str:
    """Where systemd units go: /usr/lib on EL (usr-merged, owned by rpm there), /lib on Debian 12."""
    return "usr/lib/systemd/system" if layout == "el" else "lib/systemd/system"


def stage(
    hm: HostModule,
    root: Path,
    params: list[str],
    before: list[str],
    ko: Path | None = None,
    layout: str = "debian",
) -> list[str]:
    """Write the host files into ``root``; return their paths relative to it (files only), sorted."""
    files: dict[str, tuple[bytes, int]] = {
        f"lib/modules/{hm.release}/extra/{hm.module}.ko": ((ko or hm.ko).read_bytes(), 0o644),
        f"etc/modprobe.d/nqgen-{hm.module}.conf": (modprobe_conf(hm, params).encode(), 0o644),
        f"etc/modules-load.d/nqgen-{hm.module}.conf": (f"# nqgen {hm.strategy} mitigation\n{hm.module}\n".encode(),
                                                        0o644),
        f"{unit_dir(layout)}/{hm.unit}": (unit_text(hm, before).encode(), 0o644),
        f"usr/share/nqgen/{hm.module}.env": (env_text(hm).encode(), 0o644),
        STATUS_SCRIPT: (script_text("nqgen-status.sh").encode(), 0o755),
        UNLOAD_SCRIPT: (script_text("nqgen-unload.sh").encode(), 0o755),
    }
    for rel, (data, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    return sorted(files)


def copy_sources(out: Path, strategy: str, dest: Path) -> list[str]:
    """The generated C tree of one strategy without build products (for DKMS)."""
    src = out / strategy
    keep = {".c", ".h", ".json"}
    names = []
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and (p.suffix in keep or p.name in ("Kbuild", "Makefile")):
            shutil.copy2(p, dest / p.name)
            names.append(p.name)
    return names
