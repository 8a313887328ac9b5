"""Write a small random checkpoint in the hub's exact layout (for tests, demos and trying dsv3 out).

The folder gets config.json, generation_config.json, tokenizer.json, tokenizer_config.json (with a DeepSeek-style chat template), shards model-0000i-of-0000n.safetensors and model.safetensors.index.json, MTP layer included. With --fp8 the linear weights are F8_E4M3 with 128x128 weight_scale_inv blocks, as on the hub. The same --seed gives the same bytes.

Examples:

  dsv3 tiny ./tiny-bf16

  dsv3 tiny ./tiny-fp8 --fp8 --shards 4 --seed 1

  dsv3 tiny ./tiny --preset tiny --force --json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..options import JsonOpt, SeedOpt

NAME = "tiny"
NO_ARGS_IS_HELP = True


def command(
    out: Annotated[Path, typer.Argument(help="Folder to write (created if missing).")],
    seed: SeedOpt = 0,
    fp8: Annotated[bool, typer.Option("--fp8", help="Store linear weights as FP8 E4M3 with 128x128 block scales.")] = False,
    shards: Annotated[int, typer.Option("--shards", min=1, help="Number of safetensors shards.")] = 3,
    preset: Annotated[str, typer.Option("--preset", help="Model shape: a preset name (up to ~2 GB of weights).")] = "tiny",
    force: Annotated[bool, typer.Option("--force", help="Overwrite the checkpoint files of a non-empty folder.")] = False,
    json_: JsonOpt = False,
) -> None:
    from ..checkpoint import validate
    from ..render import plural
    from ..tiny import make_tiny

    path = make_tiny(out, seed=seed, fp8=fp8, shards=shards, preset=preset, force=force)
    s = validate(path).summary
    if json_:
        print(json.dumps(s, indent=2))
        return
    print(f"{s['path']}: {s['tensors']} tensors, {s['parameters']:,} parameters, {s['bytes']:,} bytes, "
          f"{s['format'].upper()}, {plural(s['shards'], 'shard')}, MTP {'yes' if s['mtp'] else 'no'}")
