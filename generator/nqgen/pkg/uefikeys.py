"""UEFI firmware whose key database (``db``) holds a certificate: how a Secure Boot host comes to trust a key.

Debian's kernel (``CONFIG_LOAD_UEFI_KEYS``, ``CONFIG_INTEGRITY_PLATFORM_KEYRING``) loads the firmware's ``db``
certificates into its platform keyring at boot, and Debian's ``mod_verify_sig()`` falls back to that keyring when
the built-in and secondary keyrings do not know the signer (read in Debian's linux-source-6.1,
``kernel/module/signing.c``). So Debian's own kernel, booted under OVMF with the test certificate in ``db`` and
``module.sig_enforce=1``, trusts exactly the modules signed with the test key: the same trust path as a host's
enrolled key, without building a kernel.

The variable store is written with virt-firmware's ``virt-fw-vars`` (a maintained tool for edk2 variable
stores) from OVMF's empty one, once per certificate, into ``$NQGEN_CACHE/sig-kernel/uefi/``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from ..errors import BuildError, InputError
from .frompkg import cache_root

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# Owner of the db entry (any GUID will do; a fixed one keeps the store reproducible).
OWNER = uuid.uuid5(uuid.NAMESPACE_URL, "nqgen test module signing key")


def firmware_trusting(cert: Path, cache: Path | None = None) -> tuple[Path, Path]:
    """(OVMF code, a variable store whose db holds ``cert``). Copy the store before booting: qemu writes it."""
    for path, package in ((OVMF_CODE, "ovmf"), (OVMF_VARS, "ovmf")):
        if not path.is_file():
            raise InputError(f"{path} not found (apt-get install {package})")
    if importlib.util.find_spec("virt.firmware") is None:
        raise InputError("virt-firmware is not installed (pip install virt-firmware)")
    digest = hashlib.sha256(cert.read_bytes() + OVMF_VARS.read_bytes()).hexdigest()[:16]
    d = (cache or cache_root()) / "sig-kernel" / "uefi"
    store = d / f"vars-{digest}.fd"
    if store.is_file():
        return OVMF_CODE, store
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{store.name}.{os.getpid()}"
    proc = subprocess.run(
        [sys.executable, "-m", "virt.firmware.vars", "-i", str(OVMF_VARS), "-o", str(tmp),
         "--add-db", str(OWNER), str(cert)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise BuildError(f"virt-fw-vars could not add {cert} to db: {msg[-1] if msg else proc.returncode}")
    tmp.rename(store)
    return OVMF_CODE, store


def boot_copy(firmware: tuple[Path, Path], dest: Path) -> tuple[Path, Path]:
    """A private, writable copy of the variable store for one boot."""
    code, store = firmware
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(store, dest)
    return code, dest
