"""The FP8 block format: fast CPU paths against the float64 references, bit for bit, and the
references against hand-computed cases (so a wrong reference cannot pass either)."""

from __future__ import annotations

import pytest
import torch

from dsv3cli import fp8

SHAPES = [(128, 128), (256, 384), (576, 300), (200, 129), (1, 5), (130, 1)]
E4M3 = torch.float8_e4m3fn


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _random_weight(shape, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes: scales, subnormal codes and saturation all occur.
    mag = torch.exp2(torch.randint(-20, 12, (shape[0], 1), generator=g).float())
    return (torch.randn(shape, generator=g) * mag).to(dtype)


@pytest.mark.parametrize("fmt", ["e4m3", "ue8m0"])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_weight_bit_exact(shape, fmt):
    for seed, dtype in [(0, torch.bfloat16), (1, torch.float32), (2, torch.float16)]:
        w = _random_weight(shape, seed, dtype)
        q, s = fp8.quantize_weight(w, fmt)
        qr, sr = fp8.quantize_weight_ref(w, fmt)
        assert q.dtype == E4M3 and q.shape == w.shape
        assert s.dtype == torch.float32 and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
        assert torch.equal(_bits(q), _bits(qr))
        assert torch.equal(_bits(s), _bits(sr))


@pytest.mark.parametrize("fmt", ["e4m3", "ue8m0"])
def test_act_quant_bit_exact(fmt):
    for shape in [(3, 7, 256), (5, 200), (1, 1, 130)]:
        x = _random_weight((int(torch.tensor(shape[:-1]).prod()), shape[-1]), 3).view(shape)
        q, s = fp8.act_quant(x, fmt)
        qr, sr = fp8.act_quant_ref(x, fmt)
        assert s.shape == (*shape[:-1], -(-shape[-1] // 128))
        assert torch.equal(_bits(q), _bits(qr)) and torch.equal(_bits(s), _bits(sr))


def test_act_quant_large_parallel_path():
    x = _random_weight((4096, 640), 4)  # above the size where the thread pool kicks in
    q, s = fp8.act_quant(x)
    qr, sr = fp8.act_quant_ref(x)
    assert torch.equal(_bits(q), _bits(qr)) and torch.equal(s, sr)


def test_quantize_large_parallel_path_and_huge_scales():
    w = _random_weight((1100, 2100), 5)  # > 2M elements: the pooled path
    w[0:128, 0:128] *= 2.0**30  # s >= 2**7: dequantize takes its fallback
    q, s = fp8.quantize_weight(w)
    qr, sr = fp8.quantize_weight_ref(w)
    assert torch.equal(_bits(q), _bits(qr)) and torch.equal(s, sr)
    assert torch.equal(_bits(fp8.dequantize_weight(q, s)), _bits(fp8.dequantize_weight_ref(q, s)))


def test_zero_blocks_and_tiny_blocks_store_the_floor_scale():
    w = torch.zeros(256, 200)
    w[128:, 128:] = 3e-5  # amax below the 1e-4 floor
    for fmt, want in [("e4m3", torch.tensor(1e-4, dtype=torch.float32) / 448), ("ue8m0", torch.tensor(2.0**-22))]:
        q, s = fp8.quantize_weight(w, fmt)
        qr, sr = fp8.quantize_weight_ref(w, fmt)
        assert torch.equal(s, sr) and torch.equal(_bits(q), _bits(qr))
        assert torch.equal(s, torch.full((2, 2), want.item(), dtype=torch.float32))
        assert _bits(q)[:128].eq(0).all()  # zero block -> zero codes
        assert fp8.dequantize_weight(q, s, torch.float32)[:128].eq(0).all()


def test_rounding_ties_carries_and_saturation_by_hand():
    # One block with amax 448 -> s = 1 exactly, so w / s = w and the codes are checked by hand.
    vals = torch.tensor(
        [448.0, -448.0, 124.0, 127.9, 120.0, 17.0, 19.0, 0.5 * (2**-9), 1.5 * (2**-9), 2**-6 - 2**-10, 2**-12],
        dtype=torch.float32,
    )
    # 124 ties between 120 and 128
    # -> 128 (even mantissa); 17 ties 16/18 -> 16; 19 ties 18/20 -> 20; 2**-10 ties 0/2**-9 -> 0;
    # 1.5 * 2**-9 -> 2 * 2**-9; just under 2**-6 rounds up to 2**-6; 2**-12 -> 0.
    want = torch.tensor([448, -448, 128, 128, 120, 16, 20, 0, 2**-8, 2**-6, 0], dtype=torch.float32)
    w = torch.zeros(1, 128)
    w[0, : len(vals)] = vals
    for quant in (fp8.quantize_weight, fp8.quantize_weight_ref):
        q, s = quant(w)
        assert s.item() == 1.0
        assert torch.equal(q.float()[0, : len(vals)], want), quant.__name__


def test_saturation():
    # amax / 448 rounded down to float32 makes w / s a hair above 448 for the amax element:
    # it must saturate to 448, never become NaN (E4M3FN has no infinity).
    g = torch.Generator().manual_seed(12)
    w = torch.rand(64, 128, generator=g) * 0.9
    w[:, 0] = 1.0
    w = w * (torch.rand(64, 1, generator=g) + 0.5)  # 64 different amax values
    w = torch.cat([w, -w])
    for quant in (fp8.quantize_weight, fp8.quantize_weight_ref):
        for row in w.split(1):
            q, s = quant(row)
            assert not q.float().isnan().any() and q.float().abs().max().item() == 448.0
    over = sum(bool((row.abs().max() / fp8.quantize_weight_ref(row)[1]).item() > 448) for row in w.split(1))
    assert over > 0  # the case did occur


def test_scale_formula_by_hand():
    w = torch.zeros(128, 256)
    w[5, 3] = -3.0
    w[7, 200] = 1000.0
    q, s = fp8.quantize_weight_ref(w, "e4m3")
    assert s[0, 0].item() == (torch.tensor(3.0) / 448).item()
    assert s[0, 1].item() == (torch.tensor(1000.0) / 448).item()
    q, s = fp8.quantize_weight_ref(w, "ue8m0")
    assert s.tolist() == [[2.0**-7, 4.0]]  # 3/448 -> 2**-7.22 -> 2**-7; 1000/448 = 2.23 -> 4
    w[7, 200] = 448.0 * 4  # exactly a power of two: stays
    assert fp8.quantize_weight_ref(w, "ue8m0")[1][0, 1].item() == 4.0


def _random_codes(shape, seed, nan=False):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 256, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    if not nan:
        c[(c & 0x7F) == 0x7F] = 0x7E
    return c.view(E4M3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_exact(shape, dtype):
    q = _random_codes(shape, 7)  # every finite code, subnormals included
    g = torch.Generator().manual_seed(8)
    s = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128), generator=g) * 0.05 + 1e-6
    got = fp8.dequantize_weight(q, s, dtype)
    want = fp8.dequantize_weight_ref(q, s, dtype)
    assert got.dtype == dtype and torch.equal(_bits(got), _bits(want))
    # The definition matches the official code: float32 product, then the output dtype.
    s_full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    assert torch.equal(_bits(want), _bits((q.float() * s_full).to(dtype)))
    out = torch.empty(shape, dtype=dtype)
    assert fp8.dequantize_weight(q, s, dtype, out=out) is out and torch.equal(_bits(out), _bits(want))


def test_dequantize_nan_codes_and_large_parallel():
    q = _random_codes((1500, 1500), 9, nan=True)
    s = torch.rand(12, 12) * 0.01
    got, want = fp8.dequantize_weight(q, s), fp8.dequantize_weight_ref(q, s)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    q = _random_codes((1500, 1500), 10)
    assert torch.equal(_bits(fp8.dequantize_weight(q, s)), _bits(fp8.dequantize_weight_ref(q, s)))


def test_code_table_matches_torch_and_spec():
    table = fp8._code_values_ref()
    assert table[0x7E].item() == 448.0 and table[0x01].item() == 2.0**-9 and table[0x08].item() == 2.0**-6
    assert table[0x7F].isnan() and table[0xFF].isnan() and table[0x80].item() == 0.0
    mine = table.nan_to_num(123.0)
    theirs = torch.arange(256, dtype=torch.uint8).view(E4M3).double().nan_to_num(123.0)
    assert torch.equal(mine, theirs)


def test_round_trip_error_is_bounded():
    w = _random_weight((300, 260), 11, torch.float32)
    q, s = fp8.quantize_weight(w)
    back = fp8.dequantize_weight(q, s, torch.float32)
    s_full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :260]
    # Relative step of E4M3 is 2**-3: the error is at most half a step of the value (or of
    # the subnormal quantum 2**-9 * s).
    bound = torch.maximum(w.abs() * 2.0**-4, s_full * 2.0**-10) * 1.0001
    assert ((back - w).abs() <= bound).all()
