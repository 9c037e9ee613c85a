"""``python -m nqgen.bench``: run the benchmarks, print the tables, write ``<out>/bench.json``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click

from nqgen import compare, probe, reprokernel
from nqgen.bench import fleet, labcost, report, symbols, whole
from nqgen.bench.symbols import Skipped, SymbolCase
from nqgen.errors import NqgenError
from nqgen.lab.cost import CostPlan, write_cost_json

ROOT = Path(__file__).resolve().parents[3]


def debian_release() -> str | None:
    """The release of Debian's linux-image-amd64 (scripts/debian-kernel), or the running one's modules."""
    script = ROOT / "scripts/debian-kernel"
    if script.is_file():
        done = subprocess.run([str(script)], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    return None


# every strategy; advance-confirm* queue UDP by design: with no consumer their default bypass lets it pass, so their
# rows include the failed queue lookup
COST_STRATEGIES = ("advance-confirm", "advance-confirm-corrected", "ftrace", "hook-swap", "stop-hook", "livepatch",
                   "hold-ref")


def lab_cost(out: Path, kdir: Path, module: Path, plan: CostPlan,
             strategies: tuple[str, ...] = COST_STRATEGIES) -> dict[str, object]:
    """Generate and build every strategy for the Debian kernel, then one cost boot per replacing strategy."""
    if shutil.which("qemu-system-x86_64") is None or not Path("/bin/busybox").is_file():
        return {"skipped": "needs qemu-system-x86_64 and busybox-static (make deps)"}
    gen = out / "gen"
    subprocess.run([sys.executable, "-m", "nqgen", "--strategy", "all", "--kdir", str(kdir), "--module",
                    str(module), "--out", str(gen)], check=True, capture_output=True)  # fmt: skip
    nqgen = Path(sys.executable).with_name("nqgen")
    subprocess.run(["make", "-s", "-C", str(gen), f"NQGEN={nqgen}"], check=True, capture_output=True)
    results = labcost.run_costs(gen, strategies, plan)
    write_cost_json(gen, results, str(report.machine()["date"]))
    compare.refresh(gen)  # gen/COMPARISON.md gets the cost columns
    click.echo("")
    click.echo(f"Packet-path cost: one boot per strategy, {plan.pairs} pairs of phases without/with the module "
               f"(ABBA), per phase and family {plan.datagrams} new flows and {plan.datagrams * plan.repeat} "
               "established datagrams, timed by the guest's sender (noise: spread of the unpatched phases)")
    click.echo(labcost.cost_table(results))
    click.echo("")
    click.echo("The lab's own time (host seconds per boot; guest uptime marks):")
    click.echo(labcost.lab_time_table(results))
    return {"plan": {"pairs": plan.pairs, "datagrams": plan.datagrams, "repeat": plan.repeat},
            "results": [r.to_dict() for r in results]}


def prepare_out(out: Path, force: bool) -> None:
    """``--out`` as the other commands treat it: a link, a file or a foreign non-empty directory is refused
    without ``--force`` (bench writes bench.json, kallsyms.txt, elf-107k and fleet/ into it); marked as nqgen's."""
    from ..generate import OUT_MARKER, check_out

    check_out(out, force)
    if force and (out.is_symlink() or (out.exists() and not out.is_dir())):
        out.unlink()  # --force replaces a link or a file (never what a link points to), as nqgen --out does
    out.mkdir(parents=True, exist_ok=True)
    marker = out / OUT_MARKER
    if not marker.is_file():
        marker.write_text("created by nqgen bench: its results, rewritten by every run\n")


def run(out: Path, rounds: int, *, with_whole: bool = True, cost: CostPlan | None = None,
        fleet_count: int = 0, strategies: tuple[str, ...] = COST_STRATEGIES) -> dict[str, object]:
    cases: list[SymbolCase | Skipped] = []
    missing = symbols.tools_missing()
    release = debian_release()
    module = None
    kdir = None
    if release is not None:
        found = probe.find_conntrack_modules(Path("/lib/modules") / release)
        module = found[0] if found else None
        kdir = Path("/lib/modules") / release / "build"
    if missing:
        cases.append(Skipped("nf_conntrack.ko", missing))
    elif module is None:
        cases.append(Skipped("nf_conntrack.ko", "no Debian nf_conntrack.ko installed (make deps)"))
    else:
        cases.append(symbols.module_case(module, rounds))
    ref = reprokernel.find_built()
    if missing:
        cases.append(Skipped("vmlinux", missing))
    elif ref is None:
        cases.append(Skipped("vmlinux", "reference kernel not built (make repro-kernel)"))
    else:
        cases.append(symbols.vmlinux_case(ref.vmlinux, rounds))
    if not missing:
        cases.append(symbols.vmlinux_case(symbols.synthetic_elf(out / "elf-107k"), rounds))
    listing = symbols.capture_kallsyms(out / "kallsyms.txt")
    if missing:
        cases.append(Skipped("kallsyms", missing))
    elif isinstance(listing, str):
        cases.append(Skipped("kallsyms", listing))
    else:
        cases.append(symbols.kallsyms_case(listing, rounds))
    click.echo("Symbol lookup: nqgen against nm | grep (kallsyms: grep -E), same file, alternating rounds;")
    click.echo("nqgen is timed in-process (file read and parse, no interpreter start), the reference as commands")
    click.echo(report.symbol_table(cases))
    doc: dict[str, object] = {"machine": report.machine(), "rounds": rounds,
                              "symbols": [c.to_json() for c in cases]}  # fmt: skip
    whole_run: whole.WholeRun | Skipped
    if not with_whole:
        whole_run = Skipped("whole", "not asked for")
    elif module is None or kdir is None or not kdir.is_dir():
        whole_run = Skipped("whole", "no Debian kernel headers and nf_conntrack.ko (make deps)")
    elif shutil.which("make") is None or missing:
        whole_run = Skipped("whole", missing or "no make")
    else:
        whole_run = whole.whole_run(kdir, module, rounds)
    click.echo("")
    click.echo(report.whole_table(whole_run))
    doc["whole"] = whole_run.to_json()
    if fleet_count:
        click.echo("")
        fleet_run = fleet.run_fleet_bench(out / "fleet", release, fleet_count)
        click.echo(fleet.fleet_table(fleet_run))
        doc["fleet"] = fleet_run.to_json()
    if cost is not None:
        costs: dict[str, object]
        if module is None or kdir is None or not kdir.is_dir():
            costs = {"skipped": "no Debian kernel headers and nf_conntrack.ko (make deps)"}
        else:
            costs = lab_cost(out, kdir, module, cost, strategies)
        if "skipped" in costs:
            click.echo(f"\npacket-path cost: skipped: {costs['skipped']}")
        doc["cost"] = costs
    report.write_json(out / "bench.json", doc)
    click.echo(f"\nwritten: {out / 'bench.json'}")
    return doc


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(path_type=Path), default=Path("out-bench"), show_default=True)
@click.option("--rounds", type=click.IntRange(1, 100), default=5, show_default=True)
@click.option("--no-whole", is_flag=True, help="Skip the whole-command comparison (it builds a module).")
@click.option("--no-cost", is_flag=True, help="Skip the packet-path cost boots in the VM lab.")
@click.option("--fleet-targets", type=click.IntRange(0, 1000), default=100, show_default=True,
              help="Targets of the fleet run (0: skip it).")
@click.option("--cost-pairs", type=click.IntRange(1, 40), default=8, show_default=True)
@click.option("--cost-datagrams", type=click.IntRange(10, 4000), default=500, show_default=True)
@click.option("--cost-repeat", type=click.IntRange(1, 50), default=4, show_default=True,
              help="Established datagrams per flow and phase.")
@click.option("--cost-strategies", default=",".join(COST_STRATEGIES), show_default=True)
@click.option("--cost-icount", type=click.IntRange(0, 10), default=None,
              help="Run the cost boots under qemu -icount shift=N (guest clock = instructions; slow under TCG).")
@click.option("--force", is_flag=True, help="Write into --out even when it is a link, a file or not nqgen's.")
def main(out: Path, rounds: int, no_whole: bool, no_cost: bool, fleet_targets: int, cost_pairs: int,
         cost_datagrams: int, cost_repeat: int, cost_strategies: str, cost_icount: int | None, force: bool) -> None:
    """Benchmarks side by side with binutils and unpatched phases, as ratios (nothing here asserts a time)."""
    try:
        prepare_out(out, force)
    except NqgenError as exc:
        click.echo(f"nqgen bench: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    cost = None if no_cost else CostPlan(pairs=cost_pairs, datagrams=cost_datagrams, repeat=cost_repeat,
                                         icount=cost_icount)
    strategies = tuple(s for s in cost_strategies.split(",") if s)
    try:
        run(out, rounds, with_whole=not no_whole, cost=cost, fleet_count=fleet_targets, strategies=strategies)
    except (OSError, RuntimeError, subprocess.CalledProcessError, NqgenError) as exc:
        click.echo(f"nqgen bench: {exc}", err=True)
        sys.exit(4)
