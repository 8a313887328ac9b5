"""FP8 products straight from the E4M3 codes (cpu_gemm.c's dsv3_fp8_gemm, cpu_ops.c's
dsv3_moe_fp8) on every kernel variant this CPU runs: against float64 products with the exact
dequantized weights, on fresh random inputs (the seed is in every failure message) at ragged
shapes; every code (subnormals, NaN) converted exactly; rows independent of the rows computed with
them (the few-row path that converts codes in registers and the many-row path through a cached
buffer give the same bits); a prefill's packed product (more than PACK_ROWS rows) against float64
too; splits across threads keep the bits; and the fallback to the reference for weights the
kernel cannot take."""

from __future__ import annotations

import os

import pytest
import torch

from dsv3_kernels.cpu import supported_variants
from dsv3cli import ops as ops_mod
from dsv3cli.config import load_preset
from dsv3cli.fp8 import _code_values_ref, dequantize_weight, quantize_weight
from dsv3cli.model import MoE
from dsv3cli.ops import AMX_ROWS, PACK_ROWS, Runtime
from dsv3cli.parallel import Dist, Linear, Scratch

SEED = int.from_bytes(os.urandom(4), "little")
BF16 = torch.bfloat16
VARIANTS = supported_variants()


@pytest.fixture(autouse=True)
def inference():
    with torch.no_grad():
        yield


def c_ops(variant: str, dtype: torch.dtype, threads: int = 1, exact: bool = True):
    ops = Runtime(dtype=dtype, variant=variant, threads=threads).ops(exact)
    if ops.name != "cpu":
        pytest.skip("the C kernels could not be built here (no C compiler?); DSV3_DEBUG=1 says why")
    assert ops.kern.variant == variant
    return ops


def fp8_linear(w: torch.Tensor, **kw) -> Linear:
    lin = Linear(w.shape[1], w.shape[0], dtype=BF16, fp8=True, scratch=Scratch(), **kw)
    q, s = quantize_weight(w)
    lin.weight.copy_(q)
    lin.weight_scale_inv.copy_(s)
    return lin


def prefill_shapes(rows: int) -> list[tuple[int, int, int]]:
    """(N, K, M) of a prefill's products at ragged shapes, each of more than `rows` rows."""
    return [(130, 300, rows + 1), (257, 128, 40), (64, 1000, 23), (200, 77, 70), (17, 16, 33), (300, 2100, 19)]


def exact(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The FP8 weight (q, s) in float64, exactly (codes through a table of their values)."""
    o, i = q.shape
    s_full = s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:o, :i]
    return _code_values_ref()[q.view(torch.uint8).long()] * s_full


def dense(lin: Linear) -> torch.Tensor:
    return exact(lin.weight, lin.weight_scale_inv)


def check(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor, msg: str) -> None:
    """y within float32 accumulation (and the scale's rounding of x) of x @ w64ᵀ, plus one rounding
    to y's dtype."""
    ref = x.double() @ w64.T
    bound = x.double().abs() @ w64.abs().T
    rounding = 2.0**-8 if y.dtype == BF16 else 0.0
    err = (y.double() - ref).abs()
    tol = ref.abs() * rounding + bound * 2.0**-20 + 1e-30
    assert bool((err <= tol).all()), f"{msg}: max error {err.max():.3g}, worst excess {(err - tol).max():.3g}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_fp8_linear_matches_float64_and_rows_are_independent(variant, dtype):
    ops = c_ops(variant, dtype)
    g = torch.Generator().manual_seed(SEED)
    for N, K in [(130, 300), (257, 128), (64, 1000), (200, 77), (1, 16), (300, 2100)]:
        lin = fp8_linear(torch.randn(N, K, generator=g) / K**0.5)
        w64 = dense(lin)
        x = torch.randn(9, K, generator=g).to(dtype)
        y = ops.linear(x, lin)  # many rows: through the cached buffer
        msg = f"seed {SEED}, {variant}, {dtype}, N {N} K {K}"
        assert y.shape == (9, N) and y.dtype == dtype
        check(y, x, w64, msg)
        for M in (1, 2, 3, 4):  # few rows: the codes converted in registers; the same bits
            assert torch.equal(ops.linear(x[:M], lin), y[:M]), f"{msg}: {M} rows differ from 9"
        for i in (0, 4, 8):
            assert torch.equal(ops.linear(x[i : i + 1], lin), y[i : i + 1]), f"{msg}: row {i} alone differs"
        assert torch.equal(ops.linear(x.view(3, 3, K), lin).view(9, N), y), msg  # batch dimensions


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_code_is_read_exactly(variant, capsys):
    """All 254 codes that are numbers (subnormals, both zeros, ±448): row c of the weight is code c
    40 times (two vectors and a tail), times ones: each output is 40 times the code's exact value
    times its block scale, an exact sum, in the row kernels and in the packed product. A weight
    with the NaN codes (0x7f, 0xff), which the kernels read as numbers, goes through the reference
    and gives NaN there, once DSV3_DEBUG has said why."""
    K = 40
    codes = torch.arange(256, dtype=torch.uint8)
    lin = Linear(K, 256, dtype=torch.float32, fp8=True, scratch=Scratch())
    lin.weight.view(torch.uint8).copy_(codes.view(256, 1).expand(256, K))
    lin.weight_scale_inv.copy_(torch.tensor([[0.5], [3.0]]))
    ref = dense(lin).sum(1)
    nan = ref.isnan()
    assert int(nan.sum()) == 2
    debug = Runtime(dtype=torch.float32, variant=variant, debug=True).ops(True)
    y = debug.linear(torch.ones(1, K), lin)[0]
    assert bool(y[nan].isnan().all()) and torch.equal(y[~nan].double(), ref[~nan]), variant
    assert "NaN codes" in capsys.readouterr().err
    lin.weight.view(torch.uint8)[nan] = 0  # now every code the kernels see is a number
    ops = c_ops(variant, torch.float32)
    assert ops._fp8_ready(lin), variant
    for M in (1, 8):  # codes converted in registers, and through the buffer
        y = ops.linear(torch.ones(M, K), lin)[0]
        wrong = (y[~nan].double() != ref[~nan]).nonzero().flatten()
        assert len(wrong) == 0, f"{variant}, {M} rows: codes {codes[~nan][wrong].tolist()}"
    # the packed product: each code times its scale in float32, exactly here, summed in order
    y = c_ops(variant, torch.float32, exact=False)._prefill_product(torch.ones(PACK_ROWS + 1, K), lin.weight,
                                                                     lin.weight_scale_inv)[-1]
    wrong = (y[~nan].double() != ref[~nan]).nonzero().flatten()
    assert len(wrong) == 0, f"{variant}, packed: codes {codes[~nan][wrong].tolist()}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp8_prefill_takes_the_packed_product(variant, monkeypatch):
    """A prefill's FP8 products of more than PACK_ROWS rows where the C kernels do every product
    (bfloat16 without bfloat16 dot products): the packed product, from the codes, against float64
    at ragged shapes; its rows independent of one another (not of their number: fewer rows take
    the row kernels); the bits kept across thread splits."""
    ops = c_ops(variant, BF16, exact=False)
    if not (ops.all_products and ops.kern.packed_prefill):
        pytest.skip(f"{variant}: a prefill takes oneDNN (bfloat16 dot products) or the row kernels (an unmeasured pack)")
    monkeypatch.setattr(ops_mod, "PARALLEL_MACS", 1)  # split even these small calls
    g = torch.Generator().manual_seed(SEED)
    for N, K, M in prefill_shapes(PACK_ROWS):
        lin = fp8_linear(torch.randn(N, K, generator=g) / K**0.5)
        x = torch.randn(M, K, generator=g).to(BF16)
        y = ops.linear(x, lin)
        msg = f"seed {SEED}, {variant}, N {N} K {K} M {M}"
        check(y, x, dense(lin), msg)
        assert torch.equal(ops.linear(x[M - PACK_ROWS - 1 :], lin), y[M - PACK_ROWS - 1 :]), f"{msg}: rows differ"
        for threads in (2, 3):
            assert torch.equal(c_ops(variant, BF16, threads=threads, exact=False).linear(x, lin), y), f"{msg}: {threads} threads"


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp8_linear_split_across_threads_keeps_the_bits(variant, monkeypatch):
    monkeypatch.setattr(ops_mod, "PARALLEL_MACS", 1)  # split even these small calls
    g = torch.Generator().manual_seed(SEED)
    lin = fp8_linear(torch.randn(700, 200, generator=g))
    x = torch.randn(3, 200, generator=g).to(BF16)
    one = c_ops(variant, BF16, threads=1).linear(x, lin)
    for threads in (2, 3, 8):
        assert torch.equal(c_ops(variant, BF16, threads=threads).linear(x, lin), one), f"seed {SEED}: {threads} threads"


def test_a_weight_the_kernel_cannot_take_goes_through_the_reference(capsys):
    """A tensor-parallel part cut inside a 128 block stores the whole blocks around it: the
    reference dequantizes it (the same numbers as the whole weight's rows), DSV3_DEBUG says why."""
    variant = VARIANTS[-1]
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(192, 96, generator=g)
    part = Linear(96, 192, dtype=torch.float32, fp8=True, scratch=Scratch(), rows=(96, 192))
    q, s = quantize_weight(w)
    part.weight.copy_(q)
    part.weight_scale_inv.copy_(s)
    assert not part.whole
    ops = Runtime(dtype=torch.float32, variant=variant, debug=True).ops(True)
    x = torch.randn(2, 96, generator=g)
    y = ops.linear(x, part)
    check(y, x, exact(q, s)[96:192], f"seed {SEED}")
    assert "not aligned to 128" in capsys.readouterr().err


def _fp8_moe(dtype, D, I, E, shared, world=1, rank=0):
    cfg = load_preset("tiny").replace(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=3,
                                      n_group=1, topk_group=1, n_shared_experts=shared)
    m = MoE(cfg, Dist(rank=rank, world_size=world), 1, dtype=dtype, fp8=True, scratch=Scratch(), scale_fmt="e4m3")
    g = torch.Generator().manual_seed(SEED + D + I)
    mlps = [m.experts[e] for e in range(m.lo, m.hi)] + ([m.shared_experts] if m.shared_experts is not None else [])
    for mlp in mlps:
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            full = torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5
            q, s = quantize_weight(full)
            lin.weight.copy_(q)
            lin.weight_scale_inv.copy_(s)
    return m


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("parts", [1, 3])
def test_fp8_experts_in_one_call_match_the_reference(variant, dtype, parts):
    """dsv3_moe_fp8 (routed and shared experts from their codes) against the reference (each
    expert dequantized, one token at a time), also for one rank's experts (whose shared part is
    padded and takes the reference); a token's result does not depend on the others."""
    ops = c_ops(variant, dtype)
    ref_ops = Runtime(dtype=dtype, kernels=False).ops(True)
    for world, rank in [(1, 0), (2, 1)]:
        for D, I, N in [(64, 40, 5), (130, 136, 3)]:
            m = _fp8_moe(dtype, D, I, 6, shared=1, world=world, rank=rank)
            m.expert_parts = parts
            g = torch.Generator().manual_seed(SEED + N)
            x = torch.randn(N, D, generator=g).to(dtype)
            idx = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(N)])
            w = torch.rand(N, 3, generator=g)
            assert ops._fp8_experts(m) is not None
            y = ops.moe_experts(m, x, w, idx)
            ref = ref_ops.moe_experts(m, x, w, idx)
            tol = 3e-2 if dtype == BF16 else 1e-5
            err = (y.double() - ref.double()).abs().max().item()
            msg = f"seed {SEED + N}, {variant}, {dtype}, D {D} I {I}, rank {rank}/{world}, {parts} parts"
            assert err <= tol * ref.abs().max().item(), f"{msg}: max error {err:.3g}"
            for n in (0, N - 1):
                assert torch.equal(ops.moe_experts(m, x[n : n + 1], w[n : n + 1], idx[n : n + 1]), y[n : n + 1]), msg


def _amx_ops(threads: int = 1):
    ops = c_ops(VARIANTS[-1], BF16, threads=threads, exact=False)
    if not ops.kern.amx_fp8:
        pytest.skip("no AMX tiles here (or the kernel does not grant them): a prefill's FP8 products take oneDNN")
    return ops


def test_amx_fp8_prefill_is_the_bfloat16_weight_times_x(monkeypatch):
    """With AMX, a bfloat16 prefill's FP8 products of more than AMX_ROWS rows run on the tiles:
    "dequantize to bfloat16, then multiply" (float64 of the bfloat16-dequantized weight, float32
    sums) at ragged shapes; rows independent of one another; the bits kept across thread splits."""
    ops = _amx_ops()
    monkeypatch.setattr(ops_mod, "PARALLEL_MACS", 1)  # split even these small calls
    calls = []
    tiles = ops.lib.dsv3_fp8_gemm_amx
    monkeypatch.setattr(ops.lib, "dsv3_fp8_gemm_amx", lambda *a: calls.append(a[7]) or tiles(*a))
    g = torch.Generator().manual_seed(SEED)
    for N, K, M in prefill_shapes(AMX_ROWS):
        lin = fp8_linear(torch.randn(N, K, generator=g) / K**0.5)
        x = torch.randn(M, K, generator=g).to(BF16)
        y = ops.linear(x, lin)
        msg = f"seed {SEED}, N {N} K {K} M {M}"
        check(y, x, dequantize_weight(lin.weight, lin.weight_scale_inv, BF16).double(), msg)
        assert torch.equal(ops.linear(x[M - AMX_ROWS - 1 :], lin), y[M - AMX_ROWS - 1 :]), f"{msg}: rows differ"
        for threads in (2, 3):
            assert torch.equal(_amx_ops(threads).linear(x, lin), y), f"{msg}: {threads} threads"
        assert M in calls, f"{msg}: not on the tiles"


@pytest.mark.parametrize("parts", [1, 3])
def test_amx_fp8_experts_in_a_prefill_match_the_reference(parts):
    """A prefill's FP8 experts with many tokens on the AMX tiles (dsv3_moe_fp8, prefill 2) against
    the reference, on one thread and two (which cut the tokens when there is one part: which
    experts take the tiles then changes, as in any prefill)."""
    ref_ops = Runtime(dtype=BF16, kernels=False).ops(False)
    m = _fp8_moe(BF16, 130, 136, 6, shared=1)
    m.expert_parts = parts
    g = torch.Generator().manual_seed(SEED)
    N = 40
    x = torch.randn(N, 130, generator=g).to(BF16)
    idx = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(N)])
    w = torch.rand(N, 3, generator=g)
    ref = ref_ops.moe_experts(m, x, w, idx)
    for threads in (1, 2):
        y = _amx_ops(threads).moe_experts(m, x, w, idx)
        err = (y.double() - ref.double()).abs().max().item()
        assert err <= 3e-2 * ref.abs().max().item(), f"seed {SEED}, {parts} parts, {threads} threads: max error {err:.3g}"


def test_an_fp8_kv_b_is_dequantized_once_per_runtime():
    """The absorbed attention reads kv_b_proj whole every step: an FP8 one is dequantized once and
    kept by the runtime, with the numbers of a fresh dequantization; a dense one is the parameter."""
    import types

    g = torch.Generator().manual_seed(SEED)
    lin = fp8_linear(torch.randn(256, 130, generator=g))
    rt = Runtime(dtype=BF16, kernels=False)
    m = types.SimpleNamespace(kv_b_proj=lin)
    w = rt.ops(True).kv_b(m, BF16)
    assert torch.equal(w, rt.ops(True).dense_weight(lin, BF16)), f"seed {SEED}"
    assert rt.ops(False).kv_b(m, BF16) is w and rt.ops(True).kv_b(m, BF16) is w
    assert Runtime(dtype=BF16, kernels=False).ops(True).kv_b(m, BF16) is not w  # per runtime
    dense = Linear(130, 256, dtype=BF16)
    assert rt.ops(True).kv_b(types.SimpleNamespace(kv_b_proj=dense), BF16) is dense.weight
