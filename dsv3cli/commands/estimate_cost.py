"""Parameter, training-cost and inference memory / throughput / cost tables computed from a model
config (an embedded preset or a hub config.json); no weights needed, no torch imported.

With no options it reproduces DeepSeek-V3's Table 1 (2,788K H800 GPU-hours, $5.576M at $2/GPU-hour) and shows the MFU those hours imply; change --gpu, --price, --mfu, --tokens, --gpus to see the days and dollars move.

Examples:

  dsv3 estimate-cost
  dsv3 estimate-cost --section training --gpu B200 --price 3.5 --gpus 4096
  dsv3 estimate-cost --preset kimi-k2 --section inference --gpu H200 --batch-size 64 --max-seq-len 32768
  dsv3 estimate-cost --config /models/DeepSeek-R1/config.json --mfu 0.35 --mfu-basis bf16
  dsv3 estimate-cost --section gpus --format markdown
  dsv3 estimate-cost --json > costs.json
"""

from __future__ import annotations

import csv
import io
import json
from typing import Annotated, Optional

import typer

from ..options import JsonOpt

NAME = "estimate-cost"

_NUM = dict(metavar="NUMBER")


def command(
    config: Annotated[Optional[str], typer.Option(
        "--config", help="A hub config.json (or a checkpoint folder holding one).")] = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help="An embedded preset: deepseek-v3 (default), deepseek-v2, deepseek-v2-lite, kimi-k2, "
        "moonlight, tiny.")] = None,
    gpu: Annotated[str, typer.Option(
        "--gpu", help="GPU from the catalog (see --section gpus): H800, H100-SXM, H200, B200, A100-SXM, MI300X, "
        "MI325X.")] = "H800",
    price: Annotated[str, typer.Option("--price", help="Dollars per GPU-hour.", **_NUM)] = "2",
    mfu: Annotated[Optional[str], typer.Option(
        "--mfu", help="Model FLOPs utilisation in (0, 1] of the dense --mfu-basis peak; default: what DeepSeek's "
        "Table 1 implies (~0.39 of BF16).", **_NUM)] = None,
    mfu_basis: Annotated[str, typer.Option(
        "--mfu-basis", help="Which dense peak the MFU refers to: bf16 or fp8 (sparse peaks are never used).")] = "bf16",
    tokens: Annotated[Optional[str], typer.Option(
        "--tokens", help="Pre-training tokens, e.g. 14.8T, 500B, 1e12 (default 14.8T).", **_NUM)] = None,
    gpus: Annotated[Optional[str], typer.Option(
        "--gpus", help="GPUs: the training cluster (default 2,048) and the serving group (default: the fewest "
        "that fit).", **_NUM)] = None,
    max_seq_len: Annotated[Optional[str], typer.Option(
        "--max-seq-len", help="Training sequence length and serving context in tokens (default 4096).", **_NUM)] = None,
    batch_size: Annotated[Optional[str], typer.Option(
        "--batch-size", help="Sequences served together (decode batch; prefill prompts).", show_default="32",
        **_NUM)] = None,
    context: Annotated[Optional[str], typer.Option("--context", hidden=True, **_NUM)] = None,  # old spelling
    batch: Annotated[Optional[str], typer.Option("--batch", hidden=True, **_NUM)] = None,  # old spelling
    section: Annotated[Optional[str], typer.Option(
        "--section", help="Show one table group: params, training, inference or gpus.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table (rich), csv or markdown.")] = "table",
    as_json: JsonOpt = False,
) -> None:
    from .. import costs
    from ..config import load_config, load_preset, preset_names
    from ..errors import UsageError

    if config and preset:
        raise UsageError("--config and --preset: give one of them")
    if fmt not in ("table", "csv", "markdown"):
        raise UsageError(f"--format {fmt!r}: use table, csv or markdown")
    if preset is not None and preset not in preset_names():
        raise UsageError(f"--preset {preset!r}: unknown preset; known presets: {', '.join(preset_names())}")
    name = config or preset or "deepseek-v3"
    cfg = load_config(config) if config else load_preset(name)

    def num(opt: str, v: Optional[str]) -> Optional[float]:
        return None if v is None else costs.parse_quantity(v, opt)

    def whole(opt: str, v: Optional[str]) -> Optional[int]:
        x = num(opt, v)
        if x is not None and x != int(x):
            raise UsageError(f"{opt} {v}: must be a whole number")
        return None if x is None else int(x)

    sc = costs.Scenario(gpu=gpu, price=num("--price", price), mfu=num("--mfu", mfu), mfu_basis=mfu_basis.lower(),
                        tokens=num("--tokens", tokens), gpus=whole("--gpus", gpus),
                        context=whole("--max-seq-len", max_seq_len or context),
                        batch=whole("--batch-size", batch_size or batch or "32"))
    result = costs.estimate(cfg, sc, model=name, sections=(section,) if section else costs.SECTIONS)
    tables = [t for ts in result["sections"].values() for t in ts]
    if as_json:
        doc = {**result, "sections": {k: [t.to_dict() for t in v] for k, v in result["sections"].items()}}
        print(json.dumps(doc, indent=2))
    elif fmt == "csv":
        print(_csv(tables), end="")
    elif fmt == "markdown":
        print(_markdown(tables, result["model"]["name"], costs.format_value), end="")
    else:
        _rich(tables, result["model"]["name"], costs.format_value)


def _csv(tables) -> str:
    """Raw numbers (no thousands separators) for spreadsheets; a '# title' line between tables."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for i, t in enumerate(tables):
        if len(tables) > 1:
            buf.write(("\n" if i else "") + f"# {t.title}\n")
        w.writerow([label or key for key, label, _ in t.columns])
        for r in t.rows:
            w.writerow(["" if v is None else v for v, _ in t.cells(r)])
    return buf.getvalue()


def _markdown(tables, model: str, fv) -> str:
    out = [f"# dsv3 estimate-cost: {model}\n"]
    for t in tables:
        out.append(f"\n### {t.title}\n\n")
        out.append("| " + " | ".join(label or key for key, label, _ in t.columns) + " |\n")
        out.append("|" + "|".join("---" if f == "text" else "---:" for _, _, f in t.columns) + "|\n")
        for r in t.rows:
            out.append("| " + " | ".join(fv(v, f).replace("|", "\\|") for v, f in t.cells(r)) + " |\n")
        out += [f"\n_{n}_\n" for n in t.notes]
    return "".join(out)


def _rich(tables, model: str, fv) -> None:
    from rich.console import Console

    from ..render import fitted_tables

    console = Console()  # its width: the terminal's, else $COLUMNS, else 80
    console.print(f"[bold]dsv3 estimate-cost[/bold]: {model}\n")
    for t in tables:
        fitted_tables(console, t.title, [label for _, label, _ in t.columns],
                      [[fv(v, f) for v, f in t.cells(r)] for r in t.rows],
                      [f != "text" for _, _, f in t.columns], t.notes)
