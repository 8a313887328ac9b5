"""The DeepSeek-V3 model: MLA attention over a latent KV cache, dense and MoE layers, and the MTP module.

Boundary: forward math only; no file I/O (loading.py fills the parameters), no CLI, no sampling
(generation.py). Semantics follow DESIGN.md §3 exactly. Rank and world size arrive in a `Dist`;
tensor/expert-parallel layers and their collectives are in parallel.py (plus the one all_reduce
in `MoE.forward`).

Shapes: B batch, T new tokens, S cache length read (max position + 1), D hidden, H local heads,
C kv_lora_rank, R qk_rope_head_dim, N tokens (B*T), E routed experts, K experts per token.

Every cached forward (prefill, decode, multi-token MTP verification) goes through the same
attention path, `Transformer.attn_impl`: "absorb" (default: kv_b_proj folded into the query and
the output, attention over the latent cache; `ops.mla_absorbed`) or "naive" (K/V expanded from
the latent cache through kv_b_proj; the reference). Both read and write the same cache.

How each hot operation is computed (torch, or the C kernels) is dsv3cli/ops.py's business: a
forward takes its backend from the model's `Runtime` once (`exact` when any sequence is past
position 0, see ops.py) and passes it down as `ops`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import DsvError
from .ops import Runtime, TorchOps
from .parallel import (
    ColumnParallelLinear,
    Dist,
    Linear,
    ParallelHead,
    RowParallelLinear,
    Scratch,
    VocabParallelEmbedding,
    split_range,
)


class Positions:
    """Where one forward's tokens sit, computed once and shared by every layer (and by the next
    forward at the same positions: the MTP forward after a verification). The C attention kernel
    reads only `pos` (and the whole rope tables); the torch path's tensors are made on first use,
    so a decode step does not pay for them. `ops` is the forward's backend."""

    def __init__(self, pos: torch.Tensor, S: int, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 max_seq_len: int, ops: TorchOps):
        self.ops = ops
        self.pos = pos  # [B,T] cache position of each token
        self.S = S  # cache length read: max position + 1
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


RouteObserver = Callable[[int, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


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

    def forward(self, x: torch.Tensor, at: Positions) -> torch.Tensor:
        B, T, _ = x.shape
        ops = at.ops
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x, ops), ops), ops)
        else:
            q = self.q_proj(x, ops)
        q = q.view(B, T, self.h, self.nope + self.rope)
        kva = self.kv_a_proj_with_mqa(x, ops)  # [B,T,C+R]
        if self.impl == "absorb":
            return self.o_proj(ops.mla_absorbed(self, q, kva, at).flatten(2), ops)
        return self.o_proj(self._naive(q, kva, at).flatten(2), ops)

    def _naive(self, q: torch.Tensor, kva: torch.Tensor, at: Positions) -> torch.Tensor:
        """The reference path: the cache entries written, then K/V expanded from the latent
        cache through kv_b_proj -> [B,T,H,vdim]."""
        ops, B, T = at.ops, q.shape[0], q.shape[1]
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)  # [B,T,H,nope], [B,T,H,R]
        latent, k_pe = kva.split([self.c, self.rope], dim=-1)  # [B,T,C], [B,T,R]
        # One rotation for the query heads and the shared key: [B,T,H+1,R]
        q_pe, k_pe = apply_rope(torch.cat([q_pe, k_pe.unsqueeze(2)], dim=2), at.cos, at.sin).split([self.h, 1], dim=2)
        new = torch.cat([self.kv_a_layernorm(latent, ops), k_pe.squeeze(2)], dim=-1)  # [B,T,C+R]
        self.kv_cache.view(-1, new.shape[-1]).index_copy_(0, at.slots, new.view(-1, new.shape[-1]))
        S = at.S
        cache = self.kv_cache[:B, :S]  # [B,S,C+R]
        hide = torch.arange(S, device=q.device) > at.pos.unsqueeze(-1)  # [B,T,S]
        rows = max(1, self.score_budget // (B * self.h * S))  # query positions per part: scores within budget
        k_nope, v = self.kv_b_proj(cache[..., : self.c], ops).view(B, S, self.h, -1).split([self.nope, self.vdim], dim=-1)
        q_nope, q_pe = q_nope * self.scale, q_pe * self.scale
        outs = []
        for t in range(0, T, rows):
            part = slice(t, t + rows)
            scores = torch.einsum("bthd,bshd->bths", q_nope[:, part], k_nope)
            scores += torch.einsum("bthr,bsr->bths", q_pe[:, part], cache[..., self.c :])
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

    def forward(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x, ops), self.up_proj(x, ops)), ops)


class Expert(nn.Module):
    """One routed expert, whole on the rank that owns it."""

    def __init__(self, dim: int, inter: int, **kw):
        super().__init__()
        self.gate_proj = Linear(dim, inter, **kw)
        self.up_proj = Linear(dim, inter, **kw)
        self.down_proj = Linear(inter, dim, **kw)

    def forward(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x, ops), self.up_proj(x, ops)), ops)


class Gate(nn.Module):
    """The router's parameters and its expert selection: noaux_tc (sigmoid, bias for selection
    only, top-2-sum groups) or V2 softmax (greedy, or group_limited_greedy with max-per-group);
    `ops.route` computes it."""

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

    def select(self, scores: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """scores [N,E] (+ bias, for selection only) -> the chosen experts [N,K], best first."""
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
        # The C path's parts of the experts (see ops.CpuOps.moe_experts), fixed per layer so that results
        # do not depend on the thread count or the number of tokens: several for experts large
        # enough that reading one's weights costs more than a C call (~3 us), else one.
        I, n_local = cfg.moe_intermediate_size, self.hi - self.lo
        self.cfg_inter = I  # a routed expert's width
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

    def forward(self, x: torch.Tensor, ops: TorchOps, valid: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N,D]
        w, idx, nobias = ops.route(self.gate, x, want_nobias=self.observer is not None)  # [N,K] each
        if self.observer is not None:
            self.observer(self.layer_idx, idx, nobias, valid)
        y = ops.moe_experts(self, x, w, idx)  # this rank's experts and its part of the shared ones
        if self.dist.world_size > 1:
            tdist.all_reduce(y, group=self.dist.group)
        return y.view(shape)

    def use_batched(self, assignments: int) -> bool:
        """The batched path for few (token, expert) pairs: its gathered weights stay under
        `gather_budget`."""
        if self.w13 is None:
            return False
        return assignments * self.pair_bytes <= self.gather_budget

    def use_dense(self, tokens: int) -> bool:
        """The dense path while running every local expert on every token costs under `dense_budget`."""
        if self.w13 is None:
            return False
        return tokens * self.w13.shape[0] * (self.w13[0].numel() + self.w2[0].numel()) <= self.dense_budget

    def routed_dense(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The routed experts (as ops.TorchOps computes them one expert at a time), computing all
        local experts: an expert a token did not choose gets weight 0."""
        route = torch.zeros(x.shape[0], len(self.experts), dtype=x.dtype, device=x.device)
        route = route.scatter_(1, idx, w.to(x.dtype))[:, self.lo : self.hi]  # [N,E_local]
        g, u = torch.matmul(x, self.w13.transpose(1, 2)).chunk(2, dim=-1)  # [E_local,N,I] each
        out = torch.matmul(F.silu(g) * u, self.w2.transpose(1, 2))  # [E_local,N,D]
        return (out * route.t().unsqueeze(-1)).sum(0)  # [N,D]

    def routed_batched(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The routed experts with a fixed number of ops: every (token, expert) pair gets its
        expert's weights gathered and all pairs run as one batched SwiGLU."""
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
        ops = at.ops
        x = x + self.self_attn(self.input_layernorm(x, ops), at)
        h = self.post_attention_layernorm(x, ops)
        return x + (self.mlp(h, ops, valid) if isinstance(self.mlp, MoE) else self.mlp(h, ops))


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
        self.cfg, self.dist, self.dtype, self.scratch = cfg, dist, dtype, scratch
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * D, D, dtype=dtype)  # BF16 in FP8 checkpoints too
        self.shared_head = SharedHead(cfg)
        self.embed_tokens: VocabParallelEmbedding | None = None

    def add_own_embedding_and_head(self, embedding: bool, head: bool, head_fp8: bool = False) -> None:
        """Give the module its own copies (the checkpoint has them) instead of the main model's."""
        cfg, dev = self.cfg, self.enorm.weight.device
        with torch.device(dev):
            if embedding:
                self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, self.dist, dtype=self.dtype)
            if head:
                self.shared_head.head = ParallelHead(cfg.hidden_size, cfg.vocab_size, self.dist, dtype=self.dtype,
                                                     fp8=head_fp8, scratch=self.scratch)


# ---- the model ---------------------------------------------------------------------------------------


class Transformer(nn.Module):
    """The main model (embedding, num_hidden_layers blocks, final norm, head) plus the MTP module
    when the config has one. Parameters are allocated empty; `loading.load_model` fills them.

    forward(tokens [B,T], start_pos [B]) -> (logits float32 [B,T,V], final-normed hidden [B,T,D]);
    mtp_forward(hidden, next_tokens, start_pos) -> the same for the MTP module;
    `route_observer` (None or a callable) sees every main MoE layer's routing.
    Batch row b always uses cache row b. `runtime` says where and how to compute (its dtype is
    the compute dtype); `mtp=False` leaves the MTP module out even when the config has one;
    `head_fp8` holds the head as FP8 blocks (`ParallelHead`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        dist: Dist = Dist(),
        runtime: Runtime = Runtime(),
        *,
        max_batch_size: int = 1,
        max_seq_len: int = 4096,
        mtp: bool = True,
        head_fp8: bool = False,
    ):
        super().__init__()
        check_divisible(cfg, dist)
        dtype, device = runtime.dtype, runtime.device
        self.cfg, self.dist, self.runtime, self.dtype = cfg, dist, runtime, dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.scratch = Scratch()
        self._observer: RouteObserver | None = None
        self._last_positions: tuple[tuple, Positions] | None = None  # the last forward's, keyed by (starts, T, device)
        kw = dict(dtype=dtype, scratch=self.scratch, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        with torch.device(device):
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dist, dtype=dtype)
            self.layers = nn.ModuleList([Block(cfg, dist, i, **kw) for i in range(cfg.num_hidden_layers)])
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = ParallelHead(cfg.hidden_size, cfg.vocab_size, dist, dtype=dtype, fp8=head_fp8, scratch=self.scratch)
            self.mtp = MTP(cfg, dist, **kw) if mtp and cfg.num_nextn_predict_layers > 0 else None
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
        """Where this forward's tokens sit, and its backend: exact unless every sequence starts
        at position 0 (a prefill), see ops.py."""
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
        ops = self.runtime.ops(exact=any(starts))
        at = Positions(pos, S, self.rope_cos, self.rope_sin, self.max_seq_len, ops)
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
        at = self._positions(tokens, start_pos)
        flat_valid = valid.reshape(-1) if valid is not None else None
        h = self.embed_tokens(tokens)  # [B,T,D]
        for layer in self.layers:
            h = layer(h, at, flat_valid)
        h = self.norm(h, at.ops)
        return self.lm_head(rows_at(h, logits_at), at.ops), h

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
        at = self._positions(next_tokens, start_pos)
        x = at.ops.mtp_entry(m, m.embed_tokens or self.embed_tokens, next_tokens, hidden.to(self.dtype))  # [B,T,D]
        x = Block.forward(m, x, at)
        h = m.shared_head.norm(x, at.ops)
        return (m.shared_head.head or self.lm_head)(rows_at(h, logits_at), at.ops), h


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
