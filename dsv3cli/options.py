"""Options shared by several commands, declared once with Annotated (like the `hf` CLI)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float32 = "float32"


class LmHead(str, Enum):
    stored = "stored"
    fp8 = "fp8"


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to compute: auto picks cuda when available.")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Compute dtype; auto = bfloat16 for FP8/BF16 checkpoints, float32 for F32 ones.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="A git revision (branch, tag or commit) on the hub.")]
TokenOpt = Annotated[Optional[str], typer.Option("--token", envvar="HF_TOKEN", help="Hub token (default: $HF_TOKEN or the saved login).")]
PromptsOpt = Annotated[Optional[Path], typer.Option("--prompts", help="Prompts file: one text per line; a line starting with { or [ is JSON, {\"messages\": [...]} or {\"prompt\": \"...\"} (chat template applied unless --raw).", show_default=False)]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads per process for torch's intra-op work (default: torch's choice). 1 is often fastest for small models on a busy machine.")]
NprocOpt = Annotated[int, typer.Option("--nproc", min=1, help="Processes to launch on this machine (tensor + expert parallel); under torchrun leave at 1.")]
MemoryForceOpt = Annotated[bool, typer.Option("--force", help="Load even when the memory preflight says this rank's share, KV cache and scratch exceed the memory available.")]
