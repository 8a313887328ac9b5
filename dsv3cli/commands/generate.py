"""Generate text (or token ids) from a checkpoint folder in the hub layout, on one or several local processes (tensor + expert parallel), with MTP speculative decoding.

Prompts: --prompt (text; the chat template is applied unless --raw), --prompt-ids (ids, used as they are), --file (text lines, or JSONL lines {"messages": [...]} or {"prompt": "..."}), taken in that order. With none of them and a terminal on stdin, a chat starts (/clear, /exit).

Text streams to stdout; one summary line (speed, MTP acceptance, memory) goes to stderr.

Examples:

  dsv3 generate ./ckpt --prompt "Write a haiku about the sea"

  dsv3 generate ./ckpt --prompt-ids 0,17,42 --max-new-tokens 16 --json

  dsv3 generate ./ckpt --file prompts.jsonl --batch-size 4 --temperature 0.7 --top-p 0.95

  dsv3 generate ./ckpt --nproc 2 --mtp 2 --prompt "Hello"

  dsv3 generate ./ckpt --threads 1 --prompt "Hello"     (small model, busy machine)

  dsv3 generate ./ckpt            (interactive chat)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import DsvError, UsageError
from ..options import Device, DeviceOpt, DType, DTypeOpt, JsonOpt, MemoryForceOpt, NprocOpt, SeedOpt, ThreadsOpt

NAME = "generate"
NO_ARGS_IS_HELP = True


def command(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder (config.json, index + shards, tokenizer files).")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A text prompt (repeat for several).")] = None,
    prompt_ids: Annotated[Optional[list[str]], typer.Option("--prompt-ids", help="A prompt as token ids '1,2,3' (repeat for several; no tokenizer needed).")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Prompts file: one text per line, or JSONL with {\"messages\": [...]} or {\"prompt\": ...}.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Skip the chat template: BOS + the text as it is.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate per prompt at most.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1 = off).")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample among the k most likely tokens (0 = off).")] = 0,
    seed: SeedOpt = 0,
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", min=2, help="KV-cache length: prompt + output tokens.")] = 4096,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Prompts decoded together.")] = 4,
    dtype: DTypeOpt = DType.auto,
    device: DeviceOpt = Device.auto,
    nproc: NprocOpt = 1,
    threads: ThreadsOpt = None,
    mtp: Annotated[Optional[int], typer.Option("--mtp", min=0, help="Draft tokens per step with the MTP layer (default 1 when the checkpoint has one; 0 = off).")] = None,
    json_out: JsonOpt = False,
    force: MemoryForceOpt = False,
) -> None:
    from ..generation import Sampling
    from ..launch import launch, under_launcher

    job = {
        "ckpt": str(ckpt), "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
        "top_k": top_k, "seed": seed, "max_seq_len": max_seq_len, "batch_size": batch_size,
        "dtype": dtype.value, "device": device.value, "mtp": mtp, "json": json_out, "raw": raw,
        "threads": threads, "force": force,
    }
    Sampling(temperature, top_k, top_p).check()
    cfg = _config(ckpt)
    if warning := cfg.past_context(max_seq_len, f"--max-seq-len {max_seq_len}"):
        print(f"warning: {warning}", file=sys.stderr)
    world = int(os.environ["WORLD_SIZE"]) if under_launcher() else nproc
    if under_launcher() and nproc not in (1, world):
        raise UsageError(f"--nproc {nproc}: this process runs under torchrun with WORLD_SIZE={world}; leave --nproc at 1")
    spawn = nproc > 1 and not under_launcher()  # under torchrun the processes exist already
    if world > 1:
        from ..model import check_divisible
        from ..parallel import Dist

        check_divisible(cfg, Dist(rank=0, world_size=world))
    from ..parallel import resolve_device

    job["device"] = resolve_device(device.value)
    if prompt or prompt_ids or file:
        job["prompts"] = prepare_prompts(ckpt, cfg, prompt or [], prompt_ids or [], file, raw, max_seq_len)
    elif sys.stdin.isatty() and not json_out:
        job["chat"] = True
    else:
        raise UsageError("no prompt: give --prompt, --prompt-ids or --file (or run in a terminal for a chat)")
    if spawn:
        code = launch(nproc, f"{__name__}:run_rank", job)
        if code:
            raise typer.Exit(code)
        return
    run_rank(job)


# ---- input -------------------------------------------------------------------------------------


def _config(ckpt: Path):
    from ..config import ModelConfig

    if not ckpt.is_dir():
        raise DsvError(f"{ckpt}: not a checkpoint folder")
    return ModelConfig.from_json(ckpt)


def _tokenizer(ckpt: Path, why: str):
    from ..tokenizer import load_tokenizer

    if not (ckpt / "tokenizer.json").is_file():
        raise DsvError(f"{ckpt}: no tokenizer.json, so {why} cannot be encoded; pass token ids with --prompt-ids")
    return load_tokenizer(ckpt)


def _encode(tok, text: str | None, messages: list | None, raw: bool) -> list[int]:
    if messages is not None:
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    if raw:
        return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text)
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))


def _parse_ids(s: str) -> list[int]:
    try:
        ids = [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"--prompt-ids {s!r}: expected comma-separated integers like 1,2,3") from None
    if not ids:
        raise UsageError("--prompt-ids: empty; give at least one id")
    return ids


def _read_file(path: Path) -> list[tuple[str | None, list | None]]:
    """(text, messages) per prompt of a text or JSONL file."""
    if path.is_dir():
        raise DsvError(f"--file {path}: a folder; give a prompts file (text lines or JSONL)")
    if not path.is_file():
        raise DsvError(f"--file {path}: no such file")
    items: list[tuple[str | None, list | None]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DsvError(f"--file {path}: not UTF-8 text (byte {e.start}); give a prompts file (text lines or JSONL)") from None
    first = next((ln for ln in lines if ln.strip()), "")
    jsonl = path.suffix in (".jsonl", ".json") or _is_json_object(first)  # decided once per file
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DsvError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(d, dict) and isinstance(d.get("messages"), list):
                items.append((None, d["messages"]))
            elif isinstance(d, dict) and isinstance(d.get("prompt", d.get("text")), str):
                items.append((d.get("prompt", d.get("text")), None))
            else:
                raise DsvError(f"{path}:{n}: expected {{\"messages\": [...]}} or {{\"prompt\": \"...\"}}")
        else:
            items.append((line, None))
    if not items:
        raise DsvError(f"{path}: no prompts in this file")
    return items


def _is_json_object(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def prepare_prompts(ckpt: Path, cfg, texts: list[str], ids: list[str], file: Path | None, raw: bool, max_seq_len: int) -> list[list[int]]:
    """Token ids of every prompt, checked against the vocabulary and --max-seq-len."""
    from ..generation import check_prompts

    items: list[tuple[str | None, list | None]] = [(t, None) for t in texts]
    if file is not None:
        file_items = _read_file(file)
    else:
        file_items = []
    prompts: list[list[int]] = []
    tok = _tokenizer(ckpt, "a text prompt") if texts or file_items else None
    prompts += [_encode(tok, t, m, raw) for t, m in items]
    prompts += [_parse_ids(s) for s in ids]
    prompts += [_encode(tok, t, m, raw) for t, m in file_items]
    check_prompts(prompts, cfg.vocab_size, max_seq_len)
    return prompts


# ---- one rank ----------------------------------------------------------------------------------


def run_rank(job: dict[str, Any]) -> None:
    """Load this rank's share of the model, generate, and (on rank 0) print."""
    import torch

    from ..checkpoint import Checkpoint
    from ..generation import GenStats, Sampling, generate, make_generator
    from ..loading import load_model
    from ..parallel import init_distributed, leave, peer_failures, resolve_dtype

    ckpt = Path(job["ckpt"])
    device = job["device"]
    auto = job["dtype"] == "auto"
    torch_dtype = resolve_dtype(job["dtype"], Checkpoint(ckpt).dtype("model.embed_tokens.weight") if auto else None)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    dist = init_distributed(device)
    main = dist.rank == 0
    if not main:
        sys.stdout = open(os.devnull, "w")  # output is rank 0's
    chat = job.get("chat", False)
    prompts = job.get("prompts") or []
    batch = 1 if chat else min(job["batch_size"], len(prompts))
    with peer_failures(dist):
        model = load_model(ckpt, dist, dtype=torch_dtype, device=device, max_batch_size=batch, max_seq_len=job["max_seq_len"],
                           check_memory=not job["force"])
        mtp = job["mtp"] if job["mtp"] is not None else (1 if model.has_mtp else 0)
        if mtp and not model.has_mtp:
            raise UsageError(f"--mtp {mtp}: {ckpt} has no MTP layer (layer {model.cfg.num_hidden_layers}); use --mtp 0")
        tok = _tokenizer(ckpt, "text") if (ckpt / "tokenizer.json").is_file() else None
        eos = sorted(set(model.cfg.eos_ids) | set(tok.eos_ids if tok else []))
        sampling = Sampling(job["temperature"], job["top_k"], job["top_p"])
        g = make_generator(job["seed"], device)
        kw = dict(max_new_tokens=job["max_new_tokens"], max_seq_len=job["max_seq_len"], sampling=sampling,
                  mtp=mtp, eos_ids=eos, generator=g, dist=dist)
        if chat:
            _chat(model, tok, kw, job, dist)
            leave(dist)
            return
        stats = GenStats()
        results: list[dict[str, Any]] = []
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            view = _Printer(tok, eos, live=main and not job["json"] and len(chunk) == 1)
            out, st = generate(model, chunk, on_tokens=view.add, **kw)
            view.finish()
            stats.add(st)
            for p, ids in zip(chunk, out):
                results.append({"prompt_ids": p, "generated_ids": ids, "text": _text(tok, ids, eos)})
                if main and not job["json"] and not view.live:
                    whole = _Printer(tok, eos, live=True)
                    whole.add(0, ids)
                    whole.finish()
                if main and not job["json"]:
                    print("\n" if len(prompts) > 1 else "", flush=True)
        leave(dist)
    if main:
        s = stats.to_dict()
        if job["json"]:
            print(json.dumps({"outputs": results, "stats": s}, indent=2))
        print(summary(s), file=sys.stderr)


def _text(tok, ids: list[int], eos: list[int]) -> str | None:
    if tok is None:
        return None
    return tok.decode([t for t in ids if t not in eos])


class _Printer:
    """Streams one sequence to stdout: text decoded incrementally (a partial UTF-8 character is held
    until the next token completes it), or ids when there is no tokenizer."""

    def __init__(self, tok, eos: list[int], live: bool):
        self.tok, self.eos, self.live = tok, set(eos), live
        self.ids: list[int] = []
        self.shown = 0

    def add(self, b: int, ids: list[int]) -> None:
        if not self.live:
            return
        if self.tok is None:
            sys.stdout.write(("" if not self.ids else " ") + " ".join(map(str, ids)))
            self.ids += ids
        else:
            self.ids += [t for t in ids if t not in self.eos]
            text = self.tok.decode(self.ids)
            if text.endswith("\ufffd"):
                return
            sys.stdout.write(text[self.shown :])
            self.shown = len(text)
        sys.stdout.flush()

    def finish(self) -> None:
        """Show what was held back (a sequence may end inside a UTF-8 character)."""
        if self.live and self.tok is not None:
            sys.stdout.write(self.tok.decode(self.ids)[self.shown :])
            sys.stdout.flush()


def _chat(model, tok, kw: dict[str, Any], job: dict[str, Any], dist) -> None:
    """Rank 0 reads turns from the terminal; every rank generates each reply."""
    from ..generation import generate

    if tok is None:
        raise DsvError(f"{job['ckpt']}: no tokenizer.json; a chat needs one (use --prompt-ids instead)")
    messages: list[dict[str, str]] = []
    if dist.rank == 0:
        print("Chat: type a message; /clear starts over, /exit quits.", file=sys.stderr)
    while True:
        ids = None
        if dist.rank == 0:
            try:
                line = input("> ")
            except EOFError:
                line = "/exit"
            if line.strip() == "/clear":
                messages = []
                continue
            if line.strip() == "/exit":
                ids = []
            else:
                messages.append({"role": "user", "content": line})
                ids = _encode(tok, None, messages, job["raw"]) if not job["raw"] else _encode(tok, line, None, True)
                if len(ids) >= job["max_seq_len"]:
                    messages.pop()
                    print(f"(this conversation has {len(ids)} tokens, over --max-seq-len; /clear to start over)", file=sys.stderr)
                    continue
        if dist.world_size > 1:
            import torch.distributed as tdist

            box = [ids]
            tdist.broadcast_object_list(box, src=0, group=dist.group)
            ids = box[0]
        if not ids:
            return
        view = _Printer(tok, kw["eos_ids"], live=dist.rank == 0)
        out, st = generate(model, [ids], on_tokens=view.add, **kw)
        view.finish()
        if dist.rank == 0:
            print(flush=True)
            print(summary(st.to_dict()), file=sys.stderr)
            messages.append({"role": "assistant", "content": _text(tok, out[0], kw["eos_ids"])})


def summary(s: dict[str, Any]) -> str:
    """The one-line stats summary."""

    def num(x, fmt=".1f"):
        return "-" if x is None else format(x, fmt)

    parts = [
        f"{s['sequences']} seq",
        f"{s['prompt_tokens']} prompt + {s['generated_tokens']} generated tokens",
        f"prefill {num(s['prefill_tokens_per_s'])} tok/s",
        f"decode {num(s['decode_tokens_per_s'])} tok/s",
        f"first token {num(s['time_to_first_token_s'], '.3f')} s",
    ]
    if s["mtp"]:
        per = "/".join(num(None if a is None else 100 * a, ".0f") for a in s["acceptance_per_position"])
        parts.append(
            f"MTP {s['mtp']}: accepted {s['accepted']}/{s['drafted']} ({per}% by position), "
            f"{num(s['tokens_per_forward'], '.2f')} tokens/forward"
        )
    mem = f"peak RSS {num(s['peak_rss_mb'], '.0f')} MB"
    if s.get("peak_cuda_mb") is not None:
        mem += f", CUDA {num(s['peak_cuda_mb'], '.0f')} MB"
    parts.append(mem)
    return " · ".join(parts)
