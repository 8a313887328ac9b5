"""The DeepSeek-V3 model: MLA attention over a latent KV cache, dense and MoE layers, and the MTP module.

Boundary: forward math only; no file I/O (loading.py fills the parameters), no CLI, no sampling
(generation.py). Semantics follow DESIGN.md §3 exactly. Rank and world size arrive in a `Dist`;
tensor/expert-parallel layers and their collectives are in parallel.py (plus the one all_reduce
in `MoE.forward`).

Shapes: B batch, T new tokens, S cache length read (max position + 1), D hidden, H local heads,
C kv_lora_rank, R qk_rope_head_dim, N tokens (B*T), E routed experts, K experts per token.

Every cached forward (prefill, decode, multi-token MTP verification) goes through the same
attention path, `Transformer.attn_impl`: "absorb" (default: kv_b_proj folded into the query and
the output, attention over the latent cache) or "naive" (K/V expanded from the latent cache
through kv_b_proj; the reference). Both read and write the same cache.

On the CPU, a forward of at most FEW_TOKENS tokens (decode, MTP verification) runs its hot parts
through the C kernels of kernels/cpu_gemm.c, each behind one method with the torch code as the
fallback the tests compare against: the absorbed attention (`MLA._absorbed_c`), the V3 router
(`Gate.route_c`) and the experts (`MoE.experts_c`, also for more tokens: each expert runs once
on all its tokens); parallel.linear does the same for products of few rows. On CPUs without
bfloat16 dot products (AVX2 only), where torch's bfloat16 products are slow at every size, a
bfloat16 prefill goes through them too, attention included, and its logits are then those of
decoding its tokens one by one, bit for bit. Large calls are split across torch's thread count.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from dsv3_kernels.cpu import run_split

from .config import ModelConfig
from .errors import DsvError
from .parallel import (
    ColumnParallelLinear,
    Dist,
    Linear,
    ParallelHead,
    RowParallelLinear,
    Scratch,
    VocabParallelEmbedding,
    c_does_all_products,
    c_threads,
    cpu_kernels,
    forward_scope,
    matmul_into,
    split_range,
)

# Forwards of at most this many tokens (B*T) run their attention through the C kernel on the CPU
# (more, too, on CPUs without bfloat16 dot products: see MLA.c_kernels).
FEW_TOKENS = 8
MLA_WRITE, MLA_ATTEND = 1, 2  # dsv3_mla's steps: the cache entries, the attention


class Positions:
    """Where one forward's tokens sit, computed once and shared by every layer (and by the next
    forward at the same positions: the MTP forward after a verification). The C attention kernel
    reads only `pos` (and the whole rope tables); the torch path's tensors are made on first use,
    so a decode step does not pay for them."""

    def __init__(self, pos: torch.Tensor, S: int, all_visible: bool, cos_table: torch.Tensor, sin_table: torch.Tensor, max_seq_len: int):
        self.pos = pos  # [B,T] cache position of each token
        self.S = S  # cache length read: max position + 1
        self.all_visible = all_visible  # one new token per sequence, all at the same position
        self.cos_table, self.sin_table = cos_table, sin_table  # [maxS,R] (see rope_tables)
        self.max_seq_len = max_seq_len

    @functools.cached_property
    def cos(self) -> torch.Tensor:  # [B,T,1,R] the rope table at each token's position
        return self.cos_table[self.pos].unsqueeze(2)

    @functools.cached_property
    def sin(self) -> torch.Tensor:
        return self.sin_table[self.pos].unsqueeze(2)

    @functools.cached_property
    def slots(self) -> torch.Tensor:  # [B*T] row b's position p as an index into the flattened cache
        B = self.pos.shape[0]
        return (self.pos + torch.arange(B, device=self.pos.device).unsqueeze(1) * self.max_seq_len).flatten()

    @functools.cached_property
    def hide(self) -> torch.Tensor | None:  # [B,T,S] True where a cached position is not visible; None: all are
        if self.all_visible:
            return None
        return torch.arange(self.S, device=self.pos.device) > self.pos.unsqueeze(-1)


RouteObserver = Callable[[int, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kern, w = cpu_kernels(x), self.weight
        if kern is None or x.stride(-1) != 1:
            return F.rms_norm(x.float(), w.shape, w, self.eps).to(x.dtype)
        D = x.shape[-1]
        x2 = x.reshape(-1, D)  # a view unless x's rows are unevenly spaced
        y = torch.empty(x.shape, dtype=x.dtype)
        kern.lib.dsv3_rmsnorm(int(x.dtype == torch.bfloat16), x2.data_ptr(), x2.stride(0), w.data_ptr(), y.data_ptr(),
                              x2.shape[0], D, self.eps)
        return y


# ---- rotary embedding ---------------------------------------------------------------------------


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair angular frequencies [R/2] (float64), YaRN-corrected whenever rope_scaling is yarn."""
    d, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    f = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    y = cfg.yarn
    if y is None:
        return f

    def corr(r: float) -> float:  # the dimension whose wavelength fits r times into L0
        return d * math.log(y["original_max_position_embeddings"] / (2 * math.pi * r)) / (2 * math.log(base))

    low = max(math.floor(corr(y["beta_fast"])), 0)
    high = min(math.ceil(corr(y["beta_slow"])), d - 1)
    if high == low:
        high += 0.001  # a flat ramp would divide by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return f / y["factor"] * ramp + f * (1 - ramp)


def rope_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """angles [S,R/2] -> (cos, signed sin) [S,R] float32 laid out for `apply_rope`: each pair's
    cos twice, and (-sin, +sin)."""
    cos, sin = angles.cos().float(), angles.sin().float()
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2j, 2j+1) of x [B,T,H,R] by cos/sin [B,T,1,R] from `rope_tables`:
    (x0 c - x1 s, x1 c + x0 s) as x * cos + swap_pairs(x) * signed_sin, a few whole-tensor ops
    with the same roundings (a - b*s == a + b*(-s) exactly)."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    return (xf * cos + swapped * sin).to(x.dtype)


# ---- attention -----------------------------------------------------------------------------------


class MLA(nn.Module):
    """Multi-head latent attention with heads split across ranks and a static latent cache."""

    def __init__(self, cfg: ModelConfig, dist: Dist, *, dtype: torch.dtype, scratch: Scratch, max_batch_size: int, max_seq_len: int):
        super().__init__()
        D, nh = cfg.hidden_size, cfg.num_attention_heads
        self.h = nh // dist.world_size
        self.nope, self.rope, self.vdim, self.c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.impl = "absorb"
        self.score_budget = 1 << 26  # attention scores held at once (elements): 256 MB in float32
        kw = dict(dtype=dtype, fp8=cfg.is_fp8, scratch=scratch, scale_fmt=cfg.scale_fmt)
        qk = self.nope + self.rope
        self.q_lora = bool(cfg.q_lora_rank)  # a plain flag: hasattr on a module raises inside when absent
        if self.q_lora:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, nh * qk, dist, **kw)
        else:
            self.q_proj = ColumnParallelLinear(D, nh * qk, dist, **kw)
        self.kv_a_proj_with_mqa = Linear(D, self.c + self.rope, **kw)
        self.kv_a_layernorm = RMSNorm(self.c, cfg.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(self.c, nh * (self.nope + self.vdim), dist, **kw)
        self.o_proj = RowParallelLinear(nh * self.vdim, D, dist, **kw)
        # One latent cache: per position the normalised latent (C) then the roped key (R).
        # Zeros, not empty: masked-out slots are multiplied by 0 and must not hold NaN.
        self.register_buffer("kv_cache", torch.zeros(max_batch_size, max_seq_len, self.c + self.rope, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor, at: "Positions") -> torch.Tensor:
        B, T, _ = x.shape
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(B, T, self.h, self.nope + self.rope)
        kva = self.kv_a_proj_with_mqa(x)  # [B,T,C+R]
        if (kern := self.c_kernels(q, kva)) is not None:
            return self.o_proj(self._absorbed_c(kern, q, kva, at).flatten(2))
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)  # [B,T,H,nope], [B,T,H,R]
        latent, k_pe = kva.split([self.c, self.rope], dim=-1)  # [B,T,C], [B,T,R]
        # One rotation for the query heads and the shared key: [B,T,H+1,R]
        q_pe, k_pe = apply_rope(torch.cat([q_pe, k_pe.unsqueeze(2)], dim=2), at.cos, at.sin).split([self.h, 1], dim=2)
        k_pe = k_pe.squeeze(2)
        new = torch.cat([self.kv_a_layernorm(latent), k_pe], dim=-1)  # [B,T,C+R]
        self.kv_cache.view(-1, new.shape[-1]).index_copy_(0, at.slots, new.view(-1, new.shape[-1]))
        S, hide = at.S, at.hide
        cache = self.kv_cache[:B, :S]  # [B,S,C+R]
        kv = cache[..., : self.c]  # [B,S,C]

        # Query positions in chunks, so a long prefill never holds more than score_budget scores.
        rows = max(1, self.score_budget // (B * self.h * S))
        if self.impl == "naive":
            return self.o_proj(self._naive(q_nope, q_pe, cache, hide, rows).flatten(2))
        w = self.kv_b_proj.dense_weight(x.dtype).view(1, self.h, self.nope + self.vdim, self.c)
        wk, wv = w[:, :, : self.nope].expand(B, -1, -1, -1), w[:, :, self.nope :].expand(B, -1, -1, -1)  # [B,H,nope|vdim,C]
        # [q_abs | q_pe] . [latent | k_pe]: both score terms in one product over the cache. Products
        # on strided views in a heads-first layout [B,H,T,*] (few rows: the C kernel, see
        # parallel.matmul_into; einsum's per-call planning costs more than decode-sized products).
        q_cat = x.new_empty(B, self.h, T, self.c + self.rope)  # [B,H,T,C+R]
        matmul_into(q_nope.transpose(1, 2), wk, q_cat[..., : self.c], nn=True)  # q_abs
        q_cat[..., self.c :] = q_pe.transpose(1, 2)
        q_cat *= self.scale
        out = x.new_empty(B, T, self.h, self.vdim)  # [B,T,H,vdim]: o_proj's input, no transpose after
        for t in range(0, T, rows):
            qp = q_cat[:, :, t : t + rows]  # [B,H,n,C+R]
            n = qp.shape[2]
            scores = matmul_into(qp.reshape(B, 1, self.h * n, -1), cache.unsqueeze(1), x.new_empty(B, 1, self.h * n, S))
            scores = scores.view(B, self.h, n, S)
            if hide is not None:
                scores.masked_fill_(hide[:, None, t : t + rows], float("-inf"))
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype).view(B, 1, self.h * n, S)
            lat = matmul_into(probs, kv.unsqueeze(1), x.new_empty(B, 1, self.h * n, self.c), nn=True)  # [B,1,H*n,C]
            matmul_into(lat.view(B, self.h, n, self.c), wv, out[:, t : t + rows].transpose(1, 2))  # [B,H,n,vdim]
        return self.o_proj(out.flatten(2))

    def c_kernels(self, q: torch.Tensor, kva: torch.Tensor):
        """The C kernels when this forward's attention can run through `_absorbed_c`: the absorbed
        path, contiguous inputs, on the CPU; a few tokens (decode, MTP verification), or any
        number where the C kernels do all the products (parallel.c_does_all_products)."""
        if self.impl != "absorb" or not (q.is_contiguous() and kva.is_contiguous()):
            return None
        kern = cpu_kernels(q)
        if kern is None or (q.shape[0] * q.shape[1] > FEW_TOKENS and not c_does_all_products(kern, q.dtype)):
            return None
        return kern

    def _absorbed_c(self, kern, q: torch.Tensor, kva: torch.Tensor, at: "Positions") -> torch.Tensor:
        """The absorbed path (cache write included) through the C kernel (cpu_gemm.c's dsv3_mla),
        the same steps and roundings as the torch code in `forward` -> [B,T,H,vdim]. A few tokens:
        one call. More (a prefill): the cache entries first, then the tokens' attention in parts
        of `rows` tokens across threads (a token's result does not depend on the part it is in)."""
        B, T = q.shape[:2]
        w = self.kv_b_proj.dense_weight(q.dtype)
        if not w.is_contiguous():
            w = w.contiguous()
        out = q.new_empty(B, T, self.h, self.vdim)
        norm, es, CR, maxS = self.kv_a_layernorm, q.element_size(), self.c + self.rope, self.kv_cache.shape[1]

        def call(b: int, t0: int, t1: int, nb: int, mode: int) -> int:  # tokens t0..t1 of sequences b..b+nb
            return kern.lib.dsv3_mla(int(q.dtype == torch.bfloat16), q.data_ptr() + (b * T + t0) * q.shape[2] * q.shape[3] * es,
                                     kva.data_ptr() + (b * T + t0) * CR * es, norm.weight.data_ptr(), norm.eps,
                                     at.cos_table.data_ptr(), at.sin_table.data_ptr(), at.pos.data_ptr() + (b * T + t0) * 8,
                                     self.kv_cache.data_ptr() + b * maxS * CR * es, maxS, w.data_ptr(), self.scale,
                                     out.data_ptr() + (b * T + t0) * self.h * self.vdim * es,
                                     nb, t1 - t0, self.h, self.nope, self.rope, self.c, self.vdim, mode)

        if B * T <= FEW_TOKENS:
            failed = call(0, 0, T, B, MLA_WRITE | MLA_ATTEND)
        else:
            failed = call(0, 0, T, B, MLA_WRITE)
            threads = c_threads(B * T * at.S * self.h * (CR + self.c))
            rows = max(1, min(16, self.score_budget // (threads * self.h * at.S)))  # the threads' scores within budget
            parts = [(b, t) for b in range(B) for t in range(0, T, rows)]
            failed = failed or run_split(len(parts), lambda j0, j1: sum(
                call(b, t, min(T, t + rows), 1, MLA_ATTEND) for b, t in parts[j0:j1]), threads)
        if failed:
            raise MemoryError("dsv3_mla: out of memory for its scratch buffers")
        return out

    def _naive(self, q_nope, q_pe, cache, hide, rows: int) -> torch.Tensor:
        """The reference path: K/V expanded from the latent cache -> [B,T,H,vdim]."""
        B, S, T = cache.shape[0], cache.shape[1], q_nope.shape[1]
        k_nope, v = self.kv_b_proj(cache[..., : self.c]).view(B, S, self.h, -1).split([self.nope, self.vdim], dim=-1)
        q_nope, q_pe = q_nope * self.scale, q_pe * self.scale
        outs = []
        for t in range(0, T, rows):
            part = slice(t, t + rows)
            scores = torch.einsum("bthd,bshd->bths", q_nope[:, part], k_nope)
            scores += torch.einsum("bthr,bsr->bths", q_pe[:, part], cache[..., self.c :])
            if hide is not None:
                scores.masked_fill_(hide[:, part].unsqueeze(2), float("-inf"))  # [B,t,H,S]
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_nope.dtype)
            outs.append(torch.einsum("bths,bshd->bthd", probs, v))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


# ---- feed-forward ----------------------------------------------------------------------------------


class MLP(nn.Module):
    """SwiGLU, tensor parallel over the intermediate dimension (dense layers, shared experts)."""

    def __init__(self, dim: int, inter: int, dist: Dist, *, reduce: bool = True, **kw):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(dim, inter, dist, **kw)
        self.up_proj = ColumnParallelLinear(dim, inter, dist, **kw)
        self.down_proj = RowParallelLinear(inter, dim, dist, reduce=reduce, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One routed expert, whole on the rank that owns it."""

    def __init__(self, dim: int, inter: int, **kw):
        super().__init__()
        self.gate_proj = Linear(dim, inter, **kw)
        self.up_proj = Linear(dim, inter, **kw)
        self.down_proj = Linear(inter, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """The router: noaux_tc (sigmoid, bias for selection only, top-2-sum groups) or V2 softmax
    (greedy, or group_limited_greedy with max-per-group)."""

    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype):
        super().__init__()
        E = cfg.n_routed_experts
        self.k, self.groups, self.topk_groups = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.method, self.score_func = cfg.topk_method, cfg.scoring_func
        self.norm, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=dtype), requires_grad=False)
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self._weight_f32: tuple[int, torch.Tensor] | None = None  # (weight version it was made from, copy)

    def weight_f32(self) -> torch.Tensor:
        """The router weight in float32: a copy made once (and again after the weight changes in
        place), not a conversion of the whole [E,D] matrix per call."""
        w = self.weight
        if w.dtype == torch.float32:
            return w
        if self._weight_f32 is None or self._weight_f32[0] != w._version:
            self._weight_f32 = (w._version, w.float())
        return self._weight_f32[1]

    @property
    def c_routable(self) -> bool:
        """DeepSeek-V3's router (noaux_tc over sigmoid scores), which `route_c` implements."""
        return self.method == "noaux_tc" and self.score_func == "sigmoid"

    def route_c(self, kern, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same as `forward` (without `want_nobias`) in one call of the C kernel
        (cpu_gemm.c's dsv3_route): x [N,D] -> weights [N,K] float32, experts [N,K] best first."""
        N, E = x.shape[0], self.weight.shape[0]
        x = x.contiguous()
        idx = torch.empty(N, self.k, dtype=torch.long)
        w = torch.empty(N, self.k, dtype=torch.float32)
        bias = self.e_score_correction_bias
        if kern.lib.dsv3_route(int(x.dtype == torch.bfloat16), x.data_ptr(), self.weight_f32().data_ptr(),
                               bias.data_ptr() if bias is not None else None, N, x.shape[1], E, self.groups,
                               self.topk_groups, self.k, int(self.norm), self.route_scale, idx.data_ptr(), w.data_ptr()):
            raise MemoryError("dsv3_route: out of memory for its scratch buffer")
        return w, idx

    def forward(self, x: torch.Tensor, want_nobias: bool = False):
        """x [N,D] -> weights [N,K] float32, experts [N,K], experts chosen without the bias [N,K] | None."""
        logits = F.linear(x.float(), self.weight_f32() if not torch.is_grad_enabled() else self.weight.float())  # [N,E]
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        idx = self._select(scores, self.e_score_correction_bias)
        nobias = self._select(scores, None) if want_nobias and self.e_score_correction_bias is not None else None
        w = scores.gather(1, idx)
        if self.norm:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.route_scale, idx, nobias

    def _select(self, scores: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s = scores if bias is None else scores + bias
        if self.groups > 1 and self.method != "greedy":
            g = s.view(s.shape[0], self.groups, -1)  # [N,G,E/G]
            group_score = g.amax(-1) if self.method != "noaux_tc" else g.topk(2, dim=-1)[0].sum(-1)
            keep = group_score.topk(self.topk_groups, dim=-1)[1]  # [N,topk_group]
            drop = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            s = g.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
        return s.topk(self.k, dim=-1)[1]


class MoE(nn.Module):
    """Routed experts split across ranks (expert parallel) plus tensor-parallel shared experts."""

    def __init__(self, cfg: ModelConfig, dist: Dist, layer_idx: int, **kw):
        super().__init__()
        self.dist, self.layer_idx = dist, layer_idx
        E, D = cfg.n_routed_experts, cfg.hidden_size
        self.lo, self.hi = split_range(E, dist)
        self.gate = Gate(cfg, dtype=kw["dtype"])
        self.experts = nn.ModuleList(
            [Expert(D, cfg.moe_intermediate_size, **kw) if self.lo <= e < self.hi else None for e in range(E)]
        )
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(D, inter, dist, reduce=False, **kw) if inter else None
        self.observer: RouteObserver | None = None
        # The local experts' weights live in two stacked tensors that each expert's parameters
        # view (so loading and state_dict see the usual per-expert names): a few tokens can then
        # gather their experts' weights and run them all in one batched product, instead of a
        # Python loop with one set of ops per expert that fired (decode is per-op-overhead bound).
        # FP8 experts keep the loop: dequantization, not op count, dominates there.
        # Gathering copies the weights: worth it only while the copy stays cache-sized (measured
        # on one CPU core: 0.9 MB gathered beats the loop by 1.4x, 6 MB loses by 1.9x).
        self.gather_budget = 1 << 20  # bytes of gathered expert weights the batched path may hold
        # Small experts: every local expert on every token, weighted by a dense routing matrix.
        # It does more arithmetic but fewer ops, and the same ops for 1 token as for 2 (MTP
        # verification); measured on dsv3-mini (8 experts of 48x96, one core): the routed part
        # 1.6x faster than the batched path at 1 and at 2 tokens.
        self.dense_budget = 1 << 19  # multiply-adds the dense path may spend (all local experts)
        # The C path's parts of the experts (see `experts_c`), fixed per layer so that results
        # do not depend on the thread count or the number of tokens: several for experts large
        # enough that reading one's weights costs more than a C call (~3 us), else one.
        I, n_local = cfg.moe_intermediate_size, self.hi - self.lo
        self.expert_parts = min(8, n_local + 1) if 3 * I * D >= (1 << 16) and n_local > 1 else 1
        self.part_budget = 32 << 20  # bytes of float32 part sums held at once
        if not kw.get("fp8"):
            dtype = kw["dtype"]
            self.register_buffer("w13", torch.empty(n_local, 2 * I, D, dtype=dtype), persistent=False)  # [E_local,2I,D]: gate|up
            self.register_buffer("w2", torch.empty(n_local, D, I, dtype=dtype), persistent=False)  # [E_local,D,I]: down
            self.pair_bytes = 3 * I * D * self.w13.element_size()  # weights gathered per (token, expert) pair
            for e in range(self.lo, self.hi):
                ex, j = self.experts[e], e - self.lo
                ex.gate_proj.weight = nn.Parameter(self.w13[j, :I], requires_grad=False)
                ex.up_proj.weight = nn.Parameter(self.w13[j, I:], requires_grad=False)
                ex.down_proj.weight = nn.Parameter(self.w2[j], requires_grad=False)
        else:
            self.w13 = self.w2 = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N,D]
        kern = self.c_kernels(x)
        if kern is not None and self.observer is None and self.gate.c_routable:
            y = self.experts_c(kern, x, *self.gate.route_c(kern, x), shared=True)
        else:
            y = self.routed(kern, x, valid)
            if self.shared_experts is not None:
                y = y + self.shared_experts(x)
        if self.dist.world_size > 1:
            tdist.all_reduce(y, group=self.dist.group)
        return y.view(shape)

    def routed(self, kern, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """The router (torch) and the routed experts, with the route shown to `observer`."""
        w, idx, nobias = self.gate(x, want_nobias=self.observer is not None)
        if self.observer is not None:
            self.observer(self.layer_idx, idx, nobias, valid)
        if kern is not None:
            return self.experts_c(kern, x, w, idx)
        if self.use_dense(x.shape[0]):
            return self.routed_dense(x, w, idx)
        if self.use_batched(idx.numel()):
            return self.routed_batched(x, w, idx)
        return self.routed_loop(x, w, idx)

    def c_kernels(self, x: torch.Tensor):
        """The C kernels when the experts can run through `experts_c`: stacked (not FP8)
        weights on the CPU, no autograd, a compiler at hand."""
        return cpu_kernels(x) if self.w13 is not None else None

    def experts_c(self, kern, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """The same as `routed_loop` (plus the shared expert when `shared`) through the C kernel
        (cpu_gemm.c's dsv3_moe): each local expert runs once on all its tokens, with float32
        activations and accumulation.

        With `expert_parts` > 1 the experts are cut into that many parts (the shared expert one
        of them) whose float32 sums are added in order, one part after the other
        (dsv3_sum_f32): the parts run on different threads, each reading only its experts'
        weights, and tokens are cut too where there are more threads than parts. A token's
        result depends on neither the other tokens nor the thread count."""
        x, w, idx = x.contiguous(), w.float().contiguous(), idx.contiguous()
        y = torch.empty_like(x)
        N, K = idx.shape
        D, I = x.shape[1], self.w2.shape[-1]
        se = self.shared_experts if shared else None
        sw = (se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight) if se is not None else ()
        sp = [t.data_ptr() for t in sw] or [None] * 3
        Is = sw[0].shape[0] if sw else 0
        bf16, es = int(x.dtype == torch.bfloat16), x.element_size()
        xp, ip, wp = x.data_ptr(), idx.data_ptr(), w.data_ptr()

        def run(t0: int, t1: int, lo: int, hi: int, with_shared: bool, out: int, f32: bool) -> int:
            """Tokens t0..t1 through the routed experts lo..hi (and the shared one) into `out`."""
            return kern.lib.dsv3_moe(bf16, xp + t0 * D * es, ip + t0 * K * 8, wp + t0 * K * 4,
                                     self.w13.data_ptr() + (lo - self.lo) * 2 * I * D * es,
                                     self.w2.data_ptr() + (lo - self.lo) * D * I * es, out, t1 - t0, K, D, I, lo, hi,
                                     *(sp if with_shared else [None] * 3), Is if with_shared else 0, int(f32))

        threads = c_threads(N * 3 * D * (K * I + Is))
        P = self.expert_parts
        if P == 1:  # one part: tokens across threads, one run each (each reads every expert's weights)
            yp = y.data_ptr()
            failed = run_split(N, lambda t0, t1: run(t0, t1, self.lo, self.hi, bool(sw), yp + t0 * D * es, False),
                               threads, per_worker=1)
        else:
            # parts: the shared expert (when there is one), then the routed experts in P - 1 ranges
            bounds = [self.lo + (self.hi - self.lo) * i // (P - 1) for i in range(P)]
            parts = [(self.lo, self.lo, True)] if sw else []
            parts += [(bounds[i], bounds[i + 1], False) for i in range(P - 1)]
            chunk = max(1, min(N, self.part_budget // (len(parts) * D * 4)))  # tokens whose parts fit the budget
            failed = 0
            for c0 in range(0, N, chunk):
                n = min(N, c0 + chunk) - c0
                acc = torch.empty(len(parts), n, D, dtype=torch.float32)
                cuts = max(1, -(-threads // len(parts)))  # token ranges per part
                jobs = [(p, c0 + n * j // cuts, c0 + n * (j + 1) // cuts) for p in range(len(parts)) for j in range(cuts)]
                jobs = [jb for jb in jobs if jb[2] > jb[1]]

                def one(j0: int, j1: int) -> int:
                    total = 0
                    for p, t0, t1 in jobs[j0:j1]:
                        lo, hi, sh = parts[p]
                        total += run(t0, t1, lo, hi, sh, acc[p, t0 - c0].data_ptr(), True)
                    return total

                failed = failed or run_split(len(jobs), one, threads, per_worker=2)
                kern.lib.dsv3_sum_f32(acc.data_ptr(), len(parts), n * D, y.data_ptr() + c0 * D * es, bf16)
        if failed:
            raise MemoryError("dsv3_moe: out of memory for its scratch buffers")
        return y

    def use_batched(self, assignments: int) -> bool:
        """The batched path for few (token, expert) pairs: its gathered weights stay under
        `gather_budget`; never under autograd (training updates the per-expert parameters)."""
        if self.w13 is None or torch.is_grad_enabled():
            return False
        return assignments * self.pair_bytes <= self.gather_budget

    def use_dense(self, tokens: int) -> bool:
        """The dense path while running every local expert on every token costs under `dense_budget`."""
        if self.w13 is None or torch.is_grad_enabled():
            return False
        return tokens * self.w13.shape[0] * (self.w13[0].numel() + self.w2[0].numel()) <= self.dense_budget

    def routed_dense(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The same as `routed_loop`, computing all local experts: an expert a token did not
        choose gets weight 0."""
        route = torch.zeros(x.shape[0], len(self.experts), dtype=x.dtype, device=x.device)
        route = route.scatter_(1, idx, w.to(x.dtype))[:, self.lo : self.hi]  # [N,E_local]
        g, u = torch.matmul(x, self.w13.transpose(1, 2)).chunk(2, dim=-1)  # [E_local,N,I] each
        out = torch.matmul(F.silu(g) * u, self.w2.transpose(1, 2))  # [E_local,N,D]
        return (out * route.t().unsqueeze(-1)).sum(0)  # [N,D]

    def routed_loop(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N,D], w/idx [N,K] -> this rank's routed output [N,D]: one pass per expert that fired."""
        y = torch.zeros_like(x)
        counts = torch.bincount(idx.flatten(), minlength=len(self.experts)).tolist()
        for e in range(self.lo, self.hi):
            if counts[e] == 0:
                continue
            tok, slot = torch.where(idx == e)
            y.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None].to(x.dtype))
        return y

    def routed_batched(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The same as `routed_loop` with a fixed number of ops: every (token, expert) pair gets
        its expert's weights gathered and all pairs run as one batched SwiGLU."""
        N, K = idx.shape
        e = idx.flatten()  # [A], A = N*K pairs
        tok = torch.arange(N, device=x.device).repeat_interleave(K)  # [A]
        wt = w.flatten()  # [A]
        if self.dist.world_size > 1:  # only the pairs whose expert lives on this rank
            mine = (e >= self.lo) & (e < self.hi)
            e, tok, wt = e[mine] - self.lo, tok[mine], wt[mine]
        xs = x[tok].unsqueeze(1)  # [A,1,D]
        gu = torch.bmm(xs, self.w13[e].transpose(1, 2))  # [A,1,2I]
        g, u = gu.chunk(2, dim=-1)  # [A,1,I] each
        out = torch.bmm(F.silu(g) * u, self.w2[e].transpose(1, 2)).squeeze(1)  # [A,D]
        return torch.zeros_like(x).index_add_(0, tok, out * wt.unsqueeze(1).to(x.dtype))


# ---- blocks ------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dist: Dist, layer_idx: int, *, dtype, scratch, max_batch_size, max_seq_len):
        super().__init__()
        kw = dict(dtype=dtype, fp8=cfg.is_fp8, scratch=scratch, scale_fmt=cfg.scale_fmt)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, dist, dtype=dtype, scratch=scratch, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg, dist, layer_idx, **kw)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dist, **kw)

    def forward(self, x, at: Positions, valid=None):
        x = x + self.self_attn(self.input_layernorm(x), at)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, valid) if isinstance(self.mlp, MoE) else self.mlp(h))


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head: ParallelHead | None = None  # the main model's head unless the file's copy is loaded


class MTP(Block):
    """The multi-token-prediction module (layer num_hidden_layers): a decoder layer fed with
    eh_proj([enorm(embed(t_{p+1})), hnorm(h_p)]), then shared_head.norm and the head."""

    def __init__(self, cfg: ModelConfig, dist: Dist, *, dtype, scratch, max_batch_size, max_seq_len):
        super().__init__(cfg, dist, cfg.num_hidden_layers, dtype=dtype, scratch=scratch, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        D = cfg.hidden_size
        self.cfg, self.dist, self.dtype = cfg, dist, dtype
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * D, D, dtype=dtype)
        self.shared_head = SharedHead(cfg)
        self.embed_tokens: VocabParallelEmbedding | None = None

    def entry(self, embed: VocabParallelEmbedding, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """eh_proj([enorm(embed(tokens)), hnorm(hidden)]): tokens [B,T], hidden [B,T,D] -> [B,T,D].
        A few bfloat16 tokens with the whole embedding on this rank go through one call of the C
        kernel (cpu_gemm.c's dsv3_mtp_entry), the same bits as the steps one by one: five ops,
        each paying its own set-up, are most of the module's cost beyond its decoder layer."""
        B, T, D = hidden.shape
        w = self.eh_proj.weight
        kern = cpu_kernels(hidden) if B * T <= FEW_TOKENS and embed.dist.world_size == 1 else None
        if kern is None or not (hidden.dtype == w.dtype == embed.weight.dtype == torch.bfloat16):
            return self.eh_proj(torch.cat([self.enorm(embed(tokens)), self.hnorm(hidden)], dim=-1))
        hidden, tokens, y = hidden.contiguous(), tokens.contiguous(), torch.empty_like(hidden)
        rc = kern.lib.dsv3_mtp_entry(tokens.data_ptr(), embed.weight.data_ptr(), embed.weight.shape[0], hidden.data_ptr(),
                                     self.enorm.weight.data_ptr(), self.enorm.eps, self.hnorm.weight.data_ptr(),
                                     self.hnorm.eps, w.data_ptr(), y.data_ptr(), B * T, D)
        if rc == -2:
            raise DsvError(f"MTP: a token id outside the vocabulary (0..{embed.weight.shape[0] - 1})")
        if rc:
            raise MemoryError("dsv3_mtp_entry: out of memory for its scratch buffer")
        return y

    def add_own_embedding_and_head(self, embedding: bool, head: bool) -> None:
        """Give the module its own copies (the checkpoint has them) instead of the main model's."""
        cfg, dev = self.cfg, self.enorm.weight.device
        with torch.device(dev):
            if embedding:
                self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, self.dist, dtype=self.dtype)
            if head:
                self.shared_head.head = ParallelHead(cfg.hidden_size, cfg.vocab_size, self.dist, dtype=self.dtype)


# ---- the model ---------------------------------------------------------------------------------------


class Transformer(nn.Module):
    """The main model (embedding, num_hidden_layers blocks, final norm, head) plus the MTP module
    when the config has one. Parameters are allocated empty; `loading.load_model` fills them.

    forward(tokens [B,T], start_pos [B]) -> (logits float32 [B,T,V], final-normed hidden [B,T,D]);
    mtp_forward(hidden, next_tokens, start_pos) -> the same for the MTP module;
    `route_observer` (None or a callable) sees every main MoE layer's routing.
    Batch row b always uses cache row b.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        dist: Dist = Dist(),
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        max_batch_size: int = 1,
        max_seq_len: int = 4096,
    ):
        super().__init__()
        check_divisible(cfg, dist)
        self.cfg, self.dist, self.dtype = cfg, dist, dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.scratch = Scratch()
        self._observer: RouteObserver | None = None
        self._last_positions: tuple[tuple, Positions] | None = None  # the last forward's, keyed by (starts, T, device)
        kw = dict(dtype=dtype, scratch=self.scratch, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        with torch.device(device):
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dist, dtype=dtype)
            self.layers = nn.ModuleList([Block(cfg, dist, i, **kw) for i in range(cfg.num_hidden_layers)])
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = ParallelHead(cfg.hidden_size, cfg.vocab_size, dist, dtype=dtype)
            self.mtp = MTP(cfg, dist, **kw) if cfg.num_nextn_predict_layers > 0 else None
            angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), rope_frequencies(cfg))  # [maxS,R/2]
            cos, sin = rope_tables(angles)  # [maxS,R] each
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def route_observer(self) -> RouteObserver | None:
        return self._observer

    @route_observer.setter
    def route_observer(self, fn: RouteObserver | None) -> None:
        """Set once here rather than on every forward: the main model's MoE layers (not the MTP module's)."""
        self._observer = fn
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.observer = fn

    @property
    def has_mtp(self) -> bool:
        return self.mtp is not None

    @property
    def attn_impl(self) -> str:
        return self.layers[0].self_attn.impl if len(self.layers) else "absorb"

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        if impl not in ("absorb", "naive"):
            raise ValueError(f"attn_impl must be 'absorb' or 'naive', not {impl!r}")
        for m in self.modules():
            if isinstance(m, MLA):
                m.impl = impl

    def _positions(self, tokens: torch.Tensor, start_pos: torch.Tensor) -> Positions:
        B, T = tokens.shape
        if B > self.max_batch_size:
            raise DsvError(f"batch of {B} sequences exceeds max_batch_size {self.max_batch_size}")
        starts = start_pos.tolist()  # the one host sync of a forward
        key = (tuple(starts), T, tokens.device)
        if self._last_positions is not None and self._last_positions[0] == key:
            return self._last_positions[1]  # the MTP forward after a verification: the same positions
        lo, S = min(starts), max(starts) + T
        if S > self.max_seq_len or lo < 0:
            raise DsvError(f"position {S - 1} is outside the cache (max_seq_len {self.max_seq_len})")
        pos = torch.tensor([range(s, s + T) for s in starts], device=tokens.device)  # [B,T]: one op, not four
        at = Positions(pos, S, T == 1 and S - 1 == lo, self.rope_cos, self.rope_sin, self.max_seq_len)
        self._last_positions = (key, at)
        return at

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start_pos: torch.Tensor, valid: torch.Tensor | None = None,
                logits_at: torch.Tensor | Sequence[int] | None = None):
        """tokens [B,T], start_pos [B] -> (logits float32 [B,T,V], final-normed hidden [B,T,D]).

        Token t of sequence b sits at position start_pos[b]+t; its K/V latent is written there.
        `valid` [B,T] (optional) only tells `route_observer` which tokens are padding.
        `logits_at` [B] (optional): the head runs only on token logits_at[b] of each sequence
        (a prefill needs the last one) and the logits are [B,V].
        """
        with forward_scope(tokens, self.dtype, self.cfg.is_fp8):
            at = self._positions(tokens, start_pos)
            flat_valid = valid.reshape(-1) if valid is not None else None
            h = self.embed_tokens(tokens)  # [B,T,D]
            for layer in self.layers:
                h = layer(h, at, flat_valid)
            h = self.norm(h)
            return self.lm_head(rows_at(h, logits_at)), h

    @torch.no_grad()
    def mtp_forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor, start_pos: torch.Tensor,
                    logits_at: torch.Tensor | Sequence[int] | None = None):
        """hidden [B,T,D] (h_p, final-normed), next_tokens [B,T] (t_{p+1}), start_pos [B]
        -> (logits float32 [B,T,V] for t_{p+2}, the module's normed hidden [B,T,D]);
        `logits_at` as in `forward`.

        Uses the MTP layer's own cache at positions p = start_pos[b]+t. The returned hidden plays
        the role of h for the next draft step.
        """
        m = self.mtp
        if m is None:
            raise DsvError("this checkpoint has no MTP layer (num_nextn_predict_layers is 0 or its tensors are absent)")
        with forward_scope(next_tokens, self.dtype, self.cfg.is_fp8):
            at = self._positions(next_tokens, start_pos)
            x = m.entry(m.embed_tokens or self.embed_tokens, next_tokens, hidden.to(self.dtype))  # [B,T,D]
            x = Block.forward(m, x, at)
            h = m.shared_head.norm(x)
            return (m.shared_head.head or self.lm_head)(rows_at(h, logits_at)), h


def rows_at(h: torch.Tensor, at: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    """h [B,T,D] -> h[b, at[b]] [B,D], or h itself when `at` is None. Views where it can (one
    row for every sequence: the usual case), not an indexing op per call."""
    if at is None:
        return h
    idx = at.tolist() if isinstance(at, torch.Tensor) else list(at)
    if all(i == idx[0] for i in idx):
        return h[:, idx[0]]
    return torch.stack([h[b, i] for b, i in enumerate(idx)])


def check_divisible(cfg: ModelConfig, dist: Dist) -> None:
    """World size must divide heads, routed experts and the tensor-parallel intermediate sizes."""
    w = dist.world_size
    n_layers = cfg.num_hidden_layers + (1 if cfg.num_nextn_predict_layers > 0 else 0)
    needs = {
        "num_attention_heads": cfg.num_attention_heads,
        "n_routed_experts": cfg.n_routed_experts,
        "intermediate_size": cfg.intermediate_size if any(not cfg.is_moe_layer(i) for i in range(n_layers)) else 0,
        "moe_intermediate_size * n_shared_experts": cfg.moe_intermediate_size * cfg.n_shared_experts if cfg.n_routed_experts else 0,
    }
    bad = [f"{k} ({v})" for k, v in needs.items() if v % w]
    if bad:
        raise DsvError(f"world size {w} does not divide {', '.join(bad)}; choose a number of processes that divides them")
