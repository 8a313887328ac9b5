"""The C kernels of kernels/cpu_gemm.c and cpu_ops.c, reached through dsv3cli.ops.CpuOps (products,
attention, router, a MoE layer's experts, RMSNorm), against float64 references and the torch
reference (ops.TorchOps), on fresh random inputs (the seed is in every failure message) at
ragged shapes and strided views; and the property MTP verification relies on: a row's result
never depends on the other rows in the call. Every test runs for each variant this CPU can
execute (an AVX-512 machine also checks its AVX2 and generic builds).
Skipped, with the reason, where the kernels cannot be built."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dsv3cli.config import load_preset
from dsv3cli.model import MLA, MoE, Positions, RMSNorm, Transformer, rope_frequencies, rope_tables
from dsv3cli.ops import AMX_ROWS, PACK_ROWS, SMALL_ROWS, Runtime, TorchOps
from dsv3cli.parallel import Dist, Linear, Scratch

cpu = pytest.importorskip("dsv3_kernels.cpu", reason="dsv3_kernels is not importable (package not installed)")

SEED = int.from_bytes(os.urandom(4), "little")
BF16 = torch.bfloat16
VARIANTS = cpu.supported_variants()
# the attention of the model tests: ragged head sizes, 3 heads
ATTN = dict(hidden_size=72, kv_lora_rank=40, qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=20, q_lora_rank=56,
            num_attention_heads=3)

variants = pytest.mark.parametrize("variant", VARIANTS)


@pytest.fixture(scope="module", autouse=True)
def built():
    if any(cpu.load(v) is None for v in VARIANTS):
        pytest.skip("the C kernels could not be built here (no C compiler?); DSV3_DEBUG=1 says why")


@pytest.fixture(autouse=True)
def inference():
    """The kernels serve inference only (under autograd the layers keep torch's differentiable ops)."""
    with torch.no_grad():
        yield


def _c(dtype: torch.dtype, variant: str, exact: bool = False, threads: int = 1):
    """The C backend of `variant` (asserted: a silent fall-back to torch would test nothing)."""
    ops = Runtime(dtype=dtype, variant=variant, threads=threads).ops(exact)
    assert ops.name == "cpu" and ops.kern.variant == variant
    return ops


def _torch(dtype: torch.dtype, exact: bool = False):
    ops = Runtime(dtype=dtype, kernels=False).ops(exact)
    assert ops.name == "torch"
    return ops


def _close(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, msg: str, rounding: float = 2.0**-8) -> None:
    """y within one rounding of ref (float64; bfloat16 by default), plus float32 accumulation
    error (bound = |x| @ |w|)."""
    err = (y.double() - ref).abs()
    tol = ref.abs() * rounding + bound * 2.0**-18 + 1e-30
    assert bool((err <= tol).all()), f"{msg}: max error {err.max():.3g}, worst excess {(err - tol).max():.3g}"


def _close_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, msg: str) -> None:
    """y = x wᵀ within the rounding of x's dtype of the float64 product."""
    _close(y, x.double() @ w.double().T, x.double().abs() @ w.double().abs().T, msg,
           2.0**-8 if x.dtype == BF16 else 2.0**-22)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ---- products ------------------------------------------------------------------------------------


@variants
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("K", [1, 7, 31, 32, 33, 64, 65, 96, 200, 512])
def test_linear_few_rows_matches_float64_and_rows_and_outputs_are_independent(K, dtype, variant):
    c = _c(dtype, variant)  # a prefill's backend: up to PACK_ROWS rows through the row kernels (AMX_ROWS with AMX)
    rows = PACK_ROWS if c.all_products else min(PACK_ROWS, c.rt.small_rows)
    g = torch.Generator().manual_seed(SEED + K)
    for M in [m for m in (1, 2, 3, 4, 5, 9, PACK_ROWS) if m <= rows]:
        for N in (1, 5, 130):
            x = torch.randn(2, M, K, generator=g).to(dtype)[1]  # a view into a larger tensor
            w = torch.randn(N, K, generator=g).to(dtype)
            y = c.matmul_t(x, w)
            msg = f"seed {SEED + K}, {variant}, {dtype}, M {M} N {N} K {K}"
            _close_product(y, x, w, msg)
            # the same bits for each row alone, and for a block of rows at another offset
            for i in range(M):
                assert torch.equal(c.matmul_t(x[i : i + 1], w), y[i : i + 1]), f"{msg}: row {i} differs alone"
            assert torch.equal(c.matmul_t(x[1:], w), y[1:]), msg
            # and for the outputs at another offset: outputs are reduced 16 at a time, the rest
            # one by one, and both ways must give the same bits
            assert torch.equal(c.matmul_t(x, w[3:]), y[:, 3:]), f"{msg}: outputs 3.. differ on their own"
    lin = Linear(K, 130, dtype=dtype)  # a layer's product: the same call
    lin.weight.copy_(w)
    assert torch.equal(lin(x.unsqueeze(0), c), y.unsqueeze(0)), f"seed {SEED + K}, {variant}: Linear differs from matmul_t"


@variants
def test_linear_many_rows(variant):
    """A prefill (not exact): float32 goes through torch; bfloat16 with many rows through torch
    (oneDNN) where the CPU has bfloat16 dot products, else through the packed product (more than
    PACK_ROWS rows). An exact forward (decode, verification): the row kernels at every size,
    whatever the dtype and the CPU. Where C: close to float64, rows independent (the packed
    product's rows of one another, the row kernels' of their number too), across the panels the
    kernels cut the rows into (K=1000: 65 rows a panel)."""
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(24, 40, generator=g)
    x = torch.randn(SMALL_ROWS + 3, 40, generator=g)
    assert torch.equal(_c(torch.float32, variant).matmul_t(x, w), F.linear(x, w))
    prefill_bf16 = _c(BF16, variant)
    if prefill_bf16.kern.native_bf16:
        assert torch.equal(prefill_bf16.matmul_t(x.to(BF16), w.to(BF16)), F.linear(x.to(BF16), w.to(BF16)))
    in_c = [(prefill_bf16, BF16)] if not prefill_bf16.kern.native_bf16 else []
    in_c += [(_c(BF16, variant, exact=True), BF16), (_c(torch.float32, variant, exact=True), torch.float32)]
    for c, dtype in in_c:
        for M, N, K in [(PACK_ROWS + 1, 7, 33), (70, 29, 200), (131, 10, 1000), (200, 37, 300)]:
            x, w = torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
            y = c.matmul_t(x, w)
            msg = f"seed {SEED}, {variant}, {dtype}, exact {c.exact}, M {M} N {N} K {K}"
            _close_product(y, x, w, msg)
            for i in (0, M // 2, M - 1) if c.exact else ():
                assert torch.equal(c.matmul_t(x[i : i + 1], w), y[i : i + 1]), f"{msg}: row {i} differs alone"
            lo = M - PACK_ROWS - 1 if not c.exact else 3  # the packed product for the rest too
            assert torch.equal(c.matmul_t(x[lo:], w), y[lo:]), msg
            assert torch.equal(c.matmul_t(x, w[5:]), y[:, 5:]), f"{msg}: outputs 5.. differ on their own"


@variants
def test_amx_sends_a_bfloat16_prefill_to_onednn(variant, monkeypatch):
    """With AMX (forced here: what is checked is where the products go, not their speed), a
    bfloat16 prefill's products of more than AMX_ROWS rows are torch's, the MoE experts' too (the
    reference's loop, each expert's tokens in one product); fewer rows, float32 and exact forwards
    stay in C."""
    c = _c(BF16, variant)
    if c.all_products:
        pytest.skip(f"{variant}: no bfloat16 dot products, so the C kernels take every product")
    monkeypatch.setattr(c.kern, "amx", True)
    assert c.rt.small_rows == AMX_ROWS and Runtime(dtype=torch.float32, variant=variant).small_rows == SMALL_ROWS
    g = torch.Generator().manual_seed(SEED)
    x, w = torch.randn(AMX_ROWS + 1, 200, generator=g).to(BF16), torch.randn(37, 200, generator=g).to(BF16)
    exact = c.rt.ops(True)
    assert torch.equal(c.matmul_t(x, w), F.linear(x, w))
    assert torch.equal(c.matmul_t(x[:AMX_ROWS], w), exact.matmul_t(x[:AMX_ROWS], w))  # the row kernels
    m = _moe(BF16, 64, 48, 8, 2, shared=1)
    x = torch.randn(40, 64, generator=g).to(BF16)
    wt, idx = _routing(40, 8, 2, SEED)
    assert torch.equal(c.moe_experts(m, x, wt, idx), TorchOps(c.rt, False).moe_experts(m, x, wt, idx))
    assert not torch.equal(exact.moe_experts(m, x, wt, idx), TorchOps(c.rt, False).moe_experts(m, x, wt, idx))


# ---- attention -----------------------------------------------------------------------------------


def _mla(dtype: torch.dtype, B: int, maxS: int):
    """An MLA layer of ATTN's shapes with random kv_b_proj, norm and cache (the entries of earlier
    tokens, and finite garbage beyond, which the attention must mask), and its rope tables."""
    cfg = load_preset("tiny").replace(**ATTN)
    m = MLA(cfg, Dist(), dtype=dtype, scratch=Scratch(), max_batch_size=B, max_seq_len=maxS)
    g = torch.Generator().manual_seed(SEED)
    m.kv_b_proj.weight.copy_(torch.randn(m.kv_b_proj.weight.shape, generator=g) / m.c**0.5)
    m.kv_a_layernorm.weight.copy_(1 + 0.2 * torch.randn(m.c, generator=g))
    m.kv_cache.copy_(torch.randn(m.kv_cache.shape, generator=g))
    cos, sin = rope_tables(torch.outer(torch.arange(maxS, dtype=torch.float64), rope_frequencies(cfg)))
    return m, cos, sin


def _attend(ops, m: MLA, tables, cache: torch.Tensor, q: torch.Tensor, kva: torch.Tensor, starts: list[int]):
    """ops.mla_absorbed for tokens at starts[b].. of each sequence, on a copy of `cache`
    -> (output, the cache after)."""
    T = q.shape[1]
    m.kv_cache.copy_(cache)
    pos = torch.tensor([list(range(s, s + T)) for s in starts])
    at = Positions(pos, max(starts) + T, *tables, m.kv_cache.shape[1], ops)
    return ops.mla_absorbed(m, q, kva, at), m.kv_cache.clone()


@variants
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_mla_absorbed_matches_the_torch_attention(dtype, exact, variant):
    """dsv3_mla (the cache entries written, then the absorbed attention) against TorchOps'
    attention: a prefill, one token and three tokens of two sequences at different positions.
    float32: equal to 1e-5. bfloat16: both compared with the float32 attention on the same
    values, the C path no further from it than the torch path (rounding differs, not math).
    Exact: each token's result is that of the token alone."""
    B, maxS = 2, 24
    m, cos, sin = _mla(dtype, B, maxS)
    m32, _, _ = _mla(torch.float32, B, maxS)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    m32.kv_cache.copy_(m.kv_cache)
    cache0 = m.kv_cache.clone()
    c, t = _c(dtype, variant, exact), _torch(dtype, exact)
    g = torch.Generator().manual_seed(SEED + 1)
    for starts, T in (([0, 0], 7), ([5, 11], 1), ([5, 11], 3)):
        q = torch.randn(B, T, m.h, m.nope + m.rope, generator=g).to(dtype)
        kva = torch.randn(B, T, m.c + m.rope, generator=g).to(dtype)
        msg = f"seed {SEED}, {variant}, {dtype}, exact {exact}, starts {starts}, T {T}"
        y, cache = _attend(c, m, (cos, sin), cache0, q, kva, starts)
        ref, ref_cache = _attend(t, m, (cos, sin), cache0, q, kva, starts)
        assert y.shape == (B, T, m.h, m.vdim) and y.dtype == dtype, msg
        if dtype == torch.float32:
            assert _rel(y, ref) <= 1e-5 and _rel(cache, ref_cache) <= 1e-6, f"{msg}: {_rel(y, ref):.3g}"
        else:
            f32, f32_cache = _attend(_torch(torch.float32, exact), m32, (cos, sin), cache0.float(), q.float(), kva.float(), starts)
            assert _rel(y, f32) <= 1.5 * _rel(ref, f32) + 2e-3 and _rel(y, f32) <= 2e-2, (
                f"{msg}: C path {_rel(y, f32):.3g} from float32, torch path {_rel(ref, f32):.3g}")
            assert _rel(cache, f32_cache) <= 2.0**-7, f"{msg}: cache entries {_rel(cache, f32_cache):.3g} from float32"
        if exact and T > 1:
            for i in range(T):  # the cache then holds the entries of all T tokens: masked past token i
                alone, _ = _attend(c, m, (cos, sin), cache, q[:, i : i + 1].contiguous(), kva[:, i : i + 1].contiguous(),
                                   [s + i for s in starts])
                assert torch.equal(alone, y[:, i : i + 1]), f"{msg}: token {i} differs alone"


# ---- mixture of experts --------------------------------------------------------------------------


def _moe(dtype, D, I, E, K, world=1, rank=0, shared=0, groups=1):
    cfg = load_preset("tiny")
    cfg = cfg.replace(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K, n_group=groups,
                      topk_group=max(1, groups // 2), n_shared_experts=shared)
    m = MoE(cfg, Dist(rank=rank, world_size=world), 1, dtype=dtype, fp8=False, scratch=None, scale_fmt="e4m3")
    g = torch.Generator().manual_seed(SEED + D + I)
    m.w13.copy_(torch.randn(m.w13.shape, generator=g) / D**0.5)
    m.w2.copy_(torch.randn(m.w2.shape, generator=g) / I**0.5)
    m.gate.weight.copy_(torch.randn(m.gate.weight.shape, generator=g))
    m.gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
    if m.shared_experts is not None:
        for lin in (m.shared_experts.gate_proj, m.shared_experts.up_proj, m.shared_experts.down_proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
    return m


def _routing(N: int, E: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights [N,K] and distinct experts [N,K] per token."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    return torch.rand(N, K, generator=g), idx


def _routed64(m: MoE, x: torch.Tensor, wt: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """This rank's routed experts in float64, a (token, expert) pair at a time."""
    I = m.w2.shape[-1]
    ref = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            if m.lo <= e < m.hi:
                gu = m.w13[e - m.lo].double() @ x[n].double()
                ref[n] += wt[n, j].double() * (m.w2[e - m.lo].double() @ (F.silu(gu[:I]) * gu[I:]))
    return ref


MOE_TOL = {BF16: 2e-2, torch.float32: 1e-5}  # bfloat16: the activations are rounded once


@variants
@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("D,I,N", [(40, 24, 1), (96, 48, 3), (64, 33, 37), (130, 70, 20), (72, 40, 90)])
def test_moe_routed_matches_float64_loop(dtype, D, I, N, parts, variant):
    """dsv3_moe against a float64 loop over (token, expert) pairs and against TorchOps' loop over
    the experts (exact: a row at a time), also for one rank's experts; the experts in one part, or
    in parts added after (with part sums held for 7 tokens at a time: several chunks of tokens).
    A prefill's experts of many tokens (N=90: 45 a expert) take the packed product; an exact
    forward's results do not depend on the other tokens."""
    E, K = 6, 3
    c, loop, exact = _c(dtype, variant), _torch(dtype, exact=True), _c(dtype, variant, exact=True)
    for world, rank in [(1, 0), (2, 1)]:
        m = _moe(dtype, D, I, E, K, world, rank)
        m.expert_parts, m.part_budget = parts, 7 * parts * D * 4
        g = torch.Generator().manual_seed(SEED + N)
        x = torch.randn(N, D, generator=g).to(dtype)
        wt, idx = _routing(N, E, K, SEED + N + 1)
        y = c.moe_experts(m, x, wt, idx)
        ref = _routed64(m, x, wt, idx)
        msg = f"seed {SEED + N}, {variant}, {dtype}, D {D} I {I} N {N}, rank {rank}/{world}"
        tol = MOE_TOL[dtype] * max(ref.abs().max().item(), 1e-6)
        err = (y.double() - ref).abs().max().item()
        assert err <= tol, f"{msg}: max error {err:.3g}"
        torch_loop = loop.moe_experts(m, x, wt, idx)  # the torch path it replaces
        assert (y.double() - torch_loop.double()).abs().max().item() <= 2 * tol, msg
        ye = exact.moe_experts(m, x, wt, idx)
        assert (ye.double() - ref).abs().max().item() <= tol, f"{msg}: exact"
        for n in (0, N - 1):
            assert torch.equal(exact.moe_experts(m, x[n : n + 1], wt[n : n + 1], idx[n : n + 1]), ye[n : n + 1]), msg


@variants
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_route_matches_the_torch_router(dtype, groups, variant):
    """dsv3_route against TorchOps.route (noaux_tc: sigmoid, bias for selection only,
    group-limited top-k); with the choices without the bias asked for (the profiler's), the C
    backend's torch router gives the same."""
    m = _moe(dtype, 40, 16, 16, 3, groups=groups)
    g = torch.Generator().manual_seed(SEED + groups)
    x = torch.randn(23, 40, generator=g).to(dtype)
    c, t = _c(dtype, variant), _torch(dtype)
    w, idx, nobias = c.route(m.gate, x)
    w_ref, idx_ref, _ = t.route(m.gate, x)
    msg = f"seed {SEED + groups}, {variant}, {dtype}, {groups} groups"
    assert nobias is None and torch.equal(idx, idx_ref), msg  # both best first
    assert torch.allclose(w, w_ref, rtol=1e-5, atol=1e-7), msg
    w2, idx2, nobias2 = c.route(m.gate, x, want_nobias=True)
    _, _, nobias_ref = t.route(m.gate, x, want_nobias=True)
    assert torch.equal(idx2, idx_ref) and torch.equal(nobias2, nobias_ref), msg
    assert torch.allclose(w2, w_ref, rtol=1e-5, atol=1e-7), msg


@variants
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_moe_layer_c_path_matches_torch_path(dtype, variant):
    """The whole layer (router, routed and shared experts in C) against the torch layer, also for
    one rank's part of the experts and of the shared expert (against the torch loop)."""
    c = _c(dtype, variant)
    for world, rank in [(1, 0), (2, 1)]:
        m = _moe(dtype, 64, 32, 8, 2, world, rank, shared=2, groups=4)
        g = torch.Generator().manual_seed(SEED + rank)
        x = torch.randn(2, 5, 64, generator=g).to(dtype)
        if world == 1:
            y, ref = m(x, c), m(x, _torch(dtype))
        else:  # this rank's partial sum, before the all_reduce of MoE.forward
            x = x.view(-1, 64)
            w, idx, _ = c.route(m.gate, x)
            y = c.moe_experts(m, x, w, idx)
            t = _torch(dtype, exact=True)
            ref = t.moe_experts(m, x, *t.route(m.gate, x)[:2])
        tol = MOE_TOL[dtype]
        err = (y.double() - ref.double()).abs().max().item()
        assert err <= tol * ref.abs().max().item(), f"seed {SEED + rank}, {variant}, {dtype}, rank {rank}/{world}: max error {err:.3g}"


def test_every_variant_agrees_with_float64_on_the_same_inputs():
    """The variants side by side on one set of inputs: each one's product and experts within the
    tolerance of the float64 reference (the builds may differ in their last bits, never more)."""
    g = torch.Generator().manual_seed(SEED)
    m = _moe(BF16, 96, 48, 6, 3, shared=0)
    x = torch.randn(9, 96, generator=g).to(BF16)
    w = torch.randn(130, 96, generator=g).to(BF16)
    wt, idx = _routing(9, 6, 3, SEED + 1)
    ref = _routed64(m, x, wt, idx)
    for v in VARIANTS:
        c = _c(BF16, v, exact=True)
        _close_product(c.matmul_t(x, w), x, w, f"seed {SEED}, {v}: product")
        err = (c.moe_experts(m, x, wt, idx).double() - ref).abs().max().item()
        assert err <= MOE_TOL[BF16] * ref.abs().max().item(), f"seed {SEED}, {v}: experts, max error {err:.3g}"


@variants
def test_splitting_across_threads_keeps_the_bits(variant, monkeypatch):
    """Products split by output columns, the attention by tokens and the experts by tokens or
    into parts give the bits of one thread (each output is computed the same way whatever the
    split)."""
    import dsv3cli.ops

    monkeypatch.setattr(dsv3cli.ops, "PARALLEL_MACS", 1)  # split even these small calls
    g = torch.Generator().manual_seed(SEED)
    x, w = torch.randn(5, 70, generator=g).to(BF16), torch.randn(77, 70, generator=g).to(BF16)
    m = _moe(BF16, 64, 32, 8, 2, shared=1)
    xe = torch.randn(37, 64, generator=g).to(BF16)
    mla, cos, sin = _mla(BF16, 2, 24)
    mla.score_budget = mla.h * 24  # the attention's parts: one token each
    cache = mla.kv_cache.clone()
    q = torch.randn(2, 3, mla.h, mla.nope + mla.rope, generator=g).to(BF16)
    kva = torch.randn(2, 3, mla.c + mla.rope, generator=g).to(BF16)
    out = {}
    for threads in (1, 3, 8):
        c = _c(BF16, variant, exact=True, threads=threads)
        route = c.route(m.gate, xe)[:2]
        experts = []
        for parts in (1, 4):
            m.expert_parts = parts
            experts.append(c.moe_experts(m, xe, *route))
        attn, _ = _attend(c, mla, (cos, sin), cache, q, kva, [4, 9])
        out[threads] = (c.matmul_t(x, w), attn, *experts)
    for threads in (3, 8):
        for a, b, what in zip(out[1], out[threads], ("matmul_t", "mla_absorbed", "experts", "experts in 4 parts")):
            assert torch.equal(a, b), f"seed {SEED}, {variant}: {what} on {threads} threads differs from 1"


# ---- elementwise ---------------------------------------------------------------------------------


@variants
def test_exp_within_one_ulp_and_its_edges(variant):
    """The vectorised e^x (softmax, SwiGLU, router): within 1 ulp of float64's exp over the whole
    float range, at every length (the last partial vector too); 0 below -87.34, inf above 88.72."""
    kern = cpu.load(variant)
    g = torch.Generator().manual_seed(SEED)
    x = torch.cat([torch.rand(20001, generator=g) * 176 - 88, torch.randn(999, generator=g) * 3])  # ragged length
    y = torch.empty_like(x)
    kern.lib.dsv3_exp(x.data_ptr(), y.data_ptr(), x.numel())
    ref = x.double().exp()
    normal = ref >= torch.finfo(torch.float32).tiny
    ulp = (y[normal].view(torch.int32).long() - ref[normal].float().view(torch.int32).long()).abs()
    assert ulp.max().item() <= 1, f"seed {SEED}, {variant}: {ulp.max().item()} ulp at x = {x[normal][ulp.argmax()].item()}"
    edges = torch.tensor([-1e30, -87.5, 0.0, 88.8, 1e30, float("-inf"), float("inf"), float("nan")])
    out = torch.empty_like(edges)
    kern.lib.dsv3_exp(edges.data_ptr(), out.data_ptr(), edges.numel())
    assert out[:7].tolist() == [0.0, 0.0, 1.0, float("inf"), float("inf"), 0.0, float("inf")] and out[7].isnan()


@variants
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_rmsnorm_matches_float64(dtype, variant):
    c = _c(dtype, variant)
    g = torch.Generator().manual_seed(SEED)
    for D in (1, 17, 96, 512):
        norm = RMSNorm(D, 1e-6)
        norm.weight.copy_(torch.randn(D, generator=g))
        x = torch.randn(3, 4, D + 5, generator=g).to(dtype)[..., 2 : D + 2]  # rows not contiguous
        y = norm(x, c)
        xd = x.double()
        ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
        tol = 2.0**-8 if dtype == BF16 else 1e-6
        err = ((y.double() - ref).abs() / (ref.abs() + 1e-3)).max().item()
        assert err <= tol, f"seed {SEED}, {variant}, {dtype}, D {D}: max relative error {err:.3g}"
        assert y.dtype == dtype and y.shape == x.shape


# ---- the model -----------------------------------------------------------------------------------


def _model(cfg, runtime: Runtime, gen: torch.Generator) -> Transformer:
    """A model with O(1) activations: norms around 1, weights std 1/sqrt(fan_in), in bfloat16
    values (the same numbers for every dtype)."""
    model = Transformer(cfg, Dist(), runtime, max_batch_size=2, max_seq_len=64)
    for p in model.parameters():
        v = 1 + 0.2 * torch.randn(p.shape, generator=gen) if p.dim() == 1 else torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5
        p.copy_(v if p.dtype == torch.float32 and p.dim() == 1 else v.to(BF16))
    return model


def _decode_logits(cfg, runtime: Runtime) -> torch.Tensor:
    """A prefill, then forwards of 1, 3, 2, 1 tokens for two sequences at different positions
    (exact forwards: decode- and verification-sized) -> their logits. The routing bias (4 times
    distinct powers of two) makes every expert's and every group's top-two sum differ by more
    than sigmoid scores (0..1 each) can, so the bias alone decides the choice and rounding cannot
    flip it between the dtypes compared (a flip changes the logits by far more than rounding; the
    router has tests of its own). Evenly spaced biases let two groups tie (seed 1024164157)."""
    model = _model(cfg, runtime, torch.Generator().manual_seed(SEED))
    for m in model.modules():
        if isinstance(m, MoE):
            perm = torch.randperm(m.gate.weight.shape[0], generator=torch.Generator().manual_seed(SEED))
            m.gate.e_score_correction_bias.copy_(4 * 2.0**perm)
    model(torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(SEED)),
          torch.zeros(2, dtype=torch.long))
    out, pos = [], torch.tensor([13, 10])
    for T in (1, 3, 2, 1):
        toks = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(SEED + T))
        out.append(model(toks, pos)[0])
        pos = pos + T
    return torch.cat(out, 1)


@variants
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_attention_c_path_matches_torch_path(dtype, variant):
    """Decode- and MTP-verification-sized forwards (attention through dsv3_mla, and the other
    kernels) against the torch path. float32: equal to 1e-5. bfloat16: both compared with the
    float32 model, the C path about as far from it as the torch path (rounding differs, not math)."""
    cfg = load_preset("tiny").replace(**ATTN)
    assert Runtime(dtype=dtype, variant=variant).ops(True).name == "cpu"
    c = _decode_logits(cfg, Runtime(dtype=dtype, variant=variant))
    ref = _decode_logits(cfg, Runtime(dtype=dtype, kernels=False))

    def rel(a):
        return ((a - exact).abs().max() / exact.abs().max()).item()

    if dtype == torch.float32:
        exact = ref
        assert rel(c) <= 1e-5, f"seed {SEED}, {variant}: max relative error {rel(c):.3g}"
    else:
        exact = _decode_logits(cfg, Runtime(dtype=torch.float32, kernels=False))
        # over 50 seeds the ratio ran 0.64-2.0 (maximum errors of one rounding each); a wrong
        # operation or routing flip is 10x or more
        assert rel(c) <= 3 * rel(ref) + 2e-3, f"seed {SEED}, {variant}: C path {rel(c):.3g} from float32, torch path {rel(ref):.3g}"


@variants
def test_prefill_equals_token_by_token_decode_bit_for_bit(variant):
    """Where the C kernels do every product (no bfloat16 dot products in hardware), a prefill of
    up to PACK_ROWS tokens gives the logits of decoding its tokens one by one, bit for bit: every
    row kernel computes a token's row the same way whatever the other rows in the call (the
    attention in parts, too). (More tokens take the packed product, whose sums run in another
    order.)"""
    if cpu.load(variant).native_bf16:
        pytest.skip(f"{variant} has bfloat16 dot products: a prefill's large products go through oneDNN")
    cfg = load_preset("tiny").replace(**ATTN)
    g = torch.Generator().manual_seed(SEED)
    model = _model(cfg, Runtime(dtype=BF16, variant=variant), g)
    for m in model.modules():
        if hasattr(m, "score_budget"):
            m.score_budget = 3 * m.h * PACK_ROWS // 2  # the prefill's attention in parts of 3 tokens, the last of 2
        if hasattr(m, "expert_parts"):
            m.expert_parts = 3  # the experts in parts, as large experts are
    toks = torch.randint(0, cfg.vocab_size, (2, PACK_ROWS // 2), generator=g)
    full = model(toks, torch.zeros(2, dtype=torch.long))[0]  # [2,37,V]
    steps = [model(toks[:, t : t + 1], torch.tensor([t, t]))[0] for t in range(toks.shape[1])]
    diff = (full - torch.cat(steps, 1)).abs().max().item()
    assert torch.equal(full, torch.cat(steps, 1)), f"seed {SEED}, {variant}: prefill differs from decoding by {diff:.3g}"
