"""``nqgen pkg ...`` (sign, rpm, deb, dkms, install, uninstall; the out/ Makefile calls these) and
``nqgen status``."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from ..errors import InputError
from . import hostfiles
from .hostfiles import HostModule

_PATH = click.Path(path_type=Path)


def _out_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option("--out", type=_PATH, default=Path("out"), show_default=True, help="Generated output.")(f)


def _strategy_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option("--strategy", help="The module to act on (default: every built one / the only one).")(f)


def _host_options(f: click.decorators.FC) -> click.decorators.FC:
    f = click.option("--params", default="", help="Module parameters for modprobe.d, e.g. 'queues=4 queue_base=8'.")(f)
    f = click.option("--before", "before", multiple=True, help="Unit the loader is ordered Before= (repeatable).")(f)
    f = click.option("--sign-key", type=_PATH, help="Sign the packaged module with this private key ...")(f)
    f = click.option("--sign-cert", type=_PATH, help="... and this certificate (the target's scripts/sign-file).")(f)
    return f


def _kdir(out: Path) -> Path:
    try:
        data = json.loads((out / "inputs.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{out}/inputs.json: cannot read it: not an nqgen output directory") from exc
    return Path(str(data.get("kdir") or ""))


@contextmanager
def _module_file(out: Path, hm: HostModule, key: Path | None, cert: Path | None) -> Iterator[Path]:
    """The .ko to ship: the built one, or a signed copy of it when a key and certificate are given."""
    if (key is None) != (cert is None):
        raise InputError("signing needs both a key and a certificate (KEY=... CERT=...)")
    if key is None or cert is None:
        yield hm.ko
        return
    from .sign import is_signed, sign

    with tempfile.TemporaryDirectory(prefix="nqgen-sign-") as tmp:
        copy = Path(tmp) / hm.ko.name
        shutil.copy2(hm.ko, copy)
        if not is_signed(copy):
            sign(copy, key, cert, _kdir(out))
        yield copy


def _check_out(out: Path) -> None:
    if not out.is_dir():
        raise InputError(f"--out {out}: no such directory")


@click.group("pkg")
def pkg() -> None:
    """Sign, package (rpm, deb, DKMS) and install generated modules."""


@pkg.command("sign")
@_out_option
@_strategy_option
@click.option("--key", type=_PATH, required=True, help="Private key (PEM) to sign with.")
@click.option("--cert", type=_PATH, required=True, help="Its X.509 certificate (PEM or DER).")
@click.option("--kdir", type=_PATH, help="Tree whose scripts/sign-file to use (default: the target tree).")
def sign_cmd(out: Path, strategy: str | None, key: Path, cert: Path, kdir: Path | None) -> None:
    """Sign the built modules in place with the target tree's scripts/sign-file."""
    from .sign import sign

    _check_out(out)
    for name in hostfiles.pick(out, strategy):
        hm = hostfiles.host_module(out, name)
        sign(hm.ko, key, cert, kdir or _kdir(out))
        click.echo(f"signed {hm.ko}")


@pkg.command("rpm")
@_out_option
@_strategy_option
@_host_options
@click.option("--el", type=click.Choice(["el7", "el8"]), help="Spec flavour (default: from the release, else el8).")
def rpm_cmd(
    out: Path, strategy: str | None, params: str, before: tuple[str, ...], sign_key: Path | None,
    sign_cert: Path | None, el: str | None,
) -> None:  # fmt: skip
    """Build a kmod-style RPM per built module into OUT/packages."""
    from .rpm import build_rpm

    _check_out(out)
    for name in hostfiles.pick(out, strategy):
        hm = hostfiles.host_module(out, name)
        words = hostfiles.check_params(hm, params)
        units = hostfiles.check_services(list(before))
        with _module_file(out, hm, sign_key, sign_cert) as ko:
            click.echo(f"wrote {build_rpm(hm, out / 'packages', words, units, ko=ko, flavour=el)}")


@pkg.command("deb")
@_out_option
@_strategy_option
@_host_options
def deb_cmd(
    out: Path, strategy: str | None, params: str, before: tuple[str, ...], sign_key: Path | None,
    sign_cert: Path | None,
) -> None:  # fmt: skip
    """Build a Debian package per built module into OUT/packages."""
    from .deb import build_deb

    _check_out(out)
    for name in hostfiles.pick(out, strategy):
        hm = hostfiles.host_module(out, name)
        words = hostfiles.check_params(hm, params)
        units = hostfiles.check_services(list(before))
        with _module_file(out, hm, sign_key, sign_cert) as ko:
            click.echo(f"wrote {build_deb(hm, out / 'packages', words, units, ko=ko)}")


@pkg.command("dkms")
@_out_option
@_strategy_option
def dkms_cmd(out: Path, strategy: str | None) -> None:
    """Write a DKMS source tree per built module into OUT/packages/dkms."""
    from .dkms import build_dkms_tree

    _check_out(out)
    for name in hostfiles.pick(out, strategy):
        hm = hostfiles.host_module(out, name)
        tree = build_dkms_tree(hm, out, out / "packages" / "dkms")
        click.echo(f"wrote {tree} (dkms add {tree})")


@pkg.command("install")
@_out_option
@_strategy_option
@_host_options
@click.option("--destdir", type=_PATH, default=Path("/"), show_default=True, help="Root to install into.")
def install_cmd(
    out: Path, strategy: str | None, params: str, before: tuple[str, ...], sign_key: Path | None,
    sign_cert: Path | None, destdir: Path,
) -> None:  # fmt: skip
    """Install one module with its modprobe.d, modules-load.d, systemd unit and nqgen-status."""
    from .install import install

    _check_out(out)
    hm = hostfiles.host_module(out, hostfiles.pick_one(out, strategy))
    words = hostfiles.check_params(hm, params)
    units = hostfiles.check_services(list(before))
    with _module_file(out, hm, sign_key, sign_cert) as ko:
        install(hm, destdir, words, units, ko=ko, say=click.echo)


@pkg.command("uninstall")
@_out_option
@_strategy_option
@click.option("--destdir", type=_PATH, default=Path("/"), show_default=True, help="Root installed into.")
def uninstall_cmd(out: Path, strategy: str | None, destdir: Path) -> None:
    """Remove exactly what `install` added."""
    from .install import uninstall

    _check_out(out)
    hm = hostfiles.host_module(out, hostfiles.pick_one(out, strategy))
    uninstall(hm.module, destdir, say=click.echo, release=hm.release)


@click.command("status")
@click.option("--sysfs", type=_PATH, default=Path("/sys"), show_default=True, help="sysfs root to read.")
@click.option("--share", type=_PATH, default=Path("/usr/share/nqgen"), show_default=True, help="nqgen's .env files.")
def status_cmd(sysfs: Path, share: Path) -> None:
    """The loaded nqgen modules: strategy, target kernel, parameters, counters, livepatch state, warnings."""
    from .status import status

    text, code = status(sysfs, share)
    click.echo(text, nl=False)
    sys.exit(code)
