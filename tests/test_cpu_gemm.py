"""The C kernels of kernels/cpu_gemm.c (few-row products, a MoE layer's routed experts, RMSNorm)
against float64 references and the torch paths they replace, on fresh random inputs (the seed
is in every failure message) at ragged shapes, strided and expanded views; and the property MTP
verification relies on: a row's result never depends on the other rows in the call.
Skipped, with the reason, where the kernels cannot be built."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dsv3cli.config import load_preset
from dsv3cli.model import MoE, RMSNorm
from dsv3cli.parallel import SMALL_ROWS, Dist, linear, matmul_into, onednn

cpu = pytest.importorskip("dsv3_kernels.cpu", reason="dsv3_kernels is not importable (package not installed)")

SEED = int.from_bytes(os.urandom(4), "little")
BF16 = torch.bfloat16


@pytest.fixture(scope="module", autouse=True)
def kern():
    k = cpu.load()
    if k is None:
        pytest.skip("the C kernels could not be built here (no C compiler?); DSV3_DEBUG=1 says why")
    return k


@pytest.fixture(autouse=True)
def inference():
    """The kernels serve inference only (under autograd the layers keep torch's differentiable ops)."""
    with torch.no_grad():
        yield


def _close(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, msg: str, rounding: float = 2.0**-8) -> None:
    """y within one rounding of ref (float64; bfloat16 by default), plus float32 accumulation
    error (bound = |x| @ |w|)."""
    err = (y.double() - ref).abs()
    tol = ref.abs() * rounding + bound * 2.0**-18 + 1e-30
    assert bool((err <= tol).all()), f"{msg}: max error {err.max():.3g}, worst excess {(err - tol).max():.3g}"


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("K", [1, 7, 31, 32, 33, 64, 65, 96, 200, 512])
def test_linear_few_rows_matches_float64_and_rows_and_outputs_are_independent(K, dtype):
    g = torch.Generator().manual_seed(SEED + K)
    for M in (1, 2, 3, 4, 5, 9, SMALL_ROWS):
        for N in (1, 5, 130):
            x = torch.randn(2, M, K, generator=g).to(dtype)[1]  # a view into a larger tensor
            w = torch.randn(N, K, generator=g).to(dtype)
            y = linear(x, w)
            msg = f"seed {SEED + K}, {dtype}, M {M} N {N} K {K}"
            _close(y, x.double() @ w.double().T, x.double().abs() @ w.double().abs().T, msg, 2.0**-8 if dtype == BF16 else 2.0**-22)
            # the same bits for each row alone, and for a block of rows at another offset
            for i in range(M):
                assert torch.equal(linear(x[i : i + 1], w), y[i : i + 1]), f"{msg}: row {i} differs alone"
            assert torch.equal(linear(x[1:], w), y[1:]), msg
            # and for the outputs at another offset: outputs are reduced 16 at a time, the rest
            # one by one, and both ways must give the same bits
            assert torch.equal(linear(x, w[3:]), y[:, 3:]), f"{msg}: outputs 3.. differ on their own"


def test_linear_many_rows(kern):
    """float32 goes through torch. bfloat16 with many rows: through oneDNN where the CPU has
    bfloat16 dot products, else through the C kernel at every size (torch's bfloat16 products
    run at a fraction of its float32 speed there): close to float64, rows independent, across
    the panels the kernel cuts the rows into (K=1000: 65 rows a panel)."""
    g = torch.Generator().manual_seed(SEED)
    w = torch.randn(24, 40, generator=g)
    x = torch.randn(SMALL_ROWS + 3, 40, generator=g)
    assert torch.equal(linear(x, w), F.linear(x, w))
    if kern.native_bf16:
        with onednn(False):  # what `linear` picks for a product this small
            assert torch.equal(linear(x.to(BF16), w.to(BF16)), F.linear(x.to(BF16), w.to(BF16)))
        return
    for M, N, K in [(SMALL_ROWS + 1, 7, 33), (70, 29, 200), (131, 10, 1000)]:
        x, w = torch.randn(M, K, generator=g).to(BF16), torch.randn(N, K, generator=g).to(BF16)
        y = linear(x, w)
        msg = f"seed {SEED}, M {M} N {N} K {K}"
        _close(y, x.double() @ w.double().T, x.double().abs() @ w.double().abs().T, msg)
        for i in (0, M // 2, M - 1):
            assert torch.equal(linear(x[i : i + 1], w), y[i : i + 1]), f"{msg}: row {i} differs alone"
        assert torch.equal(linear(x[3:], w), y[3:]), msg


def test_splitting_across_threads_keeps_the_bits(monkeypatch):
    """Products split by output columns and the experts by tokens or into parts give the bits
    of one thread (each output is computed the same way whatever the split)."""
    import dsv3cli.parallel as parallel

    monkeypatch.setattr(parallel, "PARALLEL_MACS", 1)  # split even these small calls
    g = torch.Generator().manual_seed(SEED)
    x, w = torch.randn(5, 70, generator=g).to(BF16), torch.randn(77, 70, generator=g).to(BF16)
    xs = torch.randn(2, 3, 9, 33, generator=g).to(BF16)
    ws = torch.randn(2, 3, 33, 41, generator=g).to(BF16)
    m = _moe(BF16, 64, 32, 8, 2, shared=1)
    xe = torch.randn(37, 64, generator=g).to(BF16)
    route = m.gate.route_c(m.c_kernels(xe), xe)
    out = {}
    for threads in (1, 3, 8):
        torch.set_num_threads(threads)
        experts = []
        for parts in (1, 4):
            m.expert_parts = parts
            experts.append(m.experts_c(m.c_kernels(xe), xe, *route, shared=True))
        out[threads] = (linear(x, w), matmul_into(xs, ws, torch.empty(2, 3, 9, 41, dtype=BF16), nn=True), *experts)
    for threads in (3, 8):
        for a, b, what in zip(out[1], out[threads], ("linear", "matmul_into", "experts", "experts in 4 parts")):
            assert torch.equal(a, b), f"seed {SEED}: {what} on {threads} threads differs from 1"


@pytest.mark.parametrize("nn", [False, True])
def test_matmul_into_strided_and_expanded_views(nn):
    """The attention's shapes: heads-first views of [B,T,H,*] tensors, a weight shared by the batch."""
    g = torch.Generator().manual_seed(SEED + nn)
    for B, T, H, K, N in [(1, 1, 8, 64, 128), (2, 3, 5, 33, 17), (3, 2, 1, 160, 7)]:
        x = torch.randn(B, T, H, K + 3, generator=g).to(BF16)[..., :K].transpose(1, 2)  # [B,H,T,K], strided
        w = torch.randn(1, H, K if nn else N, N if nn else K, generator=g).to(BF16).expand(B, -1, -1, -1)
        out = torch.empty(B, T, H, N, dtype=BF16).transpose(1, 2)  # [B,H,T,N], strided
        matmul_into(x, w, out, nn=nn)
        wt = w.double() if nn else w.double().transpose(-1, -2)
        msg = f"seed {SEED + nn}, B {B} T {T} H {H} K {K} N {N}"
        _close(out, x.double() @ wt, x.double().abs() @ wt.abs(), msg)
        out1 = torch.empty(B, 1, H, N, dtype=BF16).transpose(1, 2)
        matmul_into(x[:, :, -1:], w, out1, nn=nn)
        assert torch.equal(out1, out[:, :, -1:]), f"{msg}: the last row alone differs"


def test_matmul_into_without_kernels_is_torch(monkeypatch):
    monkeypatch.setenv("DSV3_CPU_KERNEL", "0")
    g = torch.Generator().manual_seed(SEED)
    x, w = torch.randn(1, 2, 3, 40, generator=g).to(BF16), torch.randn(1, 2, 6, 40, generator=g).to(BF16)
    out = matmul_into(x, w, torch.empty(1, 2, 3, 6, dtype=BF16))
    assert torch.equal(out, torch.matmul(x, w.transpose(-1, -2)))


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


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("D,I,N", [(40, 24, 1), (96, 48, 3), (64, 33, 37), (130, 70, 20)])
def test_moe_routed_matches_float64_loop(dtype, D, I, N, parts, monkeypatch):
    """dsv3_moe against a float64 loop over (token, expert) pairs, also for one rank's experts;
    the experts in one part, or in parts added after (with part sums held for 7 tokens at a
    time: several chunks of tokens)."""
    E, K = 6, 3
    for world, rank in [(1, 0), (2, 1)]:
        m = _moe(dtype, D, I, E, K, world, rank)
        m.expert_parts, m.part_budget = parts, 7 * parts * D * 4
        g = torch.Generator().manual_seed(SEED + N)
        x = torch.randn(N, D, generator=g).to(dtype)
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
        wt = torch.rand(N, K, generator=g)
        kern = m.c_kernels(x)
        assert kern is not None
        y = m.experts_c(kern, x, wt, idx)
        ref = torch.zeros(N, D, dtype=torch.float64)
        for n in range(N):
            for j in range(K):
                e = int(idx[n, j])
                if not m.lo <= e < m.hi:
                    continue
                gu = m.w13[e - m.lo].double() @ x[n].double()
                ref[n] += wt[n, j].double() * (m.w2[e - m.lo].double() @ (F.silu(gu[:I]) * gu[I:]))
        msg = f"seed {SEED + N}, {dtype}, D {D} I {I} N {N}, rank {rank}/{world}"
        tol = 2e-2 if dtype == BF16 else 1e-5  # bfloat16: the activations are rounded once
        err = (y.double() - ref).abs().max().item()
        assert err <= tol * max(ref.abs().max().item(), 1e-6), f"{msg}: max error {err:.3g}"
        loop = m.routed_loop(x, wt, idx)  # the torch path it replaces
        assert (y.double() - loop.double()).abs().max().item() <= 2 * tol * max(ref.abs().max().item(), 1e-6), msg
        # a token's result does not depend on the others
        for n in (0, N - 1):
            assert torch.equal(m.experts_c(kern, x[n : n + 1], wt[n : n + 1], idx[n : n + 1]), y[n : n + 1]), msg


def test_exp_within_one_ulp_and_its_edges(kern):
    """The vectorised e^x (softmax, SwiGLU, router): within 1 ulp of float64's exp over the whole
    float range, at every length (the last partial vector too); 0 below -87.34, inf above 88.72."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.cat([torch.rand(20001, generator=g) * 176 - 88, torch.randn(999, generator=g) * 3])  # ragged length
    y = torch.empty_like(x)
    kern.lib.dsv3_exp(x.data_ptr(), y.data_ptr(), x.numel())
    ref = x.double().exp()
    normal = ref >= torch.finfo(torch.float32).tiny
    ulp = (y[normal].view(torch.int32).long() - ref[normal].float().view(torch.int32).long()).abs()
    assert ulp.max().item() <= 1, f"seed {SEED}: {ulp.max().item()} ulp at x = {x[normal][ulp.argmax()].item()}"
    edges = torch.tensor([-1e30, -87.5, 0.0, 88.8, 1e30, float("-inf"), float("inf"), float("nan")])
    out = torch.empty_like(edges)
    kern.lib.dsv3_exp(edges.data_ptr(), out.data_ptr(), edges.numel())
    assert out[:7].tolist() == [0.0, 0.0, 1.0, float("inf"), float("inf"), 0.0, float("inf")] and out[7].isnan()


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_rmsnorm_matches_torch(dtype):
    g = torch.Generator().manual_seed(SEED)
    for D in (1, 17, 96, 512):
        norm = RMSNorm(D, 1e-6)
        norm.weight.copy_(torch.randn(D, generator=g))
        x = torch.randn(3, 4, D + 5, generator=g).to(dtype)[..., 2 : D + 2]  # rows not contiguous
        y = norm(x)
        xd = x.double()
        ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
        tol = 2.0**-8 if dtype == BF16 else 1e-6
        err = ((y.double() - ref).abs() / (ref.abs() + 1e-3)).max().item()
        assert err <= tol, f"seed {SEED}, {dtype}, D {D}: max relative error {err:.3g}"
        assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_route_matches_the_torch_router(dtype, groups):
    """dsv3_route against Gate.forward (noaux_tc: sigmoid, bias for selection only, group-limited top-k)."""
    m = _moe(dtype, 40, 16, 16, 3, groups=groups)
    g = torch.Generator().manual_seed(SEED + groups)
    x = torch.randn(23, 40, generator=g).to(dtype)
    kern = m.c_kernels(x)
    assert m.gate.c_routable
    w, idx = m.gate.route_c(kern, x)
    w_ref, idx_ref, _ = m.gate(x)
    msg = f"seed {SEED + groups}, {dtype}, {groups} groups"
    assert torch.equal(idx, idx_ref), msg  # both best first
    assert torch.allclose(w, w_ref, rtol=1e-5, atol=1e-7), msg


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_moe_layer_c_path_matches_torch_path(dtype, monkeypatch):
    """The whole layer (router, routed and shared experts in C) against the torch layer, also for
    one rank's part of the experts and of the shared expert."""
    for world, rank in [(1, 0), (2, 1)]:
        m = _moe(dtype, 64, 32, 8, 2, world, rank, shared=2, groups=4)
        g = torch.Generator().manual_seed(SEED + rank)
        x = torch.randn(2, 5, 64, generator=g).to(dtype)
        if world == 1:
            y = m(x)
            with monkeypatch.context() as mp:
                mp.setenv("DSV3_CPU_KERNEL", "0")
                assert m.c_kernels(x) is None
                ref = m(x)
        else:  # this rank's partial sum, before the all_reduce of MoE.forward
            x = x.view(-1, 64)
            y = m.experts_c(m.c_kernels(x), x, *m.gate.route_c(m.c_kernels(x), x), shared=True)
            w, idx, _ = m.gate(x)
            ref = m.routed_loop(x, w, idx) + m.shared_experts(x)
        tol = 2e-2 if dtype == BF16 else 1e-5
        err = (y.double() - ref.double()).abs().max().item()
        assert err <= tol * ref.abs().max().item(), f"seed {SEED + rank}, {dtype}, rank {rank}/{world}: max error {err:.3g}"


def _decode_logits(cfg, dtype: torch.dtype, c_path: bool, monkeypatch) -> torch.Tensor:
    """A prefill (the torch path either way), then forwards of 1, 3, 2, 1 tokens for two sequences
    at different positions; the same weights (bfloat16 values) for every dtype -> their logits."""
    from dsv3cli.model import FEW_TOKENS, Transformer

    model = Transformer(cfg, dtype=dtype, max_batch_size=2, max_seq_len=64)
    for p in model.parameters():  # O(1) activations
        g = torch.Generator().manual_seed(SEED)
        v = 1 + 0.2 * torch.randn(p.shape, generator=g) if p.dim() == 1 else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
        p.copy_(v if p.dtype == torch.float32 and p.dim() == 1 else v.to(BF16))
    with monkeypatch.context() as mp:
        if not c_path:
            mp.setenv("DSV3_CPU_KERNEL", "0")
        model(torch.randint(0, cfg.vocab_size, (2, FEW_TOKENS + 5), generator=torch.Generator().manual_seed(SEED)),
              torch.zeros(2, dtype=torch.long))
        out, pos = [], torch.tensor([FEW_TOKENS + 5, FEW_TOKENS + 2])
        for T in (1, 3, 2, 1):
            toks = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(SEED + T))
            out.append(model(toks, pos)[0])
            pos = pos + T
    return torch.cat(out, 1)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_attention_c_path_matches_torch_path(dtype, monkeypatch):
    """Decode- and MTP-verification-sized forwards (attention through dsv3_mla, and the other
    kernels) against the torch path. float32: equal to 1e-5. bfloat16: both compared with the
    float32 model, the C path no further from it than the torch path (rounding differs, not math)."""
    cfg = load_preset("tiny").replace(hidden_size=72, kv_lora_rank=40, qk_nope_head_dim=24, qk_rope_head_dim=8,
                                      v_head_dim=20, q_lora_rank=56, num_attention_heads=3)
    c, ref = _decode_logits(cfg, dtype, True, monkeypatch), _decode_logits(cfg, dtype, False, monkeypatch)

    def rel(a):
        return ((a - exact).abs().max() / exact.abs().max()).item()

    if dtype == torch.float32:
        exact = ref
        assert rel(c) <= 1e-5, f"seed {SEED}: max relative error {rel(c):.3g}"
    else:
        exact = _decode_logits(cfg, torch.float32, False, monkeypatch)
        assert rel(c) <= 1.5 * rel(ref) + 2e-3, f"seed {SEED}: C path {rel(c):.3g} from float32, torch path {rel(ref):.3g}"


def test_prefill_equals_token_by_token_decode_bit_for_bit(kern):
    """Where the C kernels do every product (no bfloat16 dot products in hardware), a prefill's
    logits are those of decoding its tokens one by one, bit for bit: every kernel computes a
    token's row the same way whatever the other rows in the call (the attention in parts, too)."""
    from dsv3cli.model import Transformer

    if kern.native_bf16:
        pytest.skip("this CPU has bfloat16 dot products: a prefill's large products go through oneDNN")
    cfg = load_preset("tiny").replace(hidden_size=72, kv_lora_rank=40, qk_nope_head_dim=24, qk_rope_head_dim=8,
                                      v_head_dim=20, q_lora_rank=56, num_attention_heads=3)
    model = Transformer(cfg, dtype=BF16, max_batch_size=2, max_seq_len=64)
    g = torch.Generator().manual_seed(SEED)
    for p in model.parameters():
        v = 1 + 0.2 * torch.randn(p.shape, generator=g) if p.dim() == 1 else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
        p.copy_(v)
    for m in model.modules():
        if hasattr(m, "score_budget"):
            m.score_budget = 3 * m.h * 37  # the prefill's attention in parts of 3 tokens, the last of 1
        if hasattr(m, "expert_parts"):
            m.expert_parts = 3  # the experts in parts, as large experts are
    toks = torch.randint(0, cfg.vocab_size, (2, 37), generator=g)
    full = model(toks, torch.zeros(2, dtype=torch.long))[0]  # [2,37,V]
    steps = [model(toks[:, t : t + 1], torch.tensor([t, t]))[0] for t in range(toks.shape[1])]
    diff = (full - torch.cat(steps, 1)).abs().max().item()
    assert torch.equal(full, torch.cat(steps, 1)), f"seed {SEED}: prefill differs from decoding by {diff:.3g}"
