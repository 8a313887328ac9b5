"""dsv3 tiny: hub layout, determinism, FP8 placement, and the CLI."""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from dsv3cli.app import app
from dsv3cli.checkpoint import Checkpoint, expected_shapes, is_fp8_weight, scale_name, validate
from dsv3cli.errors import DsvError

runner = CliRunner()


def test_layout_matches_expected_shapes(tiny_bf16, tiny_fp8):
    for path, fp8 in ((tiny_bf16, False), (tiny_fp8, True)):
        ck = Checkpoint(path)
        exp = expected_shapes(ck.config)
        assert ck.config.is_fp8 == fp8
        assert set(ck.names()) == set(exp)
        for n, shp in exp.items():
            assert ck.shape(n) == shp, n
            if fp8 and is_fp8_weight(n):
                assert ck.dtype(n) == "F8_E4M3" and ck.dtype(scale_name(n)) == "F32"
            elif n.endswith("e_score_correction_bias") or n.endswith("_scale_inv"):
                assert ck.dtype(n) == "F32"
            else:
                assert ck.dtype(n) == "BF16", n
        assert ck.shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        assert ck.has_mtp
        names = {p.name for p in path.iterdir()}
        assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "model.safetensors.index.json"} <= names
        assert not [n for n in names if n.startswith(".")], "temporary files left behind"
        idx = json.loads((path / "model.safetensors.index.json").read_text())
        assert idx["metadata"]["total_size"] == sum(ck.nbytes(n) for n in ck.names())


def test_fp8_config_and_split_scale(tiny_fp8):
    ck = Checkpoint(tiny_fp8)
    q = json.loads((tiny_fp8 / "config.json").read_text())["quantization_config"]
    assert q == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    split = [n for n in ck.names() if is_fp8_weight(n) and ck.shard_of(n) != ck.shard_of(scale_name(n))]
    assert split, "no weight_scale_inv lives in a different shard than its weight"


def test_fp8_is_the_quantized_bf16(tiny_bf16, tiny_fp8):
    import torch

    b, f = Checkpoint(tiny_bf16), Checkpoint(tiny_fp8)
    n = "model.layers.3.mlp.experts.5.down_proj.weight"  # MTP layer, routed expert: [256, 160], ragged
    w = b.get(n).float()
    s = f.get(scale_name(n)).repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
    deq = f.get(n).float() * s
    # E4M3 has 3 mantissa bits: relative error at most 2**-4 of each value (plus tiny denormals).
    assert torch.all((deq - w).abs() <= w.abs() * 2**-4 + s * 2**-9)
    assert b.get("model.layers.3.embed_tokens.weight").equal(b.get("model.embed_tokens.weight"))
    assert b.get("model.layers.3.shared_head.head.weight").equal(b.get("lm_head.weight"))


def test_deterministic_bytes(tmp_path, tiny_fp8):
    from dsv3cli.tiny import make_tiny

    a = make_tiny(tmp_path / "a", seed=0, fp8=True, shards=3)
    b = make_tiny(tmp_path / "b", seed=7, fp8=True, shards=3)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in tiny_fp8.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (tiny_fp8 / name).read_bytes(), name
    for name in ("model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        assert (a / name).read_bytes() != (b / name).read_bytes()


def test_cli_tiny_json_and_refusals(tmp_path):
    r = runner.invoke(app, ["tiny", str(tmp_path / "t"), "--shards", "1", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["shards"] == 1 and s["format"] == "bf16" and s["mtp"] is True
    assert validate(tmp_path / "t").ok
    r = runner.invoke(app, ["tiny", str(tmp_path / "t")])
    assert r.exit_code == 1 and "--force" in r.output
    r = runner.invoke(app, ["tiny", str(tmp_path / "t"), "--force", "--shards", "2", "--fp8"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "t").glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert validate(tmp_path / "t").ok
    r = runner.invoke(app, ["tiny", str(tmp_path / "big"), "--preset", "deepseek-v3"])
    assert r.exit_code == 1 and "GB" in r.output and not (tmp_path / "big").exists()
    r = runner.invoke(app, ["tiny", str(tmp_path / "x"), "--preset", "nope"])
    assert r.exit_code == 1 and "unknown preset" in r.output


def test_transformers_loads_tiny_with_exactly_our_names(tiny_bf16):
    """transformers' DeepseekV3 (an independent name table) finds every main-model tensor and
    nothing else except the MTP layer, which it does not implement."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tiny_bf16, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"]
    assert info["unexpected_keys"] and all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])
    logits = model(torch.tensor([[0, 5, 9, 200, 300, 17]])).logits[0]  # [T, V]
    p = logits.softmax(-1)
    assert torch.isfinite(logits).all() and 0.5 < logits.std() < 10
    assert (p.max(-1).values < 0.9).all() and (p.max(-1).values > 2 / logits.shape[-1]).all()


def test_other_shapes_validate(tmp_path):
    """No q_lora (V2-Lite style), no MTP, softmax routing without the bias: still the hub's names."""
    from dsv3cli.config import load_preset
    from dsv3cli.tiny import make_tiny

    cfg = load_preset("tiny").replace(q_lora_rank=None, num_nextn_predict_layers=0, scoring_func="softmax",
                                     topk_method="greedy", n_group=1, topk_group=1)
    out = make_tiny(tmp_path / "v2", config=cfg, fp8=True, shards=2)
    rep = validate(out)
    assert rep.ok, rep.problems
    ck = Checkpoint(out)
    assert not ck.has_mtp and ck.has("model.layers.0.self_attn.q_proj.weight")
    assert not any(n.endswith("e_score_correction_bias") for n in ck.names())
    assert ck.config.q_lora_rank is None and ck.config.topk_method == "greedy"


def test_cut_preset_keeps_every_width():
    """--layers 2 --experts 32 of deepseek-v3: each layer's tensors are the full preset's, only
    the counts change; the routing values that must change are stated."""
    from dsv3cli.config import load_preset
    from dsv3cli.tiny import cut_config, tensor_bytes, tiny_config

    full = load_preset("deepseek-v3")
    cfg, notes = cut_config(full, layers=2, experts=32, mtp=False)
    assert (cfg.num_hidden_layers, cfg.n_routed_experts, cfg.first_k_dense_replace) == (2, 32, 1)
    assert (cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, cfg.num_nextn_predict_layers) == (8, 4, 8, 0)
    assert any("first_k_dense_replace 3 -> 1" in n for n in notes) and any("8 groups of 4" in n for n in notes)
    cut, ref = expected_shapes(cfg), expected_shapes(full)
    for name, shape in cut.items():
        ref_name = name.replace("experts.31.", "experts.255.").replace("layers.1.", "layers.3.")
        want = ref[ref_name]
        if name.endswith(("gate.weight", "e_score_correction_bias")):
            want = (32, *want[1:])  # the router has one row per kept expert
        assert shape == want, name
    # 1 dense + 1 MoE layer of V3's widths, BF16 embedding and head: the 5.9 GB FP8 cut of issue 16.
    size = sum(tensor_bytes(tiny_config(config=cfg, fp8=True), True).values())
    assert 5.8e9 < size < 6.0e9
    # Groups of one expert: every group must be eligible to pick 8 experts.
    cfg, notes = cut_config(full, experts=8)
    assert (cfg.n_routed_experts, cfg.topk_group, cfg.num_experts_per_tok) == (8, 8, 8)
    assert any("topk_group 4 -> 8" in n for n in notes)


def test_cli_cut_writes_a_valid_checkpoint(tmp_path):
    r = runner.invoke(app, ["tiny", str(tmp_path / "c"), "--layers", "2", "--experts", "4", "--json", "--fp8"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert any("topk_group 2 -> 4" in n for n in s["changes"])
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["topk_group"], cfg["hidden_size"]) == (2, 4, 4, 256)
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"]
    rep = validate(tmp_path / "c")
    assert rep.ok, rep.problems
    ck = Checkpoint(tmp_path / "c")
    assert ck.has("model.layers.2.mlp.experts.3.down_proj.weight") and not ck.has("model.layers.0.mlp.experts.0.up_proj.weight")
    r = runner.invoke(app, ["tiny", str(tmp_path / "n"), "--layers", "1", "--no-mtp", "--json"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "n" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["first_k_dense_replace"], cfg["num_nextn_predict_layers"]) == (1, 0, 0)
    assert not Checkpoint(tmp_path / "n").has_mtp


def test_cli_cut_refusals(tmp_path):
    for args, words in ((["--layers", "0"], "--layers 0: the preset has 61 layers"),
                        (["--layers", "62"], "--layers 62: the preset has 61 layers"),
                        (["--experts", "12"], "--experts 12: must be a multiple of the preset's n_group 8"),
                        (["--experts", "512"], "--experts 512: the preset has 256 routed experts")):
        r = runner.invoke(app, ["tiny", str(tmp_path / "v3"), "--preset", "deepseek-v3", *args])
        assert r.exit_code == 2 and words in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "v3").exists()
    # The disk preflight comes before any byte is written.
    from dsv3cli.config import load_preset
    from dsv3cli.tiny import cut_config, make_tiny

    cfg, _ = cut_config(load_preset("deepseek-v3"), layers=1, experts=8)
    with pytest.raises(DsvError, match="GB to write but 1.0 GB free"):
        make_tiny(tmp_path / "v3", config=cfg, cut=True, free_space=lambda folder: 10**9)
    assert not (tmp_path / "v3").exists()


def test_tokenizer_option_copies_and_checks_the_vocabulary(tmp_path, tiny_bf16):
    from dsv3cli.tokenizer import build_tokenizer_json, tokenizer_config

    r = runner.invoke(app, ["tiny", str(tmp_path / "t"), "--layers", "1", "--tokenizer", str(tiny_bf16)])
    assert r.exit_code == 0, r.output
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "t" / f).read_bytes() == (tiny_bf16 / f).read_bytes()
    big = tmp_path / "big"
    big.mkdir()
    (big / "tokenizer.json").write_text(build_tokenizer_json(1024))
    (big / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(4096)))
    r = runner.invoke(app, ["tiny", str(tmp_path / "u"), "--layers", "1", "--tokenizer", str(big)])
    assert r.exit_code == 1 and "do not fit the model's vocab_size 512" in r.output, r.output
    r = runner.invoke(app, ["tiny", str(tmp_path / "u"), "--layers", "1", "--tokenizer", str(tmp_path)])
    assert r.exit_code == 1 and "no tokenizer.json there" in r.output


def test_configs_have_one_kv_head_per_head(tiny_bf16):
    from pathlib import Path

    mini = Path(__file__).parent.parent / "checkpoints" / "dsv3-mini"
    for folder in (tiny_bf16, mini):
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["num_key_value_heads"] == cfg["num_attention_heads"], folder
