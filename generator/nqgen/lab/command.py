"""``nqgen lab``: boot the target kernel under qemu and measure every generated module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click

from ..errors import InputError, LabError
from .guest import MAX_ROUNDS, Workload
from .kernel import default_cache_dir, default_image, image_release, resolve_image
from .manifest import discover
from .report import measured_markdown, terminal_table, write_chart
from .results import RunResult
from .runner import LabConfig, RunSpec, lab_json, run_lab

_PATH = click.Path(path_type=Path)


def _inputs(out: Path) -> dict[str, Any]:
    path = out / "inputs.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg})") from exc
    return data if isinstance(data, dict) else {}


def _default_image(release: str | None, kdir: Path | None) -> Path:
    """The installed image for ``release``, else the build tree's own vmlinux/bzImage, else the newest one."""
    if release and (Path("/boot") / f"vmlinuz-{release}").is_file():
        return Path("/boot") / f"vmlinuz-{release}"
    if kdir is not None and release:
        for candidate in (kdir / "vmlinux", kdir / "arch/x86/boot/bzImage"):
            if candidate.is_file() and image_release(candidate) == release:
                return candidate
    return default_image(release)


def _default_modules_dir(release: str, inputs: dict[str, Any]) -> Path:
    """/lib/modules/<release>, else the tree holding the nf_conntrack.ko the generator read."""
    installed = Path("/lib/modules") / release
    if (installed / "modules.dep").is_file():
        return installed
    sources = inputs.get("sources")
    module = sources.get("module:nf_conntrack") if isinstance(sources, dict) else None
    if isinstance(module, str):
        for parent in Path(module).parents:
            if (parent / "modules.dep").is_file() and parent.name == release:
                return parent
    return installed


def _progress(verbose: bool) -> Any:
    def report(i: int, n: int, spec: RunSpec, result: RunResult | None) -> None:
        if result is None:
            if verbose:
                click.echo(f"[{i}/{n}] {spec.name}: booting", err=True)
            return
        ct = result.workload_ct
        clash = "unknown" if ct is None else str(ct.get("clashres", "?"))
        calls = result.corrected_calls
        parts = [
            f"[{i}/{n}] {spec.name}{f' #{spec.repeat}' if spec.repeat > 1 else ''}: {result.verdict}",
            f"{result.received()}/{result.sent()} delivered",
            f"clashres {clash}",
            f"reports {len(result.faults)}",
        ]
        if calls is not None:
            parts.append(f"corrected confirms {calls}")
        if result.unload is not None:
            parts.append("unloaded" if result.unload.ok else "UNLOAD FAILED")
        parts.append(f"{result.seconds:.1f} s")
        click.echo(", ".join(parts), err=True)

    return report


@click.command("lab")
@click.option("--out", "out", type=_PATH, default=Path("out"), show_default=True, help="Generated output directory.")
@click.option("--kernel", type=_PATH, help="vmlinuz/bzImage or ELF vmlinux (default: the target's installed image).")
@click.option("--modules-dir", type=_PATH, help="The /lib/modules/<release> tree of that kernel.")
@click.option("--kdir", type=_PATH, help="Kernel build tree to build the lab's helper module against.")
@click.option("--strategy", "strategies", multiple=True, help="Strategy to measure (repeatable; default all built).")
@click.option("--rounds", type=click.IntRange(1, MAX_ROUNDS), default=500, show_default=True,
              help="Flows per family; each starts with THREADS racing datagrams.")
@click.option("--threads", type=click.IntRange(1, 16), default=2, show_default=True, help="Racing senders per flow.")
@click.option("--queue-delay-us", type=click.IntRange(0, 1_000_000), default=200, show_default=True,
              help="How long the NFQUEUE consumer holds packets before accepting.")
@click.option("--families", type=click.Choice(["46", "4", "6"]), default="46", show_default=True)
@click.option("--smp", type=click.IntRange(1, 64), default=2, show_default=True, help="vCPUs.")
@click.option("--memory", default=None, help="Guest RAM (default 512M, 1G for a KASAN kernel).")
@click.option("--timeout", type=click.FloatRange(5, 3600), default=180.0, show_default=True, help="Seconds per boot.")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Also boot without mitigation (with and without NFQUEUE).")
@click.option("--repeat", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Boots per configuration (to state results with their spread).")
@click.option("--nfqueue-variants", is_flag=True,
              help="Also run each strategy that does not queue with all UDP sent through NFQUEUE.")
@click.option("--beside", metavar="STRATEGY",
              help="Also run every other strategy with this generated strategy's module loaded first (coexistence).")
@click.option("--json", "as_json", is_flag=True, help="Print lab.json to stdout instead of the table.")
@click.option("--append", default="", help="Extra kernel command line.")
@click.option("--detector/--no-detector", default=True, show_default=True,
              help="Load the stale-use detector (nqlab_detect) where the kernel allows it.")
@click.option("--scenario", type=click.Choice(["seed", "node"]), default="seed", show_default=True,
              help="seed: the lab's own racing senders; node: a real node (dnsmasq, iptables NAT+NFQUEUE, "
                   "conntrack -E, glibc's resolver) in network namespaces.")
@click.option("--lookups", type=click.IntRange(1, 400), default=200, show_default=True,
              help="node scenario: getaddrinfo lookups per family.")
@click.option("--lookup-deadline", type=click.IntRange(5, 3600), default=30, show_default=True,
              help="node scenario: seconds after which no new lookup starts (a KASAN kernel needs more).")
@click.option("--force", is_flag=True, help="Write into --out even when it is a link or was not created by nqgen.")
def lab(
    out: Path,
    kernel: Path | None,
    modules_dir: Path | None,
    kdir: Path | None,
    strategies: tuple[str, ...],
    rounds: int,
    threads: int,
    queue_delay_us: int,
    families: str,
    smp: int,
    memory: str | None,
    timeout: float,
    baselines: bool,
    repeat: int,
    nfqueue_variants: bool,
    beside: str | None,
    as_json: bool,
    append: str,
    detector: bool,
    scenario: str,
    lookups: int,
    lookup_deadline: int,
    force: bool,
) -> None:
    """Boot the kernel under qemu (TCG): baselines, then one boot per generated strategy, and report."""
    from ..generate import check_generated

    check_generated(out, force)
    inputs = _inputs(out)
    release = inputs.get("release") if isinstance(inputs.get("release"), str) else None
    if kdir is None and inputs.get("kdir"):
        kdir = Path(str(inputs["kdir"]))
    image = resolve_image(kernel or _default_image(release, kdir), default_cache_dir())
    if modules_dir is None:
        modules_dir = _default_modules_dir(image.release, inputs)
    if not (modules_dir / "modules.dep").is_file():
        raise InputError(f"{modules_dir}/modules.dep not found: pass --modules-dir for kernel {image.release}")
    if kdir is None:
        kdir = modules_dir / "build"
    manifests = discover(out, strategies)
    beside_manifest = discover(out, (beside,))[0] if beside is not None else None
    if memory is None:
        memory = "1G" if image.kasan else "512M"
    if scenario == "node":
        from .scenarios.node.command import run_node_command
        from .scenarios.node.script import NodeWorkload

        workload = NodeWorkload(lookups=lookups, deadline_s=lookup_deadline)
        run_node_command(out, image, modules_dir, kdir, manifests, workload, smp, memory,
                         max(timeout, 400.0), baselines, repeat, append)
        return
    config = LabConfig(
        kernel=image,
        modules_dir=modules_dir,
        kdir=kdir,
        workload=Workload(rounds=rounds, threads=threads, families=families, queue_delay_us=queue_delay_us),
        smp=smp,
        memory=memory,
        timeout=timeout,
        baselines=baselines,
        repeat=repeat,
        nfqueue_variants=nfqueue_variants,
        beside=beside_manifest,
        logs_dir=out / "lab-logs",
        append=append,
        detector=detector,
    )
    click.echo(
        f"lab: {image.release} ({image.boot_mode}), {len(manifests)} strategies"
        f"{' + 2 baselines' if baselines else ''}, {rounds} rounds x {threads} threads"
        f"{f', {repeat} boots each' if repeat > 1 else ''}",
        err=True,
    )
    if config.logs_dir is not None and config.logs_dir.is_dir():
        shutil.rmtree(config.logs_dir)  # logs of an earlier lab run would be mistaken for this one's
    result = run_lab(config, manifests, _progress(verbose=False))
    data = lab_json(result)
    (out / "lab.json").write_text(json.dumps(data, indent=2) + "\n")
    write_chart(data, out / "lab.png")
    (out / "LAB.md").write_text(measured_markdown(data))
    from .. import compare

    if hasattr(compare, "refresh") and (out / compare.COMPARISON_JSON).is_file():
        compare.refresh(out)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(terminal_table(data))
        click.echo(f"wrote {out / 'lab.json'}, {out / 'lab.png'}")
    if result.failed:
        why = "; ".join(f"{r.name}: {', '.join(r.problems) or r.verdict}" for r in result.failed)
        raise LabError(why)
