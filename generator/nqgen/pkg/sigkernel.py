"""A variant of the reference kernel that enforces module signatures and trusts nqgen's test certificate.

Same source and patches as ``nqgen.reprokernel`` (Debian's linux-source-6.1, the fix reverted), same config
fragment without KASAN (faster to build and boot; signatures do not need it), plus ``CONFIG_MODULE_SIG_FORCE``
and the test certificate in ``CONFIG_SYSTEM_TRUSTED_KEYS``. The kernel's own modules are signed with its
build key at ``modules_install`` (``CONFIG_MODULE_SIG_ALL``); a module signed with the test key must load, an
unsigned one must be refused. Built with the reference kernel's builder into ``$NQGEN_CACHE/sig-kernel/``.

Command line: ``python3 -m nqgen.pkg.sigkernel [--jobs N] [--print]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import click

from .. import reprokernel
from ..errors import BuildError, NqgenError
from ..kernels.kconfig import missing_options
from ..kernels.runner import Runner, locked, sayer
from ..reprokernel import Inputs, ReproKernel
from .frompkg import cache_root

CERT_SUBJECT = "/CN=nqgen test module signing key/"


def root(cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "sig-kernel"


def key_paths(cache: Path | None = None) -> tuple[Path, Path]:
    """Where the test signing key lives: (private key, certificate), PEM both; they may not exist yet."""
    d = root(cache) / "cert"
    return d / "signing_key.pem", d / "signing_cert.pem"


def test_key(cache: Path | None = None) -> tuple[Path, Path]:
    """(private key, certificate) of the test signing key, made once with openssl (PEM both)."""
    key, cert = key_paths(cache)
    if key.is_file() and cert.is_file():
        return key, cert
    d = key.parent
    d.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["openssl", "req", "-new", "-nodes", "-utf8", "-sha256", "-days", "36500", "-batch", "-x509",
         "-subj", CERT_SUBJECT, "-outform", "PEM", "-out", str(cert), "-keyout", str(key)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BuildError(f"openssl could not make the test key: {proc.stderr.strip()[-200:]}")
    return key, cert


# What the lab's guest never uses (no disk, no network card, no NFS root: qemu -nodefaults, an initramfs and
# two serial ports), left out so the build takes tens of minutes rather than the reference kernel's hours.
SMALLER = (
    "# CONFIG_ETHERNET is not set",
    "# CONFIG_SCSI is not set",
    "# CONFIG_ATA is not set",
    "# CONFIG_MD is not set",
    "# CONFIG_NETWORK_FILESYSTEMS is not set",
    "# CONFIG_EXT4_FS is not set",
    "# CONFIG_SECURITY_SELINUX is not set",
    "# CONFIG_PCCARD is not set",
    "# CONFIG_AGP is not set",
    "# CONFIG_FB is not set",
)


def fragment(base: str, cert: Path) -> str:
    """The reference fragment without KASAN and without hardware the lab's guest never has, plus signature
    enforcement; the certificate's hash is part of the text (so of the cache key): a new test key means a new
    kernel."""
    kept = [line for line in base.splitlines() if "KASAN" not in line]
    digest = hashlib.sha256(cert.read_bytes()).hexdigest()
    return "\n".join([
        *kept,
        "",
        "# Not needed by the lab's guest.",
        *SMALLER,
        "",
        f"# Module signatures enforced; nqgen's test certificate (sha256 {digest}) is trusted.",
        "CONFIG_MODULE_SIG=y",
        "CONFIG_MODULE_SIG_FORCE=y",
        "CONFIG_MODULE_SIG_ALL=y",
        "CONFIG_MODULE_SIG_SHA256=y",
        f'CONFIG_SYSTEM_TRUSTED_KEYS="{cert}"',
        "",
    ])  # fmt: skip


def inputs(cache: Path | None = None, cert: Path | None = None) -> Inputs:
    """The reference kernel's inputs with this fragment; makes the test key unless ``cert`` is given."""
    base = reprokernel.load_inputs()
    if cert is None:
        _, cert = test_key(cache)
    text = base.fragment_text.replace("# CONFIG_MODULE_SIG is not set\n", "")
    return dataclasses.replace(base, fragment_text=fragment(text, cert))


def find_built(cache: Path | None = None) -> ReproKernel | None:
    """The built kernel for the current test key and inputs, or None; only looks (makes no key)."""
    key, cert = key_paths(cache)
    if not (key.is_file() and cert.is_file()):
        return None
    try:
        return reprokernel.find_built(root(cache) / "kernels", inputs=inputs(cache, cert))
    except NqgenError:
        return None


def _resume(ins: Inputs, kernels: Path, jobs: int) -> ReproKernel | None:
    """Finish a build of these same inputs that was interrupted in ``<key>.tmp`` (the machine's time ran out):
    make picks up where it stopped. None when there is no such build (the reference builder then starts anew)."""
    tmp, final = kernels / f"{ins.key}.tmp", kernels / ins.key
    src, frag = tmp / "build", tmp / "inputs" / "config.fragment"
    if not ((src / ".config").is_file() and frag.is_file() and frag.read_text() == ins.fragment_text):
        return None
    say = sayer("sig-kernel")
    with locked(kernels, ins.key, say):
        found = reprokernel.find_built(kernels, inputs=ins)
        if found is not None or not tmp.is_dir():
            return found
        r = Runner(tmp / reprokernel.LOG_FILE, 10, say)
        say(f"resuming the interrupted build in {tmp}")
        start = time.monotonic()
        r.run(["make", "olddefconfig"], src, "make olddefconfig")
        bad = missing_options((src / ".config").read_text(), ins.fragment_text)
        if bad:
            raise BuildError(f"Kconfig dropped requested options: {', '.join(bad)}")
        r.run(["make", f"-j{jobs}", "bzImage", "modules"], src, "make bzImage modules")
        release = r.run(["make", "-s", "kernelrelease"], src, "kernel release", capture=True).strip()
        mods = tmp / "modules"
        if mods.exists():
            shutil.rmtree(mods)
        r.run(["make", f"INSTALL_MOD_PATH={mods}", "DEPMOD=/bin/true", "modules_install"], src, "modules_install")
        r.run(["depmod", "-b", str(mods), release], src, "depmod")
        reprokernel._relink(mods / "lib/modules" / release)
        meta = {"release": release, "key": ins.key, "source": ins.source_id, "recipe": reprokernel.RECIPE,
                "patches": [name for name, _ in ins.patches], "jobs": jobs,
                "seconds": round(time.monotonic() - start), "resumed": True}  # fmt: skip
        (tmp / reprokernel.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        tmp.rename(final)
        say(f"built {release}: {final}")
    return reprokernel.find_built(kernels, inputs=ins)


def ensure_built(cache: Path | None = None, jobs: int = 2) -> ReproKernel:
    kernels, ins = root(cache) / "kernels", inputs(cache)
    found = reprokernel.find_built(kernels, inputs=ins) or _resume(ins, kernels, jobs)
    return found or reprokernel.ensure_built(kernels, jobs=jobs, inputs=ins, nice=10)


@click.command()
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=2, show_default=True, help="make -j")
@click.option("--print", "print_", is_flag=True, help="Only print where the built kernel is (exit 1 if not built).")
def main(jobs: int, print_: bool) -> None:
    """Build (or find) the signature-enforcing variant of the reference kernel."""
    try:
        k = find_built() if print_ else ensure_built(jobs=jobs)
    except NqgenError as exc:
        click.echo(f"nqgen.pkg.sigkernel: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    if k is None:
        click.echo("nqgen.pkg.sigkernel: the signature-enforcing kernel is not built (make sig-kernel)", err=True)
        raise SystemExit(1)
    key, cert = key_paths()
    click.echo(f"{k.release} {k.image} {k.modules_dir}\ntest key {key}, certificate {cert}")


if __name__ == "__main__":
    main()
