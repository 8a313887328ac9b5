"""Route prompts through the model and report per-layer expert load, imbalance, and a replica placement plan.

Counts, per MoE layer, how many tokens each routed expert receives (the actual top-k choices, correction bias applied as in inference; padding excluded). Prompts: --prompts FILE (text lines, or JSONL with chat messages; chat template unless --raw), --prompt-ids (repeatable), plus N generated tokens each with --generate N.

Reports MaxVio (max/mean - 1), balancedness (mean/max GPU load) for an expert-parallel layout of --gpus GPUs, coefficient of variation, normalised entropy, hottest/coldest experts, and how many expert groups (and nodes) each token's experts span against topk_group. The plan adds --redundant replicas of the hottest experts and packs them onto the GPUs (hierarchically when the groups divide over --nodes), with balancedness before and after; --out writes counts (JSON, CSV), plan.json (physical-to-logical map per layer) and heatmap.png.

Examples:

  dsv3 profile-experts ./DeepSeek-V3 --prompts prompts.jsonl --gpus 32 --nodes 4 --redundant 32 --out prof/

  dsv3 profile-experts ./tiny --prompt-ids 1,2,3,4 --prompt-ids 9,8,7 --compare-bias --json

  dsv3 profile-experts ./tiny --prompts prompts.txt --generate 64 --nproc 2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import UsageError
from ..options import DeviceOpt, DType, DTypeOpt, Device, JsonOpt, MemoryForceOpt, NprocOpt, PromptsOpt

NAME = "profile-experts"
NO_ARGS_IS_HELP = True


def command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder in the hub layout.", show_default=False)],
    prompts: PromptsOpt = None,
    prompt_ids: Annotated[Optional[list[str]], typer.Option("--prompt-ids", help="Token ids of one prompt, comma-separated; repeat for more prompts.")] = None,
    generate: Annotated[int, typer.Option("--generate", min=0, help="Also generate N tokens per prompt (greedy) and profile prompt + generated tokens.")] = 0,
    raw: Annotated[bool, typer.Option("--raw", help="Use prompt text as is (BOS + text), without the chat template.")] = False,
    compare_bias: Annotated[bool, typer.Option("--compare-bias", help="Also count the choices the router would make without e_score_correction_bias.")] = False,
    gpus: Annotated[Optional[int], typer.Option("--gpus", min=1, help="GPUs of the expert-parallel layout (default: up to 8, dividing the physical experts).")] = None,
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="Nodes the GPUs are spread over (for group/node spread and the hierarchical plan).")] = 1,
    redundant: Annotated[int, typer.Option("--redundant", min=0, help="Extra expert replicas the placement plan may add.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write counts.json, counts.csv, plan.json and heatmap.png into this folder.")] = None,
    no_heatmap: Annotated[bool, typer.Option("--no-heatmap", help="With --out, skip heatmap.png (no matplotlib needed).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per forward pass.")] = 4,
    dtype: DTypeOpt = DType.auto,
    device: DeviceOpt = Device.auto,
    nproc: NprocOpt = 1,
    json_out: JsonOpt = False,
    force: MemoryForceOpt = False,
) -> None:
    from ..prompts import parse_prompt_ids

    job = {
        "checkpoint": str(checkpoint), "prompts_file": str(prompts) if prompts else None,
        "prompt_ids": parse_prompt_ids(prompt_ids or []), "generate": generate, "raw": raw,
        "compare_bias": compare_bias, "gpus": gpus, "nodes": nodes, "redundant": redundant,
        "batch_size": batch_size, "dtype": dtype.value, "device": device.value,
        "out": str(out) if out else None, "heatmap": not no_heatmap, "json": json_out,
        "force": force,
    }
    from ..launch import launch, under_launcher

    if nproc > 1:
        if under_launcher():
            raise UsageError("--nproc: already running under torchrun; leave --nproc at 1")
        code = launch(nproc, f"{__name__}:run_rank", job)
        if code:
            raise typer.Exit(code)
        return
    run_rank(job)


def run_rank(job: dict[str, Any]) -> None:
    """One process (rank) of the run; rank 0 renders."""
    from ..parallel import Dist, init_distributed, leave, peer_failures, resolve_device
    from ..profiling import ProfileRequest, run_profile

    fields = {k: v for k, v in job.items() if k != "json"}
    for k in ("checkpoint", "prompts_file", "out"):
        fields[k] = Path(fields[k]) if fields[k] else None
    req = ProfileRequest(**fields)
    dist = init_distributed(resolve_device(req.device)) if _distributed() else Dist()
    with peer_failures(dist), _progress(enabled=dist.rank == 0) as bar:
        doc = run_profile(req, progress=bar, dist=dist,
                          warn=lambda w: print(f"warning: {w}", file=sys.stderr) if dist.rank == 0 else None)
        leave(dist)
    if doc is None:
        return
    if job["json"]:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        _render(doc)


def _distributed() -> bool:
    from ..launch import under_launcher

    return under_launcher()


class _progress:
    """A rich progress bar on stderr; `bar(description, total)` returns an advance(n) callable."""

    def __init__(self, enabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console, disable=not (enabled and console.is_terminal), transient=False)

    def __enter__(self):
        self.p.__enter__()
        return self

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)

    def __call__(self, description: str, total: int):
        task = self.p.add_task(f"{description} prompts", total=total)
        return lambda n: self.p.advance(task, n)


def _render(doc: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from ..render import plural

    con = Console()
    ov = doc["metrics"]["overall"]
    lay = doc["layout"]
    plan = doc["plan"]
    nobias = "nobias" in ov
    t = Table(title=f"Expert load: {plural(doc['tokens'], 'token')}, {plural(doc['prompts'], 'prompt')}, "
                    f"{plural(len(doc['moe_layers']), 'MoE layer')}, {plural(doc['n_routed_experts'], 'expert')}, "
                    f"top-{doc['num_experts_per_tok']}",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("layer", justify="right")
    t.add_column("MaxVio", justify="right")
    if nobias:
        t.add_column("no bias", justify="right")
    t.add_column("CV", justify="right")
    t.add_column("entropy", justify="right")
    t.add_column("bal.", justify="right")
    t.add_column("plan", justify="right")
    t.add_column("groups", justify="right")
    t.add_column("hot e:n", no_wrap=True)
    t.add_column("cold", no_wrap=True)
    for m in doc["metrics"]["layers"]:
        row = [str(m["layer"]), f"{m['maxvio']:.2f}"]
        if nobias:
            row.append(f"{m['nobias']['maxvio']:.2f}")
        row += [f"{m['cv']:.2f}", f"{m['entropy']:.3f}", f"{m['balancedness']:.2f}", f"{m['balancedness_planned']:.2f}",
                f"{m['group_spread']['mean']:.1f}",
                " ".join(f"{e}:{n}" for e, n in m["hottest"][:2]), " ".join(f"{e}:{n}" for e, n in m["coldest"][:1])]
        t.add_row(*row)
    con.print(t)
    con.print(f"bal. = balancedness (mean/max GPU load) over {plural(lay['gpus'], 'GPU')} without a plan; plan = with the "
              f"{plan['method']} plan (+{lay['redundant']} replicas); groups = mean expert groups per token "
              f"(topk_group {ov['topk_group']}); hot/cold = expert:tokens", style="dim")
    s = Table(title="Overall", title_justify="left", show_header=False, box=box.SIMPLE, pad_edge=False)
    s.add_column("metric")
    s.add_column("value", justify="right")
    s.add_row("MaxVio (mean / worst layer)", f"{ov['maxvio_mean']:.3f} / {ov['maxvio_max']:.3f}")
    if nobias:
        s.add_row("MaxVio without the bias (mean)", f"{ov['nobias']['maxvio_mean']:.3f}")
    s.add_row("coefficient of variation (mean)", f"{ov['cv_mean']:.3f}")
    s.add_row("normalised entropy (mean)", f"{ov['entropy_mean']:.3f}")
    s.add_row(f"balancedness, {plural(lay['gpus'], 'GPU')}, plain EP (mean / worst)", f"{ov['balancedness_mean']:.3f} / {ov['balancedness_min']:.3f}")
    s.add_row(f"balancedness, {plan['method']} plan, +{lay['redundant']} replicas (mean / worst)",
              f"{ov['balancedness_planned_mean']:.3f} / {ov['balancedness_planned_min']:.3f}")
    s.add_row(f"groups per token (mean / max; topk_group {ov['topk_group']} of {ov['n_group']})",
              f"{ov['group_spread']['mean']:.2f} / {ov['group_spread']['max']}")
    s.add_row(f"tokens spanning all topk_group = {ov['topk_group']} groups", f"{ov['group_spread']['at_limit']:.1%}")
    s.add_row(f"nodes per token (mean / max; {plural(lay['nodes'], 'node')})", f"{ov['node_spread']['mean']:.2f} / {ov['node_spread']['max']}")
    con.print(s)
    for f in doc.get("files", []):
        con.print(f"wrote {f}")
