"""load_model reads only this rank's slices, keeps FP8 as FP8, and names what is missing or wrong.

Reads are counted through a `Checkpoint` subclass that records the bytes of every tensor and
slice it hands out (the real lazy safetensors reads underneath).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from dsv3cli.checkpoint import Checkpoint
from dsv3cli.errors import DsvError
from dsv3cli.loading import SHARDING, load_model, shard_kind
from dsv3cli.parallel import Dist


class CountingCheckpoint(Checkpoint):
    """A Checkpoint that records how many bytes of each tensor were read."""

    def __init__(self, path):
        super().__init__(path)
        self.read: dict[str, int] = {}

    def _count(self, name: str, t: torch.Tensor) -> torch.Tensor:
        self.read[name] = self.read.get(name, 0) + t.numel() * t.element_size()
        return t

    def get(self, name):
        return self._count(name, super().get(name))

    def read_into(self, name, out, rows=None):
        super().read_into(name, out, rows)
        self._count(name, out)

    def get_slice(self, name):
        sl, outer = super().get_slice(name), self

        class Counted:
            def __getitem__(self, idx):
                return outer._count(name, sl[idx])

        return Counted()


def _total_bytes(ck: Checkpoint) -> int:
    return sum(ck.nbytes(n) for n in ck.names())


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_only_its_share(tiny_fp8, world):
    total = _total_bytes(Checkpoint(tiny_fp8))
    E = 16  # the tiny preset's routed experts
    seen_experts: list[set[int]] = []
    for rank in range(world):
        ck = CountingCheckpoint(tiny_fp8)
        model = load_model(ck, Dist(rank, world), dtype=torch.bfloat16)
        experts = {int(m.group(1)) for n in ck.read if (m := re.search(r"\.experts\.(\d+)\.", n))}
        per = E // world
        assert experts == set(range(rank * per, (rank + 1) * per)), f"rank {rank} read experts {sorted(experts)}"
        seen_experts.append(experts)
        # vocab-split tensors: exactly this rank's rows
        V, D = model.cfg.vocab_size, model.cfg.hidden_size
        assert ck.read["model.embed_tokens.weight"] == V // world * D * 2
        assert ck.read["lm_head.weight"] == V // world * D * 2
        # the whole read is one rank's share (replicated parts and FP8 block padding included)
        read = sum(ck.read.values())
        assert read <= total * (0.6 if world == 2 else 0.4), f"rank {rank}/{world} read {read / total:.0%}"
        held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        assert abs(held - read) <= 0.01 * read  # memory grows with what was read, not more
    assert set().union(*seen_experts) == set(range(E))


def test_fp8_weights_stay_fp8(tiny_fp8):
    ck = CountingCheckpoint(tiny_fp8)
    model = load_model(ck, Dist(), dtype=torch.bfloat16)
    attn = model.layers[1].self_attn
    assert attn.q_b_proj.weight.dtype == torch.float8_e4m3fn
    assert attn.q_b_proj.weight_scale_inv.dtype == torch.float32
    assert model.layers[1].mlp.experts[0].down_proj.weight.dtype == torch.float8_e4m3fn
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    # the loader checked every FP8 weight for NaN codes (it refuses them), so the kernels need not
    assert all(m.codes_checked for m in model.modules() if getattr(m, "is_fp8", False))
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert held <= 1.01 * _total_bytes(ck)  # no high-precision copy of the FP8 weights


@pytest.mark.parametrize("world", [1, 4])
def test_an_fp8_head_is_the_stored_head_quantized(tiny_fp8, world):
    """--lm-head fp8: each rank holds whole 128-row blocks of the head, quantized exactly as
    dsv3 quantize would, reading only its rows; the MTP module's own head too. (A vocabulary
    that does not split into whole blocks: test_parallel.)"""
    from dsv3cli.fp8 import quantize_weight

    ck = Checkpoint(tiny_fp8)
    for name, attr in (("lm_head.weight", "lm_head"), ("model.layers.3.shared_head.head.weight", "mtp")):
        q, s = quantize_weight(ck.get(name).float())
        V = q.shape[0]
        parts = []
        for rank in range(world):
            counting = CountingCheckpoint(tiny_fp8)
            model = load_model(counting, Dist(rank, world), dtype=torch.float32, head_fp8=True)
            head = model.lm_head if attr == "lm_head" else model.mtp.shared_head.head
            lo, hi = head.rows
            assert head.weight.dtype == torch.float8_e4m3fn and head.weight.shape[0] % 128 == 0 and lo % 128 == 0
            assert counting.read.get(name, 0) == (hi - lo) * ck.shape(name)[1] * 2  # only its rows
            assert torch.equal(head.weight.view(torch.uint8)[hi - lo :], torch.zeros_like(head.weight.view(torch.uint8)[hi - lo :]))
            parts.append((head.weight[: hi - lo], head.weight_scale_inv[: -(-(hi - lo) // 128)]))
        assert torch.equal(torch.cat([p[0] for p in parts]).view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(torch.cat([p[1] for p in parts]), s) and V == 512


def test_an_fp8_head_needs_half_the_memory(tiny_bf16):
    from dsv3cli import memory

    ck = Checkpoint(tiny_bf16)
    plain = memory.rank_needs(ck, Dist(), torch.bfloat16, 1, 64)
    fp8 = memory.rank_needs(ck, Dist(), torch.bfloat16, 1, 64, head_fp8=True)
    heads = ck.nbytes("lm_head.weight") + ck.nbytes("model.layers.3.shared_head.head.weight")
    assert plain.weights - fp8.weights == heads // 2
    assert ck.decode_bytes() - ck.decode_bytes(head_fp8=True) == ck.nbytes("lm_head.weight") // 2 - 4 * 2 * 4


def test_unaligned_fp8_split_keeps_covering_blocks(tiny_fp8):
    """q_b_proj has 192 rows: rank 1 of 2 owns rows 96..191, which sit in blocks 0 and 1."""
    from dsv3cli.ops import Runtime

    full = load_model(tiny_fp8, Dist(), dtype=torch.float32).layers[0].self_attn.q_b_proj
    part = load_model(tiny_fp8, Dist(1, 2), dtype=torch.float32).layers[0].self_attn.q_b_proj
    assert part.weight.shape[0] == 192 and part.row_off == 96 and part.out_features == 96
    ops = Runtime(dtype=torch.float32).ops(exact=False)
    assert torch.equal(ops.dense_weight(part, torch.float32).clone(), ops.dense_weight(full, torch.float32)[96:192])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensors_are_named(tiny_bf16, tmp_path):
    ckpt = _copy(tiny_bf16, tmp_path / "ck")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    gone = ["model.layers.1.mlp.experts.3.up_proj.weight", "model.norm.weight"]
    for n in gone:
        del index["weight_map"][n]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(DsvError) as e:
        load_model(ckpt, Dist(), dtype=torch.float32)
    for n in gone:
        assert n in str(e.value)


def test_shape_mismatch_is_named(tiny_bf16, tmp_path):
    ckpt = _copy(tiny_bf16, tmp_path / "ck")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["moe_intermediate_size"] += 8
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DsvError, match=r"mlp\..*_proj\.weight.*does not match the config"):
        load_model(ckpt, Dist(), dtype=torch.float32)


def test_sharding_table():
    assert shard_kind("model.embed_tokens.weight") == "vocab"
    assert shard_kind("model.layers.61.embed_tokens.weight") == "vocab"
    assert shard_kind("model.layers.61.shared_head.head.weight") == "vocab"
    assert shard_kind("model.layers.3.self_attn.q_b_proj.weight") == "col"
    assert shard_kind("model.layers.3.self_attn.o_proj.weight") == "row"
    assert shard_kind("model.layers.3.mlp.experts.17.down_proj.weight") == "expert"
    assert shard_kind("model.layers.3.mlp.shared_experts.down_proj.weight") == "row"
    assert shard_kind("model.layers.0.mlp.gate_proj.weight") == "col"
    for replicated in ("model.layers.3.mlp.gate.weight", "model.layers.3.self_attn.kv_a_proj_with_mqa.weight",
                       "model.layers.61.eh_proj.weight", "model.layers.3.mlp.gate.e_score_correction_bias"):
        assert shard_kind(replicated) == "replicated"
    assert SHARDING[-1][1] == "replicated"


def test_read_into_gives_the_stored_bytes_and_names_a_truncated_shard(tiny_fp8, tmp_path):
    """Whole tensors are read with plain reads into their parameters (not a memory map): the same
    bytes as safetensors gives, FP8 codes and scales included; a shard cut short is named."""
    ck = Checkpoint(tiny_fp8)
    for name in ck.names():
        ref = ck.get(name)
        out = torch.empty_like(ref)
        ck.read_into(name, out)
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8)), name
    cut = tmp_path / "cut"
    _copy(tiny_fp8, cut)
    shard = cut / ck.shards[-1]
    name = max(ck.tensors_in(ck.shards[-1]), key=lambda n: ck.info(n).end)  # the last tensor in the file
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 7)
    with pytest.raises(DsvError, match="truncated"):
        Checkpoint(cut).read_into(name, torch.empty_like(ck.get(name)))
