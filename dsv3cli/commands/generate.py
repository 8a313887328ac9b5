"""Generate text (or token ids) from a checkpoint folder in the hub layout, on one or several local processes (tensor + expert parallel), with MTP speculative decoding.

Prompts: --prompt (text; the chat template is applied unless --raw), --prompt-ids (ids, used as they are), --prompts FILE (text lines, or JSONL lines {"messages": [...]} or {"prompt": "..."}), taken in that order. With none of them and a terminal on stdin, a chat starts (/help, /clear, /exit; Ctrl-C stops a reply).

Text streams to stdout; one summary line (speed, MTP acceptance, memory) goes to stderr.

Examples:

  dsv3 generate ./ckpt --prompt "Write a haiku about the sea"

  dsv3 generate ./ckpt --prompt-ids 0,17,42 --max-new-tokens 16 --json

  dsv3 generate ./ckpt --prompts prompts.jsonl --batch-size 4 --temperature 0.7 --top-p 0.95

  dsv3 generate ./ckpt --nproc 2 --mtp 2 --prompt "Hello"

  dsv3 generate ./ckpt --threads 1 --prompt "Hello"     (small model, busy machine)

  dsv3 generate ./ckpt-fp8 --lm-head fp8 --prompt "Hello"   (FP8 head)

  dsv3 generate ./ckpt            (interactive chat)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import DsvError, UsageError
from ..options import Device, DeviceOpt, DType, DTypeOpt, JsonOpt, LmHead, MemoryForceOpt, NprocOpt, PromptsOpt, SeedOpt, ThreadsOpt

NAME = "generate"
NO_ARGS_IS_HELP = True


def command(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder (config.json, index + shards, tokenizer files).")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A text prompt (repeat for several).")] = None,
    prompt_ids: Annotated[Optional[list[str]], typer.Option("--prompt-ids", help="A prompt as token ids '1,2,3' (repeat for several; no tokenizer needed).")] = None,
    prompts: PromptsOpt = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", hidden=True)] = None,  # old spelling of --prompts
    raw: Annotated[bool, typer.Option("--raw", help="Skip the chat template: BOS + the text as it is.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate per prompt at most.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1] (1 = off).")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample among the k most likely tokens (0 = off).")] = 0,
    seed: SeedOpt = 0,
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", min=2, help="KV-cache length: prompt + output tokens.")] = 4096,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Prompts decoded together.")] = 4,
    dtype: DTypeOpt = DType.auto,
    device: DeviceOpt = Device.auto,
    nproc: NprocOpt = 1,
    threads: ThreadsOpt = None,
    mtp: Annotated[Optional[int], typer.Option("--mtp", min=0, help="Draft tokens per step with the MTP layer (default 1 when the checkpoint has one; 0 = off).")] = None,
    lm_head: Annotated[LmHead, typer.Option("--lm-head", help="The output head as stored, or quantized to FP8 128x128 blocks while loading (half its bytes: faster decode on CPUs, logits within FP8 rounding).")] = LmHead.stored,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="In a chat, a stats line (speed, MTP acceptance) after each reply.")] = False,
    json_out: JsonOpt = False,
    force: MemoryForceOpt = False,
) -> None:
    from ..generation import Sampling
    from ..launch import launch, under_launcher

    job = {
        "ckpt": str(ckpt), "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
        "top_k": top_k, "seed": seed, "max_seq_len": max_seq_len, "batch_size": batch_size,
        "dtype": dtype.value, "device": device.value, "mtp": mtp, "json": json_out, "raw": raw,
        "threads": threads, "verbose": verbose, "force": force, "lm_head": lm_head.value,
        # Generated text on a terminal shows control bytes escaped; --raw or a pipe passes them.
        "escape": sys.stdout.isatty() and not raw,
    }
    Sampling(temperature, top_k, top_p).check()
    cfg = _config(ckpt)
    if mtp:  # before any process starts: every rank would meet it
        from ..checkpoint import Checkpoint

        if not Checkpoint(ckpt).has_mtp:
            raise UsageError(f"--mtp {mtp}: {ckpt} has no MTP layer (layer {cfg.num_hidden_layers}); use --mtp 0")
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
    prompts = prompts or file
    if prompt or prompt_ids or prompts:
        job["prompts"] = prepare_prompts(ckpt, cfg, prompt or [], prompt_ids or [], prompts, raw, max_seq_len)
    elif sys.stdin.isatty() and not json_out:
        job["chat"] = True
    else:
        raise UsageError("no prompt: give --prompt, --prompt-ids or --prompts FILE (or run in a terminal for a chat)")
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


def prepare_prompts(ckpt: Path, cfg, texts: list[str], ids: list[str], file: Path | None, raw: bool, max_seq_len: int) -> list[list[int]]:
    """Token ids of every prompt, checked against the vocabulary and --max-seq-len."""
    from ..generation import check_prompts
    from ..prompts import encode, parse_prompt_ids, read_prompts_file, user

    texts_m = [user(t) for t in texts]
    file_m = read_prompts_file(file) if file is not None else []
    tok = _tokenizer(ckpt, "a text prompt") if texts_m or file_m else None
    prompts = [encode(tok, m, raw) for m in texts_m] + parse_prompt_ids(ids) + [encode(tok, m, raw) for m in file_m]
    check_prompts(prompts, cfg.vocab_size, max_seq_len)
    return prompts


# ---- one rank ----------------------------------------------------------------------------------


def run_rank(job: dict[str, Any]) -> None:
    """Load this rank's share of the model, generate, and (on rank 0) print."""
    import torch

    from ..checkpoint import Checkpoint
    from dsv3_kernels.cpu import enabled as cpu_kernels_enabled

    from ..generation import GenStats, Sampling, generate, make_generator, peak_rss_mb_per_rank
    from ..loading import compute_dtype, load_model
    from ..ops import Runtime, rank_threads
    from ..parallel import init_distributed, leave, peer_failures

    ckpt = Path(job["ckpt"])
    device = job["device"]
    torch_dtype = compute_dtype(Checkpoint(ckpt), job["dtype"])
    runtime = Runtime(torch.device(device), torch_dtype, threads=job.get("threads") or rank_threads(),
                      kernels=cpu_kernels_enabled(), debug=os.environ.get("DSV3_DEBUG") == "1")
    runtime.apply()
    dist = init_distributed(device)
    main = dist.rank == 0
    if not main:
        sys.stdout = open(os.devnull, "w")  # output is rank 0's
    chat = job.get("chat", False)
    prompts = job.get("prompts") or []
    batch = 1 if chat else min(job["batch_size"], len(prompts))
    with peer_failures(dist):
        t0 = time.perf_counter()
        model = load_model(ckpt, dist, runtime=runtime, max_batch_size=batch, max_seq_len=job["max_seq_len"],
                           mtp=job["mtp"] != 0, head_fp8=job["lm_head"] == "fp8", check_memory=not job["force"])
        load_s = time.perf_counter() - t0
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
            view = _Printer(tok, eos, live=main and not job["json"] and len(chunk) == 1, escape=job["escape"])
            out, st = generate(model, chunk, on_tokens=view.add, **kw)
            view.finish()
            stats.add(st)
            for p, ids in zip(chunk, out):
                results.append({"prompt_ids": p, "generated_ids": ids, "text": _text(tok, ids, eos)})
                if main and not job["json"] and not view.live:
                    whole = _Printer(tok, eos, live=True, escape=job["escape"])
                    whole.add(0, ids)
                    whole.finish()
                if main and not job["json"]:
                    print("\n" if len(prompts) > 1 else "", flush=True)
        rss = peak_rss_mb_per_rank(dist)
        leave(dist)
    if main:
        s = {**stats.to_dict(), "load_s": round(load_s, 3), "peak_rss_mb": round(sum(rss), 1), "peak_rss_mb_per_rank": rss}
        if job["json"]:
            print(json.dumps({"outputs": results, "stats": s}, indent=2))
        print(summary(s), file=sys.stderr)


def _text(tok, ids: list[int], eos: list[int]) -> str | None:
    if tok is None:
        return None
    return tok.decode([t for t in ids if t not in eos])


class _Printer:
    """Streams one sequence to stdout: text decoded incrementally (a partial UTF-8 character is held
    until the next token completes it), or ids when there is no tokenizer. With `escape`, control
    characters are shown escaped, so generated bytes cannot drive the terminal."""

    def __init__(self, tok, eos: list[int], live: bool, escape: bool = False):
        self.tok, self.eos, self.live, self.escape = tok, set(eos), live, escape
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
            self._write(text[self.shown :])
            self.shown = len(text)
        sys.stdout.flush()

    def finish(self) -> None:
        """Show what was held back (a sequence may end inside a UTF-8 character)."""
        if self.live and self.tok is not None:
            self._write(self.tok.decode(self.ids)[self.shown :])
            sys.stdout.flush()

    def _write(self, text: str) -> None:
        from ..render import terminal_safe

        sys.stdout.write(terminal_safe(text) if self.escape else text)


CHAT_COMMANDS = "/help, /clear (start over), /exit (or Ctrl-D)"


def _chat(model, tok, kw: dict[str, Any], job: dict[str, Any], dist) -> None:
    """Rank 0 reads turns from the terminal (with line editing and history); every rank generates
    each reply. Ctrl-C stops a reply (with one process; under --nproc it ends the run)."""
    from ..generation import generate

    if tok is None:
        raise DsvError(f"{job['ckpt']}: no tokenizer.json; a chat needs one (use --prompt-ids instead)")
    messages: list[dict[str, str]] = []
    history = None
    if dist.rank == 0:
        history = _line_editing()
        print("Chat: /help lists the commands; Ctrl-C stops a reply, Ctrl-D leaves.", file=sys.stderr)
    while True:
        ids = _next_turn(tok, messages, job, history) if dist.rank == 0 else None
        if dist.world_size > 1:
            import torch.distributed as tdist

            box = [ids]
            tdist.broadcast_object_list(box, src=0, group=dist.group)
            ids = box[0]
        if not ids:
            return
        view = _Printer(tok, kw["eos_ids"], live=dist.rank == 0, escape=job["escape"])
        try:
            out, st = generate(model, [ids], on_tokens=view.add, **kw)
        except KeyboardInterrupt:
            if dist.world_size > 1:  # every rank got the signal: the launcher ends the run
                raise
            view.finish()
            print("\n(stopped; this turn is left out of the conversation)", file=sys.stderr)
            messages.pop()
            continue
        view.finish()
        if dist.rank == 0:
            print(flush=True)
            if job["verbose"]:
                _dim(summary(st.to_dict()))
            messages.append({"role": "assistant", "content": _text(tok, out[0], kw["eos_ids"])})


def _next_turn(tok, messages: list[dict[str, str]], job: dict[str, Any], history) -> list[int]:
    """The token ids of the conversation with the user's next message ([] to leave); handles
    empty lines, /commands, Ctrl-C (twice leaves) and Ctrl-D. `history`: readline, or None."""
    from ..prompts import encode, user

    interrupted = False
    while True:
        try:
            line = input("> ").strip()
        except EOFError:  # Ctrl-D: leave on a fresh line
            print(flush=True)
            return []
        except KeyboardInterrupt:
            print(flush=True)
            if interrupted:
                return []
            print("(Ctrl-C again, Ctrl-D or /exit to leave)", file=sys.stderr)
            interrupted = True
            continue
        interrupted = False
        if not line:
            continue
        if history is not None:
            history.add_history(line)
        if line.startswith("/"):
            if line == "/exit":
                return []
            if line == "/clear":
                messages.clear()
                print("(new conversation)", file=sys.stderr)
                continue
            unknown = "" if line == "/help" else f"unknown command {line.split()[0]}; "
            print(f"{unknown}commands: {CHAT_COMMANDS}", file=sys.stderr)
            continue
        ids = encode(tok, messages + user(line), job["raw"])
        if len(ids) >= job["max_seq_len"]:
            print(f"(this conversation has {len(ids)} tokens, over --max-seq-len; /clear to start over)", file=sys.stderr)
            continue
        messages.extend(user(line))
        return ids


def _line_editing():
    """Arrow keys, history and Ctrl-A/E at the prompt: Python's readline (importing it is what
    turns editing on for input()), when it exists here; returns it, or None."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return None
    try:
        import readline
    except ImportError:  # no readline (Windows): plain input, still correct
        return None
    readline.set_auto_history(False)  # blank lines stay out of the history
    return readline


def _dim(line: str) -> None:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, highlight=False).print(Text(line, style="dim"), soft_wrap=True)


def summary(s: dict[str, Any]) -> str:
    """The one-line stats summary (the first token's time counts from the prompt, after the load)."""

    def num(x, fmt=".1f"):
        return "-" if x is None else format(x, fmt)

    parts = [
        f"{s['sequences']} seq",
        f"{s['prompt_tokens']} prompt + {s['generated_tokens']} generated tokens",
        f"prefill {num(s['prefill_tokens_per_s'])} tok/s",
        f"decode {num(s['decode_tokens_per_s'])} tok/s",
        f"first token {num(s['time_to_first_token_s'], '.3f')} s",
    ]
    if s.get("load_s") is not None:
        parts.append(f"load {num(s['load_s'], '.2f')} s")
    if s["mtp"]:
        per = "/".join(num(None if a is None else 100 * a, ".0f") for a in s["acceptance_per_position"])
        parts.append(
            f"MTP {s['mtp']}: accepted {s['accepted']}/{s['drafted']} ({per}% by position), "
            f"{num(s['tokens_per_forward'], '.2f')} tokens/forward"
        )
    ranks = s.get("peak_rss_mb_per_rank") or []
    mem = f"peak RSS {num(s['peak_rss_mb'], '.0f')} MB" + (f" over {len(ranks)} ranks" if len(ranks) > 1 else "")
    if s.get("peak_cuda_mb") is not None:
        mem += f", CUDA {num(s['peak_cuda_mb'], '.0f')} MB"
    parts.append(mem)
    return " · ".join(parts)
