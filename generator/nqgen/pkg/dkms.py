"""``make -C out dkms``: a DKMS source tree for one module (``dkms add`` it), with a build step that never
rebuilds the generated C blindly for another kernel (see ``nqgen-dkms-build.sh``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import __version__
from ..errors import InputError
from .hostfiles import HostModule, copy_sources, script_text

BUILD_SCRIPT = "nqgen-dkms-build"


def dkms_name(strategy: str) -> str:
    return f"nqgen-{strategy}"


def dkms_conf(hm: HostModule) -> str:
    return (
        f'PACKAGE_NAME="{dkms_name(hm.strategy)}"\n'
        f'PACKAGE_VERSION="{__version__}"\n'
        f'BUILT_MODULE_NAME[0]="{hm.module}"\n'
        'DEST_MODULE_LOCATION[0]="/extra"\n'
        f'MAKE[0]="sh ./{BUILD_SCRIPT} ${{kernelver}} ${{kernel_source_dir}}"\n'
        'CLEAN="rm -f *.ko *.o *.mod *.mod.c *.mod.o modules.order Module.symvers .*.cmd"\n'
        'AUTOINSTALL="yes"\n'
    )


def target_env(hm: HostModule) -> str:
    return f"RELEASE='{hm.release}'\nSTRATEGY='{hm.strategy}'\nMODULE='{hm.module}'\n"


def build_dkms_tree(hm: HostModule, out: Path, dest_parent: Path) -> Path:
    """Write ``dest_parent/nqgen-<strategy>-<version>/`` (replacing an older one); return it."""
    if not (out / hm.strategy / "Kbuild").is_file():
        raise InputError(f"{out / hm.strategy}: no Kbuild: not a generated module tree")
    dest = dest_parent / f"{dkms_name(hm.strategy)}-{__version__}"
    if dest.exists():
        shutil.rmtree(dest)
    copy_sources(out, hm.strategy, dest)
    (dest / "dkms.conf").write_text(dkms_conf(hm))
    (dest / "nqgen-target.env").write_text(target_env(hm))
    (dest / BUILD_SCRIPT).write_text(script_text("nqgen-dkms-build.sh"))
    (dest / BUILD_SCRIPT).chmod(0o755)
    return dest
