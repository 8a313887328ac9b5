"""Prompts as users give them, for `generate` and `profile-experts` alike: a prompts file (one text
per line, or JSONL chat messages), `--prompt-ids` lists, and their token ids through a checkpoint's
tokenizer (its chat template unless raw). No torch; the tokenizer is passed in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .errors import DsvError, UsageError

Messages = list[dict[str, Any]]


def user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def read_prompts_file(path: Path, option: str = "--prompts") -> list[Messages]:
    """The chat messages of each prompt in a text or JSONL file (blank lines skipped): a line
    starting with { or [ is JSON, {"messages": [...]}, a bare list of messages, or
    {"prompt"/"text": "..."}; any other line is one user message as it is."""
    if path.is_dir():
        raise DsvError(f"{option} {path}: a folder; give a prompts file (text lines or JSONL)")
    if not path.is_file():
        raise DsvError(f"{option} {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DsvError(f"{path}: not UTF-8 text ({e.reason})") from None
    out = [_messages(path, n, ln) if ln.lstrip().startswith(("{", "[")) else user(ln)
           for n, ln in enumerate(lines, 1) if ln.strip()]
    if not out:
        raise DsvError(f"{path}: no prompts (the file is empty); put one prompt per line or JSONL chat messages")
    return out


def _messages(path: Path, n: int, line: str) -> Messages:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise DsvError(f"{path}:{n}: starts like JSON but is not valid JSON ({e.msg})") from None
    if isinstance(item, dict) and "messages" in item:
        item = item["messages"]
    elif isinstance(item, dict) and isinstance(item.get("prompt", item.get("text")), str):
        return user(item.get("prompt", item.get("text")))
    if not isinstance(item, list) or not item or not all(
            isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in item):
        raise DsvError(f'{path}:{n}: expected {{"messages": [{{"role": ..., "content": ...}}]}} or {{"prompt": "..."}}')
    return item


def encode(tok, messages: Messages, raw: bool) -> list[int]:
    """Token ids: the chat template with the assistant's turn opened, or with `raw` BOS + the
    messages' texts as they are (one per line)."""
    if raw:
        return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode("\n".join(m["content"] for m in messages))
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def parse_prompt_ids(values: Iterable[str]) -> list[list[int]]:
    """`--prompt-ids 1,2,3` values, one prompt each."""
    out = []
    for v in values:
        try:
            ids = [int(x) for x in v.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise UsageError(f"--prompt-ids {v!r}: expected comma-separated integers like 1,2,3") from None
        if not ids:
            raise UsageError(f"--prompt-ids {v!r}: empty; give at least one token id")
        out.append(ids)
    return out
