"""``nqgen lab --scenario node``: run the node scenario and write its results next to the seed lab's."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ....errors import LabError
from ...kernel import KernelImage
from ...manifest import Manifest
from .report import node_markdown, problems, terminal_table, write_chart
from .results import NodeRun
from .runner import NodeConfig, NodeLab, NodeSpec, node_json, run_node_lab
from .script import NodeWorkload

NODE_JSON = "node-lab.json"
NODE_PNG = "node-lab.png"
NODE_MD = "NODE.md"


def _progress(i: int, n: int, spec: NodeSpec, run: NodeRun | None) -> None:
    if run is None:
        click.echo(f"[{i}/{n}] node {spec.name} ...", err=True)
        return
    d = run.to_dict()
    ok4, p4 = run.answered(family="ipv4")
    ok6, p6 = run.answered(family="ipv6")
    parts = [f"lookups ipv4 {ok4}/{p4}, ipv6 {ok6}/{p6}", f"KASAN {run.kasan}", f"{d['seconds']:.1f} s"]
    if problems(d):
        parts.append("problems: " + "; ".join(problems(d)))
    click.echo(f"[{i}/{n}] node {spec.name}: " + ", ".join(parts), err=True)


def write_node_results(lab: NodeLab, out: Path) -> dict[str, object]:
    """out/node-lab.json, out/node-lab.png, out/NODE.md, and the node section of COMPARISON.md."""
    data = node_json(lab)
    (out / NODE_JSON).write_text(json.dumps(data, indent=2) + "\n")
    write_chart(data, out / NODE_PNG)
    (out / NODE_MD).write_text(node_markdown(data))
    from .... import compare

    if (out / compare.COMPARISON_JSON).is_file():
        compare.refresh(out)
    return data


def run_node_command(
    out: Path,
    image: KernelImage,
    modules_dir: Path,
    kdir: Path,
    manifests: list[Manifest],
    workload: NodeWorkload,
    smp: int,
    memory: str,
    timeout: float,
    baselines: bool,
    repeat: int,
    append: str,
) -> None:
    """Run every configuration, write the results, print the table; LabError when a run failed."""
    config = NodeConfig(kernel=image, modules_dir=modules_dir, kdir=kdir, workload=workload, smp=smp,
                        memory=memory, timeout=timeout, baselines=baselines, repeat=repeat,
                        logs_dir=out / "lab-logs", append=append)
    click.echo(f"lab: node scenario on {image.release} ({image.boot_mode}), {len(manifests)} strategies, "
               f"{workload.lookups} lookups per family x {workload.threads} threads", err=True)
    lab = run_node_lab(config, manifests, _progress)
    data = write_node_results(lab, out)
    click.echo(terminal_table(data))
    click.echo(f"wrote {out / NODE_JSON}, {out / NODE_PNG}, {out / NODE_MD}")
    failed = [(r["name"], problems(r)) for r in data["runs"] if problems(r)]  # type: ignore[attr-defined]
    if failed:
        raise LabError("; ".join(f"{n}: {', '.join(p)}" for n, p in failed))
