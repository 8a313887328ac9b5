"""`dsv3 generate` end to end: prompts as ids, text, text files and chat JSONL; --json; streamed
text equal to the JSON text; and every kind of bad input (one line, exit 1 or 2), a dying rank
included."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dsv3cli.app import app
from dsv3cli.tokenizer import load_tokenizer

import sweep_bad_input as sweep  # tests/ is on sys.path under pytest

runner = CliRunner()
FAST = ["--dtype", "float32", "--max-new-tokens", "6", "--max-seq-len", "64"]


def gen(*args: str):
    return runner.invoke(app, ["generate", *map(str, args)])


def one_error_line(r, code: int, *words: str) -> str:
    assert r.exit_code == code, (r.exit_code, r.output)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("Error:"), r.stderr
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def test_prompt_ids_json_document(tiny_bf16):
    r = gen(tiny_bf16, "--prompt-ids", "0,5,6,7", "--prompt-ids", "3, 4", "--json", "--mtp", "2", *FAST)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"outputs", "stats"}
    assert [o["prompt_ids"] for o in doc["outputs"]] == [[0, 5, 6, 7], [3, 4]]
    for o in doc["outputs"]:
        assert set(o) == {"prompt_ids", "generated_ids", "text"}
        assert 1 <= len(o["generated_ids"]) <= 6 and all(isinstance(t, int) for t in o["generated_ids"])
        assert isinstance(o["text"], str)
    s = doc["stats"]
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s", "peak_rss_mb", "drafted",
                "accepted", "acceptance_per_position", "tokens_per_forward", "main_forwards", "load_s"):
        assert key in s
    assert s["mtp"] == 2 and len(s["acceptance_per_position"]) == 2
    line = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(line) == 1 and "decode" in line[0] and "MTP 2" in line[0]
    # the same ids without MTP (and on one thread): identical greedy tokens
    r0 = gen(tiny_bf16, "--prompt-ids", "0,5,6,7", "--prompt-ids", "3,4", "--json", "--mtp", "0", "--threads", "1", *FAST)
    assert [o["generated_ids"] for o in json.loads(r0.stdout)["outputs"]] == [o["generated_ids"] for o in doc["outputs"]]


def test_text_prompt_streams_the_json_text(tiny_bf16):
    tok = load_tokenizer(tiny_bf16)
    r = gen(tiny_bf16, "--prompt", "Hello there", "--json", *FAST)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)["outputs"][0]
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hello there"}]))
    assert out["prompt_ids"] == chat and out["prompt_ids"][0] == tok.bos_id
    assert out["text"] == tok.decode([t for t in out["generated_ids"] if t not in tok.eos_ids])
    streamed = gen(tiny_bf16, "--prompt", "Hello there", *FAST)
    assert streamed.exit_code == 0 and streamed.stdout == out["text"] + "\n"
    raw = gen(tiny_bf16, "--prompt", "Hello there", "--raw", "--json", *FAST)
    assert json.loads(raw.stdout)["outputs"][0]["prompt_ids"] == [tok.bos_id] + tok.encode("Hello there")


def test_prompt_files_text_and_jsonl(tiny_bf16, tmp_path):
    tok = load_tokenizer(tiny_bf16)
    txt = tmp_path / "prompts.txt"
    txt.write_text("The harbour\n\nA cat walked\n", encoding="utf-8")
    r = gen(tiny_bf16, "--prompts", txt, "--json", "--batch-size", "2", *FAST)
    assert r.exit_code == 0, r.output
    got = [o["prompt_ids"] for o in json.loads(r.stdout)["outputs"]]
    assert got == [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])) for t in ("The harbour", "A cat walked")]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    jl = tmp_path / "chat.jsonl"
    jl.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"prompt": "Weather report"}) + "\n")
    r = gen(tiny_bf16, "--prompts", jl, "--json", *FAST)
    assert r.exit_code == 0, r.output
    got = [o["prompt_ids"] for o in json.loads(r.stdout)["outputs"]]
    assert got == [tok.encode(tok.apply_chat_template(messages)),
                   tok.encode(tok.apply_chat_template([{"role": "user", "content": "Weather report"}]))]
    # batch of 3 prompts, printed in order without --json: three blocks
    r = gen(tiny_bf16, "--file", txt, "--prompt-ids", "1,2", "--batch-size", "3", *FAST)
    assert r.exit_code == 0, r.output
    assert r.stdout.count("\n\n") == 3


def _without(src: Path, dst: Path, drop_file: str | None = None, drop_tensor: str | None = None) -> Path:
    """A copy of a checkpoint without one file or one tensor (removed from its shard and the index)."""
    shutil.copytree(src, dst)
    if drop_file:
        (dst / drop_file).unlink()
    if drop_tensor:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        shard = dst / index["weight_map"].pop(drop_tensor)
        ts = load_file(shard)
        del ts[drop_tensor]
        save_file(ts, shard, metadata={"format": "pt"})
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_bad_input_one_line(tiny_bf16, tmp_path):
    one_error_line(gen(tiny_bf16, "--prompt-ids", "1,2,3,4", "--max-seq-len", "4"), 2, "--max-seq-len", "prompt 1")
    one_error_line(gen(tiny_bf16, "--prompt-ids", "0,512"), 2, "512", "vocabulary")
    one_error_line(gen(tiny_bf16, "--prompt-ids", "1,x"), 2, "--prompt-ids")
    one_error_line(gen(tiny_bf16, "--prompt-ids", "1", "--nproc", "3"), 1, "world size 3")
    no_mtp = tmp_path / "no_mtp"  # transformers' save drops the MTP layer; here: config says 0 layers
    shutil.copytree(tiny_bf16, no_mtp)
    cfg = json.loads((no_mtp / "config.json").read_text())
    (no_mtp / "config.json").write_text(json.dumps(dict(cfg, num_nextn_predict_layers=0)))
    one_error_line(gen(no_mtp, "--prompt-ids", "1,2", "--mtp", "1", *FAST), 2, "no MTP layer")
    r = gen(no_mtp, "--prompt-ids", "1,2", "--json", *FAST)  # the default --mtp is 0 here
    assert r.exit_code == 0 and json.loads(r.stdout)["stats"]["mtp"] == 0
    one_error_line(gen(tiny_bf16, "--prompt-ids", "1", "--top-p", "0"), 2, "--top-p")
    assert gen(tiny_bf16, "--prompt-ids", "1", "--threads", "0").exit_code == 2  # click's range check
    one_error_line(gen(tiny_bf16), 2, "no prompt")  # stdin is not a terminal here
    one_error_line(gen(tmp_path / "nowhere", "--prompt-ids", "1"), 1, "nowhere")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"oops": 1}\n')
    one_error_line(gen(tiny_bf16, "--prompts", bad), 1, "bad.jsonl:2")
    if not torch.cuda.is_available():
        one_error_line(gen(tiny_bf16, "--prompt-ids", "1", "--device", "cuda"), 1, "CUDA")

    no_tok = _without(tiny_bf16, tmp_path / "no_tok", drop_file="tokenizer.json")
    one_error_line(gen(no_tok, "--prompt", "hello"), 1, "tokenizer.json", "--prompt-ids")
    r = gen(no_tok, "--prompt-ids", "1,2,3", *FAST)  # ids need no tokenizer: ids are printed
    assert r.exit_code == 0 and all(t.isdigit() for t in r.stdout.split()), r.output

    name = "model.layers.1.mlp.gate.weight"
    missing = _without(tiny_bf16, tmp_path / "missing", drop_tensor=name)
    one_error_line(gen(missing, "--prompt-ids", "1,2", *FAST), 1, name)


def _signal_a_rank(ckpt, rank: int, sig: int, timeout_s: int = 600) -> subprocess.CompletedProcess:
    """generate --nproc 2 on 200 prompts; `sig` goes to the real process of `rank` once rank 0 printed."""
    ids = [a for _ in range(200) for a in ("--prompt-ids", "1,2,3")]
    return sweep.signal_rank(["generate", str(ckpt), *ids, "--batch-size", "1", "--nproc", "2", "--mtp", "0", *FAST],
                             rank, sig, timeout_s)


@pytest.mark.parametrize("rank,sig,name", [(1, signal.SIGKILL, "SIGKILL"), (0, signal.SIGKILL, "SIGKILL"),
                                           (0, signal.SIGTERM, "SIGTERM")])
def test_a_killed_rank_is_named_and_the_others_stopped(tiny_bf16, rank, sig, name):
    r = _signal_a_rank(tiny_bf16, rank, sig)
    assert r.returncode == 1, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert err == [f"Error: rank {rank} of 2 was killed by {name}; stopped the other ranks"], r.stderr


def test_a_stalled_rank_is_found_by_the_collective_timeout(tiny_bf16):
    """SIGSTOP: alive, no progress. Rank 0's next collective times out after 5 s; rank 1 is named."""
    r = _signal_a_rank(tiny_bf16, 1, signal.SIGSTOP, timeout_s=5)
    assert r.returncode == 1, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("Error: rank 1 of 2 made no progress"), r.stderr
    assert "DSV3_COLLECTIVE_TIMEOUT_S" in err[0]


def test_the_same_bad_input_on_every_rank_is_one_line(tiny_bf16, tmp_path):
    no_mtp = tmp_path / "no_mtp"
    shutil.copytree(tiny_bf16, no_mtp)
    cfg = json.loads((no_mtp / "config.json").read_text())
    (no_mtp / "config.json").write_text(json.dumps(dict(cfg, num_nextn_predict_layers=0)))
    r = subprocess.run([sys.executable, "-m", "dsv3cli.app", "generate", str(no_mtp), "--prompt-ids", "1,2", "--mtp", "1",
                        "--nproc", "2", *FAST], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       timeout=120)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1 and "no MTP layer" in err[0], r.stderr


def test_interactive_chat_in_a_terminal(tiny_bf16):
    """No prompt and a terminal on stdin: a chat; /clear forgets the history, /exit quits."""
    import pty

    master, slave = pty.openpty()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "dsv3cli.app", "generate", str(tiny_bf16), "--verbose", *FAST],
                         stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    for line in ("Hello\n", "Again\n", "/clear\n", "Again\n", "/exit\n"):
        os.write(master, line.encode())
    out, err = p.communicate(timeout=120)
    os.close(master)
    assert p.returncode == 0, err.decode()
    lines = [ln for ln in err.decode().splitlines() if "prompt +" in ln]
    # turn 2 carries turn 1 (user + assistant) in its prompt; after /clear the same text is short again
    n = [int(ln.split(" prompt")[0].split()[-1]) for ln in lines]
    assert len(n) == 3 and n[1] > n[0] + 2 and n[2] < n[1]
    assert out.decode().count("> ") >= 4


def test_under_torchrun_each_rank_runs_the_command(tiny_bf16):
    """torchrun sets WORLD_SIZE: `dsv3 generate` joins its group instead of launching; rank 0 prints."""
    from dsv3cli.launch import free_port

    ids = ["--prompt-ids", "5,6,7,8,9", "--prompt-ids", "10,11"]
    r1 = gen(tiny_bf16, *ids, "--json", "--mtp", "0", *FAST)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                         "-m", "dsv3cli.app", "generate", str(tiny_bf16), *ids, "--json", "--mtp", "2", *FAST],
                        capture_output=True, text=True, env=env, timeout=120)
    assert r2.returncode == 0, r2.stderr
    doc = json.loads(r2.stdout)  # one document: only rank 0 printed
    rss = doc["stats"]["peak_rss_mb_per_rank"]  # each rank's, and their sum
    assert len(rss) == 2 and all(m > 50 for m in rss) and doc["stats"]["peak_rss_mb"] == round(sum(rss), 1)
    assert [o["generated_ids"] for o in doc["outputs"]] == [o["generated_ids"] for o in json.loads(r1.stdout)["outputs"]]


def _with_tensor(src: Path, dst: Path, name: str, change) -> Path:
    """A copy of a checkpoint whose tensor `name` went through `change` (in its own shard)."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"][name]
    ts = load_file(shard)
    ts[name] = change(ts[name].clone())
    save_file(ts, shard, metadata={"format": "pt"})
    return dst


def test_non_finite_logits_stop_generation_naming_the_step(tiny_bf16, tmp_path):
    def nan(t):
        t[0] = float("nan")
        return t

    ckpt = _with_tensor(tiny_bf16, tmp_path / "nan", "model.layers.1.post_attention_layernorm.weight", nan)
    one_error_line(gen(ckpt, "--prompt-ids", "1,2", "--mtp", "0", *FAST), 1, "generation step 1", "prompt 1", "NaN",
                   "first in the output of layer 1")
    ckpt = _with_tensor(tiny_bf16, tmp_path / "nan_head", "model.norm.weight", nan)
    one_error_line(gen(ckpt, "--prompt-ids", "1,2", *FAST), 1, "generation step 1", "the final norm")


def test_an_fp8_nan_code_is_named_by_tensor_while_loading(tiny_fp8, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"

    def nan_code(t):
        t.view(torch.uint8)[0, 3] = 0x7F
        return t

    ckpt = _with_tensor(tiny_fp8, tmp_path / "nan_fp8", name, nan_code)
    one_error_line(gen(ckpt, "--prompt-ids", "1,2", *FAST), 1, name, "0x7F")


def test_a_config_of_fewer_layers_than_the_tensors_is_refused(tiny_bf16, tmp_path):
    ckpt = tmp_path / "short"
    shutil.copytree(tiny_bf16, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=cfg["num_hidden_layers"] - 1)))
    one_error_line(gen(ckpt, "--prompt-ids", "1,2", *FAST), 1, "num_hidden_layers", f"model.layers.{cfg['num_hidden_layers'] - 1}")


def test_positions_past_max_position_embeddings_are_warned(tiny_bf16, tmp_path):
    ckpt = tmp_path / "short_context"
    shutil.copytree(tiny_bf16, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, max_position_embeddings=8)))
    r = gen(ckpt, "--prompt-ids", "1,2", "--dtype", "float32", "-n", "2", "--max-seq-len", "16")
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "--max-seq-len 16" in warn[0] and "max_position_embeddings 8" in warn[0], r.stderr
    assert not [ln for ln in gen(tiny_bf16, "--prompt-ids", "1,2", *FAST).stderr.splitlines() if "warning" in ln]
    r = runner.invoke(app, ["profile-experts", str(ckpt), "--prompt-ids", "1,2,3", "--generate", "6", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "--generate 6" in warn[0] and "max_position_embeddings 8" in warn[0], r.stderr


def test_lm_head_fp8_runs_and_names_a_damaged_head(tiny_fp8, tmp_path):
    ids = ["--prompt-ids", "0,5,6,7", "--json", *FAST]
    r = gen(tiny_fp8, *ids, "--lm-head", "fp8", "--mtp", "1")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["outputs"][0]["generated_ids"]) == 6
    r = gen(tiny_fp8, *ids, "--lm-head", "int4")
    assert r.exit_code == 2 and "--lm-head" in r.stderr, r.output

    def inf_row(t):
        t[300] = float("inf")
        return t

    ckpt = _with_tensor(tiny_fp8, tmp_path / "inf_head", "lm_head.weight", inf_row)
    one_error_line(gen(ckpt, *ids, "--lm-head", "fp8"), 1, "lm_head.weight", "rows 0..512")
