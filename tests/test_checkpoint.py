"""checkpoint.py: the name table, lazy reads through the index, errors, atomic writes.

Validation of broken checkpoints is tested through `dsv3 verify` in test_verify.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from dsv3cli.checkpoint import (
    Checkpoint, atomic_output, expected_shapes, save_shard, scale_name, validate, write_index,
)
from dsv3cli.config import load_preset
from dsv3cli.errors import DsvError

S1, S2, S3 = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))


def _truncate(d, shard):
    p = d / shard
    p.write_bytes(p.read_bytes()[:-1000])


def _lfs_pointer(d, shard):
    (d / shard).write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 4302979384\n")


def test_checkpoint_reads_lazily_through_the_index(tiny_fp8):
    ck = Checkpoint(tiny_fp8)
    assert ck.shards == [S1, S2, S3] and ck.config.hidden_size == 256
    n = "model.layers.2.mlp.experts.3.up_proj.weight"
    assert ck.has(n) and not ck.has("nope") and n in ck.tensors_in(ck.shard_of(n))
    full = ck.get(n)
    assert full.dtype == torch.float8_e4m3fn and tuple(full.shape) == ck.shape(n) == (160, 256)
    assert ck.dtype(n) == "F8_E4M3" and ck.dtype(scale_name(n)) == "F32"
    part = ck.get_slice(n)[:, 100:200]
    assert part.view(torch.uint8).equal(full[:, 100:200].view(torch.uint8))
    assert ck.get_slice(n)[10:20].shape == (10, 256)
    # Every tensor, read through the cached handles, equals a whole-shard load.
    for shard in ck.shards:
        ref = load_file(tiny_fp8 / shard)
        assert sorted(ref) == sorted(ck.tensors_in(shard))
        for k, v in ref.items():
            assert ck.get(k).view(torch.uint8).equal(v.view(torch.uint8)), k
    with pytest.raises(DsvError, match="no tensor nope"):
        ck.get("nope")


def test_checkpoint_errors_name_the_file(tiny_fp8, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(tiny_fp8, d)
    _truncate(d, S2)
    ck = Checkpoint(d)
    name = ck.tensors_in(S2)[0]
    with pytest.raises(DsvError, match=f"{S2}: truncated"):
        ck.get(name)
    _lfs_pointer(d, S1)
    with pytest.raises(DsvError, match="git lfs pull"):
        Checkpoint(d).shape(ck.tensors_in(S1)[0])
    with pytest.raises(DsvError, match="no model.safetensors.index.json or model.safetensors"):
        Checkpoint(tmp_path)


def test_single_file_checkpoint(tiny_bf16, tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    shutil.copy(tiny_bf16 / "config.json", d)
    tensors = {}
    for s in (S1, S2, S3):
        tensors.update(load_file(tiny_bf16 / s))
    save_shard(tensors, d / "model.safetensors")
    rep = validate(d)
    assert rep.ok, rep.problems
    assert rep.summary["shards"] == 1 and rep.summary["mtp"]
    ck = Checkpoint(d)
    assert set(ck.names()) == set(expected_shapes(ck.config)) and ck.shards == ["model.safetensors"]
    assert ck.get("lm_head.weight").equal(tensors["lm_head.weight"])


def test_expected_shapes_v3_numbers_and_q_proj():
    v3 = load_preset("deepseek-v3")
    s = expected_shapes(v3, fp8=True)
    assert s["model.layers.0.self_attn.q_b_proj.weight"] == (128 * 192, 1536)
    assert s["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (576, 7168)
    assert s["model.layers.0.mlp.down_proj.weight"] == (7168, 18432)
    assert s["model.layers.61.eh_proj.weight"] == (7168, 14336)
    assert s["model.layers.61.mlp.experts.255.up_proj.weight_scale_inv"] == (16, 56)
    assert s["model.layers.3.mlp.gate.e_score_correction_bias"] == (256,)
    assert "model.layers.62.enorm.weight" not in s and "model.layers.61.shared_head.head.weight" in s
    # 671B main + 14B MTP (11.5B unique + its embedding and head copies), as in the README of the weights.
    params = sum(torch.Size(v).numel() for k, v in expected_shapes(v3).items())
    assert 684e9 < params < 686e9
    lite = v3.replace(q_lora_rank=None)
    s = expected_shapes(lite, mtp=False)
    assert s["model.layers.0.self_attn.q_proj.weight"] == (128 * 192, 7168)
    assert not any("q_a_proj" in k or "layers.61" in k for k in s)


def test_atomic_output_and_index(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"done")
        assert not target.exists()
    assert target.read_bytes() == b"done" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    n = save_shard({"b": torch.ones(2, 3), "a": torch.zeros(4, dtype=torch.bfloat16)}, tmp_path / "s.safetensors")
    assert n == 2 * 3 * 4 + 4 * 2
    p = write_index(tmp_path, {"b": "s.safetensors", "a": "s.safetensors"}, n)
    idx = json.loads(p.read_text())
    assert idx == {"metadata": {"total_size": 32}, "weight_map": {"a": "s.safetensors", "b": "s.safetensors"}}
    assert list(idx["weight_map"]) == ["a", "b"]


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64", "F8_E4M3", "F8_E5M2"])
def test_nonfinite_bit_count_matches_torch(dtype):
    from dsv3cli.checkpoint import _count_nonfinite

    tdt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[dtype]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 29, generator=g) * 100
    x[torch.rand(37, 29, generator=g) < 0.05] = float("nan")
    x[torch.rand(37, 29, generator=g) < 0.05] = float("inf")
    x[torch.rand(37, 29, generator=g) < 0.05] = -float("inf")
    t = x.to(tdt)  # e4m3fn has no Inf: inf becomes NaN; overflow saturates nowhere here
    want = int((~torch.isfinite(t.float())).sum())
    assert want > 0 and _count_nonfinite(t, dtype) == want
    assert _count_nonfinite(torch.ones(5, dtype=tdt), dtype) == 0


def test_a_failed_write_names_the_file_and_leaves_nothing(tmp_path):
    """A full disk (ENOSPC carries no file name) while writing through atomic_output."""
    import errno

    from dsv3cli.checkpoint import atomic_output
    from dsv3cli.errors import DsvError

    target = tmp_path / "counts.json"
    with pytest.raises(DsvError, match="counts.json: could not write it"):
        with atomic_output(target) as tmp:
            tmp.write_text("{")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_decode_bytes_counts_what_one_token_reads(tiny_bf16, tiny_fp8):
    """The tiny preset: 3 layers (layer 0 dense), 16 experts, 4 per token, an MTP layer."""
    from dsv3cli.checkpoint import Checkpoint

    for path in (tiny_bf16, tiny_fp8):
        ck = Checkpoint(path)
        cfg = ck.config
        main = [n for n in ck.names() if not n.startswith(f"model.layers.{cfg.num_hidden_layers}.")]
        experts = sum(ck.nbytes(n) for n in main if ".mlp.experts." in n)
        others = sum(ck.nbytes(n) for n in main if ".mlp.experts." not in n) - ck.nbytes("model.embed_tokens.weight")
        assert ck.decode_bytes() == others + experts * 4 // 16
        assert 0 < experts * 4 // 16 < ck.decode_bytes()
