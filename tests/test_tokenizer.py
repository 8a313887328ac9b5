"""tokenizer.py: the tiny byte-level BPE, the chat template, and loading hub tokenizer files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from dsv3cli.errors import DsvError
from dsv3cli.tokenizer import ASSISTANT, BOS, EOS, PAD, USER, build_tokenizer_json, load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_bf16):
    return load_tokenizer(tiny_bf16)


def test_special_tokens_and_sizes(tok):
    assert tok.vocab_size == 512
    assert tok.bos_id == 0 and tok.eos_ids == [1]
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD, USER, ASSISTANT)] == [0, 1, 2, 3, 4]
    assert BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>" and USER == "<\uff5cUser\uff5c>"


@pytest.mark.parametrize("text", [
    "Hello world", "", "  leading and trailing spaces  ", "line one\nline two\r\n\ttabbed",
    "Unicode: café, 東京, emoji 🙂, Ünïcödé", "numbers 3.14159 and symbols {}[]<>|~`", "x" * 300,
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert 0 not in ids  # no BOS added by encode


def test_merges_compress_common_text(tok):
    text = "The model routes every token to a few experts."
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_special_tokens_in_text_are_single_ids(tok):
    ids = tok.encode(f"{USER}hi{ASSISTANT}")
    assert ids[0] == 3 and ids[-1] == 4
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_chat_template(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert tok.apply_chat_template(msgs) == (
        f"{BOS}Be brief.{USER}What is 2+2?{ASSISTANT}4{EOS}{USER}And 3+3?{ASSISTANT}")
    assert tok.apply_chat_template(msgs[1:2], add_generation_prompt=False) == f"{BOS}{USER}What is 2+2?"
    ids = tok.encode(tok.apply_chat_template(msgs[1:2]))
    assert ids[0] == tok.bos_id and ids[1] == 3 and ids[-1] == 4
    with pytest.raises(DsvError, match="unknown chat role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(DsvError, match="needs a role and a content"):
        tok.apply_chat_template([{"content": "x"}])


def test_transformers_reads_the_same_files(tiny_bf16, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_bf16)
    text = "Balancing the load matters: café 42."
    assert hf(text, add_special_tokens=False).input_ids == tok.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(msgs)


def test_string_or_dict_special_tokens_and_generation_eos(tiny_bf16, tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    shutil.copy(tiny_bf16 / "tokenizer.json", d)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": {"content": EOS}}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    t = load_tokenizer(d)
    assert t.bos_id == 0 and t.eos_ids == [1, 4]
    with pytest.raises(DsvError, match="no chat_template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(DsvError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(DsvError, match="tokenizer.json: cannot load"):
        load_tokenizer(d)


def test_training_is_deterministic_across_processes():
    code = "from dsv3cli.tokenizer import build_tokenizer_json as b; print(b(512))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other == build_tokenizer_json(512) + "\n"


def test_tiny_tokenizer_splits_as_deepseek_v3():
    """DeepSeek-V3's split rules: digits in runs of at most 3, CJK runs apart from Latin letters,
    a space joins the punctuation after it, then byte-level mapping."""
    from tokenizers import Tokenizer as HFTokenizer

    pre = HFTokenizer.from_str(build_tokenizer_json(512)).pre_tokenizer
    pieces = [p for p, _ in pre.pre_tokenize_str("x=12345 我想在apple工作 'RE")]
    assert pieces == ["x", "=", "123", "45", "Ġ", "æĪĳæĥ³åľ¨", "apple", "å·¥ä½ľ", "Ġ'", "RE"]
