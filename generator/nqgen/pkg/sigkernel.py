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
import subprocess
from pathlib import Path

import click

from .. import reprokernel
from ..errors import BuildError, NqgenError
from ..reprokernel import Inputs, ReproKernel
from .frompkg import cache_root

CERT_SUBJECT = "/CN=nqgen test module signing key/"


def root(cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "sig-kernel"


def test_key(cache: Path | None = None) -> tuple[Path, Path]:
    """(private key, certificate) of the test signing key, made once with openssl (PEM both)."""
    d = root(cache) / "cert"
    key, cert = d / "signing_key.pem", d / "signing_cert.pem"
    if key.is_file() and cert.is_file():
        return key, cert
    d.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["openssl", "req", "-new", "-nodes", "-utf8", "-sha256", "-days", "36500", "-batch", "-x509",
         "-subj", CERT_SUBJECT, "-outform", "PEM", "-out", str(cert), "-keyout", str(key)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BuildError(f"openssl could not make the test key: {proc.stderr.strip()[-200:]}")
    return key, cert


def fragment(base: str, cert: Path) -> str:
    """The reference fragment without KASAN, plus signature enforcement; the certificate's hash is part of the
    text (so of the cache key): a new test key means a new kernel."""
    kept = [line for line in base.splitlines() if "KASAN" not in line]
    digest = hashlib.sha256(cert.read_bytes()).hexdigest()
    return "\n".join([
        *kept,
        "",
        f"# Module signatures enforced; nqgen's test certificate (sha256 {digest}) is trusted.",
        "CONFIG_MODULE_SIG=y",
        "CONFIG_MODULE_SIG_FORCE=y",
        "CONFIG_MODULE_SIG_ALL=y",
        "CONFIG_MODULE_SIG_SHA256=y",
        f'CONFIG_SYSTEM_TRUSTED_KEYS="{cert}"',
        "",
    ])  # fmt: skip


def inputs(cache: Path | None = None) -> Inputs:
    base = reprokernel.load_inputs()
    _, cert = test_key(cache)
    text = base.fragment_text.replace("# CONFIG_MODULE_SIG is not set\n", "")
    return dataclasses.replace(base, fragment_text=fragment(text, cert))


def find_built(cache: Path | None = None) -> ReproKernel | None:
    try:
        return reprokernel.find_built(root(cache) / "kernels", inputs=inputs(cache))
    except NqgenError:
        return None


def ensure_built(cache: Path | None = None, jobs: int = 2) -> ReproKernel:
    return reprokernel.ensure_built(root(cache) / "kernels", jobs=jobs, inputs=inputs(cache), nice=10)


@click.command()
@click.option("--jobs", default=2, show_default=True)
@click.option("--print", "print_", is_flag=True, help="Only print where the built kernel is (exit 1 if not built).")
def main(jobs: int, print_: bool) -> None:
    """Build (or find) the signature-enforcing variant of the reference kernel."""
    k = find_built() if print_ else ensure_built(jobs=jobs)
    if k is None:
        raise SystemExit(1)
    click.echo(f"{k.release} {k.image} {k.modules_dir}")


if __name__ == "__main__":
    main()
