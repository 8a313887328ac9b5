"""Write a random checkpoint in the hub's exact layout (for tests, demos, trying dsv3 out and speed measurements).

The folder gets config.json, generation_config.json, tokenizer.json, tokenizer_config.json (with a DeepSeek-style chat template), shards model-0000i-of-0000n.safetensors and model.safetensors.index.json, MTP layer included. With --fp8 the linear weights are F8_E4M3 with 128x128 weight_scale_inv blocks, as on the hub. The same --seed gives the same bytes.

--layers and --experts cut a preset to fewer layers and routed experts and keep every width (hidden size, heads, LoRA ranks, expert size, vocabulary): a real-width checkpoint whose per-token work per layer is the real model's. Routing values that have to change with the cut are printed. A full-size preset larger than ~2 GB is refused; a cut one only has to fit the disk (checked before writing). --tokenizer copies tokenizer files from a folder (for example a real DeepSeek tokenizer) instead of writing the small BPE.

Examples:

  dsv3 tiny ./tiny-bf16

  dsv3 tiny ./tiny-fp8 --fp8 --shards 4 --seed 1

  dsv3 tiny ./v3-cut --preset deepseek-v3 --layers 2 --experts 32 --no-mtp

  dsv3 tiny ./tiny --preset tiny --force --json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import JsonOpt, SeedOpt

NAME = "tiny"
NO_ARGS_IS_HELP = True


def command(
    out: Annotated[Path, typer.Argument(help="Folder to write (created if missing).")],
    seed: SeedOpt = 0,
    fp8: Annotated[bool, typer.Option("--fp8", help="Store linear weights as FP8 E4M3 with 128x128 block scales.")] = False,
    shards: Annotated[Optional[int], typer.Option("--shards", min=1, help="Number of safetensors shards (default: 3, or one per ~2 GB).")] = None,
    preset: Annotated[str, typer.Option("--preset", help="Model shape: a preset name (full presets up to ~2 GB of weights; cut larger ones).")] = "tiny",
    layers: Annotated[Optional[int], typer.Option("--layers", help="Keep only this many layers of the preset (widths unchanged).")] = None,
    experts: Annotated[Optional[int], typer.Option("--experts", help="Keep only this many routed experts (a multiple of the preset's n_group).")] = None,
    mtp: Annotated[bool, typer.Option("--mtp/--no-mtp", help="Include the preset's MTP layer.")] = True,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", help="Copy tokenizer.json and tokenizer_config.json from this folder.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the checkpoint files of a non-empty folder.")] = False,
    json_: JsonOpt = False,
) -> None:
    from ..checkpoint import validate
    from ..config import load_preset
    from ..render import plural
    from ..tiny import cut_config, make_tiny

    cut = layers is not None or experts is not None or not mtp
    config, notes = cut_config(load_preset(preset), layers=layers, experts=experts, mtp=mtp) if cut else (None, [])
    kwargs = dict(seed=seed, fp8=fp8, shards=shards, preset=preset, config=config, force=force, tokenizer=tokenizer, cut=cut)
    for n in notes:
        print(f"{preset}: {n}", file=sys.stderr)
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        with Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=Console(stderr=True), transient=True,
        ) as bar:
            task = bar.add_task("tiny", total=None)
            path = make_tiny(out, progress=lambda done, total: bar.update(task, completed=done, total=total), **kwargs)
    else:
        path = make_tiny(out, **kwargs)
    s = validate(path).summary
    if json_:
        print(json.dumps(dict(s, changes=notes), indent=2))
        return
    print(f"{s['path']}: {s['tensors']} tensors, {s['parameters']:,} parameters, {s['bytes']:,} bytes, "
          f"{s['format'].upper()}, {plural(s['shards'], 'shard')}, MTP {'yes' if s['mtp'] else 'no'}")
