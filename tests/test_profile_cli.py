"""`dsv3 profile-experts` end to end: counts against transformers' DeepseekV3 router on the same
checkpoint and tokens, the output files, prompt files, --generate, --nproc 2 (real gloo ranks),
and bad input (one line, exit 1 or 2)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dsv3cli.app import app
from dsv3cli.config import load_preset

runner = CliRunner()
PROMPTS = [[5, 17, 300, 2, 9, 44, 101, 7, 7, 250, 3], [400, 1], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26],
           [511, 0, 33, 64, 128], [77] * 9]


def _ids_args(prompts):
    out = []
    for p in prompts:
        out += ["--prompt-ids", ",".join(map(str, p))]
    return out


@pytest.fixture(scope="session")
def hf_ckpt(tmp_path_factory):
    """A tiny DeepseekV3ForCausalLM from transformers with random weights and a non-zero
    correction bias, saved by transformers; returns (folder, model)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = load_preset("tiny").to_dict()
    d.pop("quantization_config", None)
    d = {k: v for k, v in d.items() if k not in ("architectures", "transformers_version", "torch_dtype")}
    cfg = DeepseekV3Config(**d, rope_interleave=True)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)  # large enough against sigmoid gaps to change choices
    out = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(out)
    return out, model


def _hf_counts(model, prompts, E):
    """Per MoE layer, bincounts of the top-k indices transformers' router picks (hooked), and of
    the ones the same router would pick on the same inputs with the correction bias zeroed."""
    caps: dict[int, list] = {}
    hooks = []
    for li, layer in enumerate(model.model.layers):
        if not hasattr(layer.mlp, "gate"):
            continue
        nobias = copy.deepcopy(layer.mlp.gate)
        nobias.e_score_correction_bias.zero_()

        def hook(m, inp, out, li=li, nobias=nobias):
            caps.setdefault(li, []).append((out[2], nobias(inp[0])[2]))

        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for p in prompts:  # one at a time: no padding on the reference side
                model(torch.tensor([p]))
    finally:
        for h in hooks:
            h.remove()

    def count(j):
        return {li: torch.bincount(torch.cat([c[j] for c in v]).flatten(), minlength=E).tolist() for li, v in sorted(caps.items())}

    return count(0), count(1)


def _json(args):
    # float32: the CPU's bfloat16 matmuls are slow, and the counts do not depend on it here
    r = runner.invoke(app, ["profile-experts", *args, "--json", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_counts_equal_transformers_router(hf_ckpt):
    folder, model = hf_ckpt
    cfg = load_preset("tiny")
    # batch 3 with ragged lengths: padding must not be counted
    doc = _json([str(folder), *_ids_args(PROMPTS), "--batch-size", "3", "--compare-bias", "--device", "cpu"])
    ref, ref_nb = _hf_counts(model, PROMPTS, cfg.n_routed_experts)
    assert doc["moe_layers"] == list(ref) == [1, 2]
    assert doc["counts"] == [ref[li] for li in doc["moe_layers"]]
    n = sum(len(p) for p in PROMPTS)
    assert doc["tokens"] == n
    for row in doc["counts"]:
        assert sum(row) == n * cfg.num_experts_per_tok
    # without the bias: the same router, bias zeroed, on the same inputs
    assert doc["counts_nobias"] == [ref_nb[li] for li in doc["moe_layers"]]
    assert doc["counts_nobias"] != doc["counts"]  # the bias really changes choices here
    m = doc["metrics"]
    assert {"maxvio", "cv", "entropy", "balancedness", "hottest", "coldest", "group_spread"} <= set(m["layers"][0])
    assert m["layers"][0]["group_spread"]["max"] <= cfg.topk_group
    assert "nobias" in m["overall"]


def test_out_files_and_plan(hf_ckpt, tmp_path):
    folder, _ = hf_ckpt
    out = tmp_path / "prof"
    doc = _json([str(folder), *_ids_args(PROMPTS), "--out", str(out), "--gpus", "4", "--nodes", "2", "--redundant", "4"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["counts.csv", "counts.json", "heatmap.png", "plan.json"]
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "counts.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["layer", "e0", "e1"] and len(rows) == 3
    assert [int(x) for x in rows[1].split(",")[1:]] == doc["counts"][0]
    assert json.loads((out / "counts.json").read_text())["counts"] == doc["counts"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "hierarchical" and plan["physical_experts_per_gpu"] == 5
    for layer, counts in zip(doc["moe_layers"], doc["counts"]):
        entry = plan["layers"][str(layer)]
        assert len(entry["physical_to_logical"]) == 20 and sorted(set(entry["physical_to_logical"])) == list(range(16))
        assert entry["balancedness_after"] >= entry["balancedness_before"]


def test_prompt_file_chat_raw_generate(tiny_bf16, tmp_path):
    from dsv3cli.tokenizer import load_tokenizer

    f = tmp_path / "p.jsonl"
    f.write_text('hello experts\n\n{"messages": [{"role": "user", "content": "route me"}]}\n')
    tok = load_tokenizer(tiny_bf16)
    chat = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}])) for c in ("hello experts", "route me")]
    doc = _json([str(tiny_bf16), "--prompts", str(f)])
    assert doc["tokens"] == sum(map(len, chat)) and doc["prompts"] == 2
    r = runner.invoke(app, ["profile-experts", str(tiny_bf16), "--prompts", str(f), "--raw", "--compare-bias", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    n_raw = sum(len(tok.encode(t)) + (tok.bos_id is not None) for t in ("hello experts", "route me"))
    assert f"{n_raw} tokens, 2 prompts" in r.stdout
    assert "MaxVio" in r.stdout and "balancedness" in r.stdout and "no bias" in r.stdout
    gen = _json([str(tiny_bf16), "--prompts", str(f), "--generate", "3"])
    assert gen["tokens"] == doc["tokens"] + 2 * 3 and gen["generated_tokens"] == 6
    k = gen["num_experts_per_tok"]
    assert all(sum(r) == gen["tokens"] * k for r in gen["counts"])


def test_nproc_2_sums_ranks(tiny_bf16):
    args = [str(tiny_bf16), *_ids_args(PROMPTS[:3])]
    one = _json(args)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-m", "dsv3cli.app", "profile-experts", *args, "--dtype", "float32", "--json", "--nproc", "2"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), r.stderr
    two = json.loads(r.stdout)
    assert two["world_size"] == 2
    assert two["counts"] == one["counts"]
    assert two["metrics"]["overall"]["group_spread"] == one["metrics"]["overall"]["group_spread"]


# ---------------------------------------------------------------- bad input


def _fails(args, code, *needles):
    r = runner.invoke(app, ["profile-experts", *args])
    assert r.exit_code == code, r.output
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("Error:"), r.stderr
    for n in needles:
        assert n in err[0], err[0]
    assert "Traceback" not in r.output


def test_bad_inputs(hf_ckpt, tmp_path):
    folder, _ = hf_ckpt
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails([str(folder), "--prompts", str(empty)], 1, "empty")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    _fails([str(folder), "--prompts", str(blank)], 1, "no prompts")
    _fails([str(folder), "--prompt-ids", "1,2,512"], 2, "512", "vocabulary")  # as in generate: an option value
    _fails([str(folder), "--prompt-ids", "1,-3"], 2, "-3", "vocabulary")
    _fails([str(folder), "--prompt-ids", "1,x"], 2, "--prompt-ids")
    _fails([str(folder)], 2, "--prompts")
    _fails([str(folder), "--prompt-ids", "1", "--gpus", "6"], 2, "(n_routed_experts + --redundant) % --gpus != 0")
    _fails([str(folder), "--prompt-ids", "1", "--gpus", "4", "--redundant", "3"], 2, "(16 + 3) % 4")
    _fails([str(folder), "--prompt-ids", "1", "--gpus", "4", "--nodes", "3"], 2, "--gpus 4 % --nodes 3 != 0")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _fails([str(folder), "--prompt-ids", "1", "--out", str(blocker / "sub")], 1, "--out", "not writable")
    _fails([str(tmp_path / "nope"), "--prompt-ids", "1"], 1)


def test_dense_only_checkpoint(hf_ckpt, tmp_path):
    folder, _ = hf_ckpt
    dense = tmp_path / "dense"
    dense.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["first_k_dense_replace"] = cfg["num_hidden_layers"]
    (dense / "config.json").write_text(json.dumps(cfg))
    (dense / "model.safetensors").symlink_to(folder / "model.safetensors")
    _fails([str(dense), "--prompt-ids", "1,2"], 1, "no MoE layers")


def test_missing_matplotlib_is_one_line(hf_ckpt, tmp_path, monkeypatch):
    folder, _ = hf_ckpt
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    _fails([str(folder), "--prompt-ids", "1,2", "--out", str(tmp_path / "o")], 1, "dsv3[plot]")
    r = runner.invoke(app, ["profile-experts", str(folder), "--prompt-ids", "1,2", "--out", str(tmp_path / "o"), "--no-heatmap"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["counts.csv", "counts.json", "plan.json"]
