"""Check a local checkpoint folder without loading the model.

Checks the index against the shards, each safetensors header (truncation, corruption, Git LFS pointers), FP8 weights and their weight_scale_inv (present, float32, shape ceil(out/128) x ceil(in/128)), every tensor's shape against config.json (MTP layer included when present) and quantization_config against the dtypes. --check-values also reads every tensor once looking for NaN/Inf.

Prints a summary and one line per problem; exits 1 when there is any problem.

Examples:

  dsv3 verify ./DeepSeek-V3

  dsv3 verify ./tiny --check-values

  dsv3 verify ./tiny --json

  dsv3 verify ./DeepSeek-V3 --hub v3   (also sha256 of every file against the hub's)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..options import JsonOpt, RevisionOpt, TokenOpt

NAME = "verify"
NO_ARGS_IS_HELP = True


def command(
    path: Annotated[Path, typer.Argument(help="Checkpoint folder (config.json + index + shards, or model.safetensors).")],
    check_values: Annotated[bool, typer.Option("--check-values", help="Also read every tensor and look for NaN/Inf (slow on big checkpoints).")] = False,
    json_: JsonOpt = False,
    hub_repo: Annotated[str | None, typer.Option("--hub", help="Also check sizes and sha256 of every file against this hub repo (id or alias, e.g. v3).")] = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
) -> None:
    from ..checkpoint import validate
    from ..render import plural

    if check_values and sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("checking values", total=None)
            rep = validate(path, check_values=True, progress=lambda done, total: bar.update(task, completed=done, total=total))
    else:
        rep = validate(path, check_values=check_values)
    if hub_repo:
        from ..hub import verify_against_hub

        hub_rep = verify_against_hub(path, hub_repo, revision=revision, token=token)
        rep.summary["hub"] = hub_rep.as_dict()
        rep.problems.extend(f"hub {hub_rep.repo}@{hub_rep.commit[:12]}: {p}" for p in hub_rep.problems)

    if json_:
        print(json.dumps({"ok": rep.ok, "problems": rep.problems, "warnings": rep.warnings, "summary": rep.summary}, indent=2))
    else:
        s = rep.summary
        if "tensors" in s:
            dtypes = ", ".join(f"{k} {v}" for k, v in s["dtypes"].items())
            print(f"{s['path']}: {plural(s['tensors'], 'tensor')} in {plural(s['shards'], 'shard')}, {s['bytes']:,} bytes, "
                  f"{s['parameters']:,} parameters")
            print(f"  dtypes: {dtypes or '-'}; FP8 weights: {s['fp8_weights']}; MTP layer: "
                  f"{'present' if s['mtp'] else 'absent (config.json declares it)' if s['mtp_in_config'] else 'absent'}; values checked: {'yes' if s['values_checked'] else 'no'}")
        for w in rep.warnings:
            print(f"warning: {w}")
        for p in rep.problems:
            print(f"problem: {p}")
        print(plural(len(rep.problems), "problem") if rep.problems else "OK")
    if rep.problems:
        raise typer.Exit(1)
