"""``nqgen lab-hookswap``: the hook-swap scenarios (unload race, registration window, unrecognised slots)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import InputError, LabError
from .command import _default_image, _default_modules_dir, _inputs
from .hookswap import Kind, Scenario, run_scenario
from .kernel import default_cache_dir, resolve_image
from .manifest import discover
from .runner import LabConfig

_PATH = click.Path(path_type=Path)


@click.command("lab-hookswap")
@click.option("--out", "out", type=_PATH, default=Path("out"), show_default=True, help="Generated output directory.")
@click.option("--scenario", type=click.Choice(["race", "window", "unmatched"]), required=True,
              help="race: unload while registrations are held; window: ms a new registration runs the original; "
                   "unmatched: a confirm-priority hook the module cannot recognise.")
@click.option("--cycles", type=click.IntRange(1, 50), default=3, show_default=True, help="race: load/unload cycles.")
@click.option("--delay-ms", type=click.IntRange(1, 5000), default=300, show_default=True,
              help="race: how long each registration is held between copy and publish.")
@click.option("--samples", type=click.IntRange(1, 100), default=8, show_default=True,
              help="window: fresh namespaces measured.")
@click.option("--param", "params", multiple=True, help="Module parameter (NAME=VALUE, repeatable; default none).")
@click.option("--kernel", type=_PATH, help="vmlinuz/bzImage or ELF vmlinux (default: the target's installed image).")
@click.option("--modules-dir", type=_PATH, help="The /lib/modules/<release> tree of that kernel.")
@click.option("--kdir", type=_PATH, help="Kernel build tree to build the lab's helper modules against.")
@click.option("--timeout", type=click.FloatRange(5, 3600), default=400.0, show_default=True, help="Seconds.")
@click.option("--kprobes-off", is_flag=True,
              help="window: disarm all kprobes after the load, so only the rescan swaps new registrations.")
@click.option("--force", is_flag=True, help="Write into --out even when it is a link or was not created by nqgen.")
def lab_hookswap(
    out: Path,
    scenario: Kind,
    cycles: int,
    delay_ms: int,
    samples: int,
    params: tuple[str, ...],
    kernel: Path | None,
    modules_dir: Path | None,
    kdir: Path | None,
    timeout: float,
    kprobes_off: bool,
    force: bool,
) -> None:
    """Boot the kernel under qemu (TCG) once for one hook-swap scenario and write out/hookswap-<scenario>.json."""
    from ..generate import check_generated

    check_generated(out, force)
    for p in params:
        if "=" not in p:
            raise InputError(f"--param {p}: expected NAME=VALUE")
    inputs = _inputs(out)
    release = inputs.get("release") if isinstance(inputs.get("release"), str) else None
    if kdir is None and inputs.get("kdir"):
        kdir = Path(str(inputs["kdir"]))
    image = resolve_image(kernel or _default_image(release, kdir), default_cache_dir())
    if modules_dir is None:
        modules_dir = _default_modules_dir(image.release, inputs)
    if not (modules_dir / "modules.dep").is_file():
        raise InputError(f"{modules_dir}/modules.dep not found: pass --modules-dir for kernel {image.release}")
    (manifest,) = discover(out, ("hook-swap",))
    config = LabConfig(
        kernel=image,
        modules_dir=modules_dir,
        kdir=kdir or modules_dir / "build",
        memory="1G" if image.kasan else "512M",
        timeout=timeout,
        logs_dir=out / "lab-logs",
    )
    sc = Scenario(kind=scenario, cycles=cycles, delay_ms=delay_ms, samples=samples, params=params,
                  kprobes_off=kprobes_off)  # fmt: skip
    result = run_scenario(config, manifest, sc)
    data = result.to_dict()
    path = out / f"hookswap-{scenario}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    if scenario == "race":
        click.echo(f"race: {len(result.cycles)} cycle(s): " + "; ".join(
            f"stale {c.get('stale')}, held {c.get('held')}, restored {c.get('restored')} in {c.get('passes')} passes"
            for c in result.cycles
        ))
    elif scenario == "window":
        by_kind = "; ".join(f"{k}: {v}" for k, v in result.windows_by_kind.items())
        click.echo(f"window (us): {by_kind} (max {data['window_ms_max']} ms)")
    else:
        click.echo(f"unmatched: counter {result.unmatched}, warned {result.warned}")
    click.echo(f"wrote {path}")
    if result.problems:
        raise LabError("hook-swap " + scenario + ": " + "; ".join(result.problems))
    if scenario == "race" and not result.exercised:
        raise LabError("hook-swap race: no registration was held across an unload (inconclusive)")
