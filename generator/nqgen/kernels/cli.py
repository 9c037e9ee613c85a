"""``nqgen kernel``: build, show and list the reference kernels."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from . import RECIPES, ensure_built, find_built, log_path

_PATH = click.Path(path_type=Path)


@click.group()
def kernel() -> None:
    """Build reference kernels from source (RHEL 7.7, RHEL 8.1, your own CentOS tree) for the lab."""


@kernel.command("build")
@click.argument("recipe", type=click.Choice(sorted(RECIPES)))
@click.option("--source", type=_PATH, help="Kernel source: a directory, a tarball or a .src.rpm.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=2, show_default=True, help="make -j")
@click.option("--nice", type=click.IntRange(min=0, max=19), default=10, show_default=True, help="nice level")
@click.option("--cache", type=_PATH, help="Cache root (default $NQGEN_CACHE or /var/cache/nqgen).")
@click.option("--json", "as_json", is_flag=True, help="Print the build's description as JSON.")
def build_cmd(recipe: str, source: Path | None, jobs: int, nice: int, cache: Path | None, as_json: bool) -> None:
    """Build RECIPE (once; cached) and say where it is."""
    if source is not None and not source.exists():
        raise click.BadParameter(f"{source} does not exist", param_hint="--source")
    k = ensure_built(recipe, source, cache, jobs, nice)
    click.echo(json.dumps(k.to_json(), indent=2) if as_json else f"{k.release} {k.root}")


@kernel.command("show")
@click.argument("recipe", type=click.Choice(sorted(RECIPES)))
@click.option("--cache", type=_PATH, help="Cache root (default $NQGEN_CACHE or /var/cache/nqgen).")
@click.option("--shell", is_flag=True, help="Print NAME=value lines for sh's eval instead of JSON.")
def show_cmd(recipe: str, cache: Path | None, shell: bool) -> None:
    """Print the newest finished build of RECIPE as JSON; exit 1 when there is none."""
    k = find_built(recipe, cache=cache)
    if k is None:
        click.echo(f"nqgen: {recipe} is not built (nqgen kernel build {recipe} --source ...; "
                   f"log {log_path(RECIPES[recipe], cache)})", err=True)
        raise SystemExit(1)
    if shell:
        for name, value in k.to_json().items():
            click.echo(f"{name.upper()}={shlex.quote(value or '')}")
    else:
        click.echo(json.dumps(k.to_json(), indent=2))


@kernel.command("list")
def list_cmd() -> None:
    """The recipes and whether each is built."""
    for name, r in RECIPES.items():
        k = find_built(name)
        state = f"built {k.release} {k.root}" if k else "not built"
        click.echo(f"{name:18} {state}\n{'':18} {r.summary}")
