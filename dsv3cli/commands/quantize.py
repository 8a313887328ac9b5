"""Convert a whole checkpoint between FP8 (E4M3, 128x128 block scales) and BF16, shard by shard.

The output is directly loadable: the same shard names, exactly the hub's set of FP8 weights with their weight_scale_inv beside them (or none), an index with the right total_size (written last), quantization_config added to or removed from config.json, the tokenizer and every other file copied, the MTP layer kept. --to defaults to the other format. An interrupted run (even killed) continues with --resume and ends byte-identical to an uninterrupted one. Progress (bytes) goes to stderr, the result to stdout.

Examples:

  dsv3 quantize ./DeepSeek-V3 ./DeepSeek-V3-bf16

  dsv3 quantize ./my-finetune-bf16 ./my-finetune-fp8 --to fp8 --scale-fmt ue8m0

  dsv3 quantize ./DeepSeek-V3 ./v3-bf16 --resume --json

  dsv3 quantize ./tiny-bf16 ./tiny-fp8 --device cpu --threads 2
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import DeviceOpt, Device, JsonOpt

NAME = "quantize"
NO_ARGS_IS_HELP = True


class To(str, Enum):
    fp8 = "fp8"
    bf16 = "bf16"


class ScaleFmt(str, Enum):
    e4m3 = "e4m3"
    ue8m0 = "ue8m0"


def command(
    src: Annotated[Path, typer.Argument(help="Checkpoint folder to convert (BF16/F32 or FP8).")],
    dst: Annotated[Path, typer.Argument(help="Output folder (created; must be empty unless --resume/--force).")],
    to: Annotated[Optional[To], typer.Option("--to", help="Target format; default: the other one.")] = None,
    device: DeviceOpt = Device.auto,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for the conversion (default: all cores).", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, hidden=True)] = None,  # old spelling
    scale_fmt: Annotated[Optional[ScaleFmt], typer.Option("--scale-fmt", help="FP8 scales: e4m3 (float32, default) or ue8m0 (powers of two, as V3.1).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in DST, skipping its finished, verified shards.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty DST.")] = False,
    json_: JsonOpt = False,
) -> None:
    from ..convert import convert_checkpoint  # no torch on the CPU path: seconds of start-up saved

    kwargs = dict(
        to=to.value if to else None,
        device=device.value,
        workers=threads or workers,
        scale_fmt=scale_fmt.value if scale_fmt else None,
        resume=resume,
        force=force,
    )
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        with Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=Console(stderr=True), transient=True,
        ) as bar:
            task = bar.add_task("quantize" if kwargs["to"] != "bf16" else "convert", total=None)
            res = convert_checkpoint(src, dst, progress=lambda done, total: bar.update(task, completed=done, total=total), **kwargs)
    else:
        res = convert_checkpoint(src, dst, **kwargs)
    from ..render import plural

    if json_:
        print(json.dumps(res, indent=2))
    else:
        skipped = f", {res['shards_skipped']} already done" if res["shards_skipped"] else ""
        fmt = f" ({res['scale_fmt']} scales)" if res["scale_fmt"] else ""
        print(
            f"{res['dst']}: {res['to']}{fmt}, {plural(res['tensors'], 'tensor')} ({res['fp8_weights']} FP8) in {plural(res['shards'], 'shard')}{skipped}, "
            f"{res['total_size']:,} bytes, {res['seconds']:.1f} s on {res['device']}"
        )
