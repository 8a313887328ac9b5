"""dsv3 verify: a clean tiny checkpoint passes; each kind of damage gives exactly one problem line
naming the file or tensor, and exit code 1. Damaged checkpoints are real files: a copy of the
session's tiny checkpoint with one thing broken."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dsv3cli.app import app
from dsv3cli.checkpoint import Checkpoint, expected_shapes, is_fp8_weight, scale_name, validate
from dsv3cli.config import load_preset

runner = CliRunner()
S1, S2, S3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
INDEX = "model.safetensors.index.json"
QB = "model.layers.1.self_attn.q_b_proj.weight"


# ---- helpers that damage a copy ------------------------------------------------------------

def _index(d):
    return json.loads((d / INDEX).read_text())


def _set_index(d, idx):
    (d / INDEX).write_text(json.dumps(idx))


def _rewrite(d, shard, fn):
    t = load_file(d / shard)
    fn(t)
    save_file(t, d / shard, metadata={"format": "pt"})


def _shard_of(d, name):
    return _index(d)["weight_map"][name]


def _drop_from_shard(d, name):
    _rewrite(d, _shard_of(d, name), lambda t: t.pop(name))


def _drop_everywhere(d, name):
    _drop_from_shard(d, name)
    idx = _index(d)
    del idx["weight_map"][name]
    _set_index(d, idx)


def _drop_from_index(d, name):
    idx = _index(d)
    del idx["weight_map"][name]
    _set_index(d, idx)


def _replace(d, name, value):
    _rewrite(d, _shard_of(d, name), lambda t: t.__setitem__(name, value))


def _truncate(d, shard):
    p = d / shard
    p.write_bytes(p.read_bytes()[:-1000])


def _corrupt_header(d, shard):
    p = d / shard
    b = bytearray(p.read_bytes())
    b[8:12] = b"\x00\xff{]"
    p.write_bytes(bytes(b))


def _lfs_pointer(d, shard):
    (d / shard).write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 4302979384\n")


def _gap_in_offsets(d, shard):
    p = d / shard
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8:8 + n])
    name = next(k for k in h if k != "__metadata__" and h[k]["data_offsets"][0] == 0)
    h[name]["data_offsets"] = [8, h[name]["data_offsets"][1] + 8]
    hb = json.dumps(h).encode()
    hb += b" " * (-len(hb) % 8)
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:] + b"\0" * 8)


def _config(d, fn):
    c = json.loads((d / "config.json").read_text())
    fn(c)
    (d / "config.json").write_text(json.dumps(c))


def _nan(d, name):
    t = load_file(d / _shard_of(d, name))[name].clone()
    t.view(-1)[3] = float("nan")
    _replace(d, name, t)


# (fixture, damage, substring the one problem line must hold, extra verify args)
CASES = {
    "missing_from_shard": ("tiny_fp8", lambda d: _drop_from_shard(d, QB), f"{QB} is in {INDEX} but not in this shard", []),
    "not_in_index": ("tiny_bf16", lambda d: _drop_from_index(d, QB), f"{QB} is not in {INDEX}", []),
    "missing_shard": ("tiny_fp8", lambda d: (d / S2).unlink(), f"{S2}: missing", []),
    "truncated": ("tiny_fp8", lambda d: _truncate(d, S3), f"{S3}: truncated", []),
    "corrupt_header": ("tiny_fp8", lambda d: _corrupt_header(d, S1), f"{S1}: corrupt header", []),
    "gap_in_offsets": ("tiny_bf16", lambda d: _gap_in_offsets(d, S2), f"{S2}: corrupt header", []),
    "lfs_pointer": ("tiny_fp8", lambda d: _lfs_pointer(d, S2), "run git lfs pull or dsv3 download", []),
    "fp8_without_scale": ("tiny_fp8", lambda d: _drop_everywhere(d, scale_name(QB)), f"{QB} is F8_E4M3 but has no weight_scale_inv", []),
    "scale_wrong_shape": ("tiny_fp8", lambda d: _replace(d, scale_name(QB), torch.ones(3, 2)), "has shape [3, 2], expected [2, 1]", []),
    "scale_wrong_dtype": ("tiny_fp8", lambda d: _replace(d, scale_name(QB), torch.ones(2, 1, dtype=torch.bfloat16)), f"{scale_name(QB)} is BF16; FP8 scales are F32", []),
    "shape_vs_config": ("tiny_bf16", lambda d: _replace(d, QB, torch.zeros(4, 96, dtype=torch.bfloat16)), f"{QB} has shape [4, 96] but config.json implies [192, 96]", []),
    "missing_tensor": ("tiny_bf16", lambda d: _drop_everywhere(d, "model.norm.weight"), "model.norm.weight: missing", []),
    "fp8_tensors_without_config": ("tiny_fp8", lambda d: _config(d, lambda c: c.pop("quantization_config")), "no fp8 quantization_config", []),
    "fp8_config_without_tensors": ("tiny_bf16", lambda d: _config(d, lambda c: c.__setitem__("quantization_config", {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})), "quantization_config says fp8", []),
    "nan_values": ("tiny_bf16", lambda d: _nan(d, QB), f"{QB} has 1 NaN/Inf value", ["--check-values"]),
    "index_lfs_pointer": ("tiny_fp8", lambda d: _lfs_pointer(d, INDEX), f"{INDEX}: a Git LFS pointer file", []),
    "index_not_json": ("tiny_bf16", lambda d: (d / INDEX).write_text('{"weight_map": '), f"{INDEX}: not valid JSON", []),
    "config_missing": ("tiny_fp8", lambda d: (d / "config.json").unlink(), "no config.json here", []),
    "partial_mtp": ("tiny_bf16", lambda d: _drop_everywhere(d, "model.layers.3.hnorm.weight"), "model.layers.3.hnorm.weight: missing", []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_broken_checkpoint_gives_one_problem_line(case, request, tmp_path):
    fixture, damage, expect, args = CASES[case]
    d = tmp_path / "ck"
    shutil.copytree(request.getfixturevalue(fixture), d)
    damage(d)
    r = runner.invoke(app, ["verify", str(d), *args])
    assert r.exit_code == 1, r.output
    problems = [line for line in r.output.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1, r.output
    assert expect in problems[0], r.output
    assert "1 problem" in r.output and "Traceback" not in r.output


def test_fresh_tiny_validates_clean(tiny_bf16, tiny_fp8):
    for d in (tiny_bf16, tiny_fp8):
        r = runner.invoke(app, ["verify", str(d), "--check-values", "--json"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["ok"] and out["problems"] == [] and out["summary"]["mtp"] is True
        assert out["summary"]["values_checked"] is True
    s = validate(tiny_fp8).summary
    assert s["format"] == "fp8" and s["fp8_weights"] == sum(map(is_fp8_weight, expected_shapes(load_preset("tiny"))))


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_hf_save_pretrained_checkpoint_validates(tmp_path, q_lora_rank):
    """transformers' own save keeps per-expert names and drops the MTP layer: valid, MTP reported
    absent. An independent check of the name table (q_lora_rank None: plain q_proj)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=q_lora_rank, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=1,
    )
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    r = runner.invoke(app, ["verify", str(tmp_path / "hf"), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)["summary"]
    assert s["mtp"] is False and s["mtp_in_config"] is True and s["shards"] > 1
    ck = Checkpoint(tmp_path / "hf")
    assert not ck.has_mtp
    sd = model.state_dict()
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert ck.shape(name) == (64, 32)
    w = ck.get("model.layers.1.self_attn.kv_b_proj.weight")
    assert w.equal(sd["model.layers.1.self_attn.kv_b_proj.weight"])
    assert ck.has("model.layers.0.self_attn.q_proj.weight") == (q_lora_rank is None)
    assert set(ck.names()) == set(expected_shapes(ck.config, mtp=False))
