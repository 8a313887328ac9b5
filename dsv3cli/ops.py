"""The seam between the model's math and fast kernels: every hot operation of a forward, as a
plain torch reference and its fast versions, chosen once per forward.

Boundary: model.py holds the model (modules, shapes, residuals, the order of operations) and
calls the operations here by name on its modules' parameters; this file holds how each one is
computed: `TorchOps`, the readable reference (also the fallback: no C compiler, CUDA), and
`CpuOps`, the C kernels of kernels/ behind typed wrappers that own every raw address, stride and
dtype flag. A `Runtime` (device, dtype, threads, kernels on or off, the CPU kernel variant) is
built once by the command and passed down; `Runtime.ops(exact)` gives the backend of a forward.
Nothing here reads the environment or changes torch's settings per call.

Exactness: a forward that decodes (any sequence past position 0: a decode step, an MTP
verification) asks for `exact` ops, whose results for a row depend on nothing but that row, so
that verifying T tokens gives the numbers of T single steps and MTP greedy output equals plain
greedy output. The C kernels are exact at every size. The torch reference is exact by computing
such forwards a row at a time (one token of one sequence, one product of one row, and the
norms, the router and the activations row by row too: torch's vectorised exp, silu and rsqrt
round differently from the scalar code it runs on a tensor's last few elements, so an element's
result depends on where it sits in the tensor), which is slow but obviously right; a prefill (every sequence from position 0) takes the batched form, and
on the CPU the fastest product there is (oneDNN where the CPU has bfloat16 dot products).

Shapes: B batch, T new tokens, S cache positions read, D hidden, H local heads, C kv_lora_rank,
R qk_rope_head_dim, N tokens (B*T), E routed experts, K experts per token, I expert width.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dsv3_kernels import cpu as cpu_build
from dsv3_kernels.cpu import run_split

from .errors import DsvError
from .fp8 import dequantize_weight
from .fp8_format import BLOCK, cdiv

if TYPE_CHECKING:
    from .model import MLA, MTP, MoE, Gate, Positions
    from .parallel import Linear, VocabParallelEmbedding

BF16 = torch.bfloat16
# A C call of at least this many multiply-adds is split across threads; below it, handing the
# parts to other threads (~20 us) costs more than they save.
PARALLEL_MACS = 1 << 20
# Up to this many rows a bfloat16 product goes through the C kernel in a prefill even where the
# CPU has bfloat16 dot products (oneDNN's blocked GEMM wins above it there); without them ours
# win at every size (Zen 3, one core, 128 rows by 512x1536: 4.0 vs 21.7 ms).
SMALL_ROWS = 32
# Where the CPU has AMX (Intel Xeon 4th generation on), oneDNN's bfloat16 products run on its
# tiles and overtake the C kernels at 8 rows (an Intel Xeon VM, one core, 7168 x 2048: 64 vs 33 G
# multiply-adds/s at 8 rows, 197 vs 33 at 32): a bfloat16 prefill's products of more rows than
# this go to torch there, the MoE experts' included; FP8 ones to cpu_gemm.c's own AMX product.
AMX_ROWS = 4
# A prefill's products of more rows than this, where the C kernels do all the products, take
# cpu_gemm.c's packed product (dsv3_gemm_prefill: weight panels converted into cache, FP8 codes
# included, then multiply-add bound tiles; Zen 3, one core, 128 rows by 7168: 37-40 against
# 21-25 G multiply-adds/s); fewer rows stream the weight through the row kernels. Elsewhere a
# prefill's FP8 products of more rows dequantize the weight into the model's scratch buffer for
# torch's product. Decode and verification always take the row kernels (a single step's bits).
PACK_ROWS = 16
MLA_WRITE, MLA_ATTEND = 1, 2  # dsv3_mla's steps: the cache entries, the attention
# A prefill's attention runs in parts of at most this many tokens (their scores stay in cache),
# on every thread there is; fewer tokens (a decode step, a verification) in one call.
ATTEND_PART = 16


@dataclass(frozen=True)
class Runtime:
    """Where and how the model computes: built once by the command, read by every operation.

    `threads` is what the C kernels split their work across (FP8 dequantization included) and
    what torch gets for its own ops; `kernels` False forces the torch reference everywhere;
    `variant` picks a C build (kernels/cpu.py's VARIANTS; None: the best this CPU runs); `debug`
    (DSV3_DEBUG=1 for the commands) reports fallbacks."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = BF16
    threads: int = 1
    kernels: bool = True
    variant: str | None = None
    debug: bool = False  # say on stderr where a fast path falls back, and why

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @functools.cached_property
    def cpu(self) -> cpu_build.CpuKernels | None:
        """The C kernels this runtime uses, or None (off, not a CPU, or no compiler)."""
        if not self.kernels or self.device.type != "cpu" or self.dtype not in (BF16, torch.float32):
            return None
        return cpu_build.load(self.variant)

    @property
    def c_does_all_products(self) -> bool:
        """The C kernels take every product, at any size: bfloat16 on a CPU without bfloat16 dot
        products, where torch's bfloat16 products are slow at every size."""
        return self.cpu is not None and self.dtype == BF16 and not self.cpu.native_bf16

    @property
    def amx(self) -> bool:
        """bfloat16 on a CPU with AMX: a prefill's products of more than AMX_ROWS rows run on the tiles."""
        return self.cpu is not None and self.cpu.amx and self.dtype == BF16

    @property
    def small_rows(self) -> int:
        """Up to this many rows a prefill's product stays in C where torch's are fast (SMALL_ROWS,
        AMX_ROWS with AMX)."""
        return AMX_ROWS if self.amx else SMALL_ROWS

    def torch_threads(self) -> int:
        """Threads for torch's own ops. One when the C kernels do all the products: torch then
        does only small elementwise work, and its OpenMP threads, which spin for a while after
        each op, would take the cores from the kernels' threads (measured, 2 cores, prefill: 164
        ms with them, 81 without)."""
        return 1 if self.c_does_all_products else self.threads

    def apply(self) -> None:
        """Set torch's thread count, once, at the start of a command."""
        torch.set_num_threads(self.torch_threads())

    @functools.cached_property
    def _backends(self) -> dict[bool, "TorchOps"]:
        if self.cpu is not None:
            return {e: CpuOps(self, e, self.cpu) for e in (False, True)}
        return {e: TorchOps(self, e and self.device.type == "cpu") for e in (False, True)}

    @functools.cached_property
    def nan_free(self) -> weakref.WeakKeyDictionary:
        """FP8 weights scanned for NaN codes (CpuOps._fp8_ready): weight -> none found."""
        return weakref.WeakKeyDictionary()

    @functools.cached_property
    def kept_weights(self) -> weakref.WeakKeyDictionary:
        """Dequantized copies of small FP8 weights that every step reads whole (TorchOps.kv_b)."""
        return weakref.WeakKeyDictionary()

    def ops(self, exact: bool) -> "TorchOps":
        """The backend of one forward; `exact`: rows must not depend on each other."""
        return self._backends[exact]

    def describe(self) -> str:
        kern = self.cpu
        where = f"C kernels ({kern.variant})" if kern is not None else "torch"
        return f"{self.device.type}, {str(self.dtype).removeprefix('torch.')}, {self.threads} thread(s), {where}"


def rank_threads() -> int:
    """This process's share of the machine's cores: OMP_NUM_THREADS when the user set it, else
    all of them, or an equal part of them when a launcher started several processes here
    (LOCAL_WORLD_SIZE, as torchrun sets it): N ranks each using every core thrash."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpu_build.default_workers() // max(1, local))


def fp8_linear_triton(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, scale_fmt: str = "e4m3") -> torch.Tensor:
    """y = x Wᵀ with W = (q, s): activations quantized per token per 128 channels, then the
    Triton block-scaled FP8 GEMM (the CUDA path; runs on CPU tensors under TRITON_INTERPRET=1)."""
    from dsv3_kernels.fp8 import act_quant, fp8_gemm  # Triton: imported only when used

    xq, xs = act_quant(x, scale_fmt)  # [..., K] fp8, [..., ceil(K/128)] float32
    return fp8_gemm(xq, xs, q, s, out_dtype=x.dtype)


def _cat_rows(fn, x2: torch.Tensor) -> torch.Tensor:
    """fn over the rows of x2 [M,K] one at a time, stacked: each row's result computed alone."""
    if x2.shape[0] <= 1:
        return fn(x2)
    return torch.cat([fn(r) for r in x2.split(1)])


class TorchOps:
    """The reference: each operation in plain torch (the readable definition of DESIGN.md §3),
    a row at a time when `exact` (see the top)."""

    name = "torch"

    def __init__(self, rt: Runtime, exact: bool):
        self.rt, self.exact = rt, exact

    # ---- products ----------------------------------------------------------------------------

    def matmul_t(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [..., K] @ w [N,K]ᵀ -> [..., N] (F.linear)."""
        if not self.exact:
            return F.linear(x, w)
        return _cat_rows(lambda r: F.linear(r, w), x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], w.shape[0])

    def dequantize(self, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        """The FP8 weight (codes q, block scales s) in `dtype`, written into `out`."""
        if q.is_cuda:
            from dsv3_kernels.fp8 import weight_dequant  # Triton: imported only when used

            return out.copy_(weight_dequant(q, s, dtype))
        return dequantize_weight(q, s, dtype, out=out, kern=None)

    def dense_weight(self, lin: "Linear", dtype: torch.dtype) -> torch.Tensor:
        """lin's weight [out, in] in `dtype`: the parameter itself, or its FP8 weight dequantized
        into the model's scratch buffer (valid until the next dequantization)."""
        if not lin.is_fp8:
            return lin.weight if lin.weight.dtype == dtype else lin.weight.to(dtype)
        buf = lin.scratch.get(tuple(lin.weight.shape), dtype, lin.weight.device)
        w = self.dequantize(lin.weight, lin.weight_scale_inv, dtype, buf)
        return w[lin.row_off : lin.row_off + lin.out_features, lin.col_off : lin.col_off + lin.in_features]

    def kv_b(self, m: "MLA", dtype: torch.dtype) -> torch.Tensor:
        """The absorbed attention's kv_b_proj weight [H*(nope+vdim), C] in `dtype`. An FP8 one is
        dequantized once and kept by the runtime (the same numbers): each step reads all of it,
        and dequantizing it again cost a decode step ~10 ms a layer at DeepSeek-V3's widths."""
        lin = m.kv_b_proj
        if not lin.is_fp8:
            return self.dense_weight(lin, dtype)
        w = self.rt.kept_weights.get(lin)
        if w is None or w.dtype != dtype:
            w = self.rt.kept_weights[lin] = self.dense_weight(lin, dtype).contiguous().clone()
        return w

    def linear(self, x: torch.Tensor, lin: "Linear") -> torch.Tensor:
        """x [..., in] -> x Wᵀ [..., out] over lin's part of the weight (dense or FP8)."""
        if lin.is_fp8 and x.is_cuda and lin.whole:
            return fp8_linear_triton(x, lin.weight, lin.weight_scale_inv, lin.scale_fmt)
        return self.matmul_t(x, self.dense_weight(lin, x.dtype))

    # ---- norms -------------------------------------------------------------------------------

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """In float32, rounded once to x's dtype."""
        if self.exact:
            return _cat_rows(lambda r: self.rms_norm_rows(r, w, eps), x.reshape(-1, x.shape[-1])).view(x.shape)
        return self.rms_norm_rows(x, w, eps)

    @staticmethod
    def rms_norm_rows(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x.float(), w.shape, w, eps).to(x.dtype)

    def swiglu(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """silu(g) * u, the activation of the experts and dense MLPs."""
        if not self.exact:
            return F.silu(g) * u
        rows = zip(g.reshape(-1, g.shape[-1]).split(1), u.reshape(-1, u.shape[-1]).split(1))
        return torch.cat([F.silu(a) * b for a, b in rows]).view(g.shape)

    # ---- attention ---------------------------------------------------------------------------

    def mla_absorbed(self, m: "MLA", q: torch.Tensor, kva: torch.Tensor, at: "Positions") -> torch.Tensor:
        """Absorbed MLA: writes this forward's cache entries (normed latent, roped key), then
        attends over the latent cache with kv_b_proj folded into the query and the output.
        q [B,T,H,nope+R], kva [B,T,C+R] -> [B,T,H,vdim]. Each sequence by itself, its tokens in
        parts that keep the scores within m.score_budget (one token a part when exact)."""
        from .model import apply_rope

        B, T = q.shape[:2]
        q_nope, q_pe = q.split([m.nope, m.rope], dim=-1)  # [B,T,H,nope], [B,T,H,R]
        latent, k_pe = kva.split([m.c, m.rope], dim=-1)  # [B,T,C], [B,T,R]
        # One rotation for the query heads and the shared key: [B,T,H+1,R]
        q_pe, k_pe = apply_rope(torch.cat([q_pe, k_pe.unsqueeze(2)], dim=2), at.cos, at.sin).split([m.h, 1], dim=2)
        new = torch.cat([self.rms_norm(latent, m.kv_a_layernorm.weight, m.kv_a_layernorm.eps), k_pe.squeeze(2)], dim=-1)
        m.kv_cache.view(-1, new.shape[-1]).index_copy_(0, at.slots, new.view(-1, new.shape[-1]))
        w = self.kv_b(m, q.dtype).view(m.h, m.nope + m.vdim, m.c)
        wk, wv = w[:, : m.nope], w[:, m.nope :]  # [H,nope,C], [H,vdim,C]
        pos = at.pos.tolist()
        rows = 1 if self.exact else max(1, m.score_budget // (m.h * at.S))
        out = q.new_empty(B, T, m.h, m.vdim)
        for b in range(B):
            cache = m.kv_cache[b]  # [maxS,C+R]
            for t in range(0, T, rows):
                p = pos[b][t : t + rows]
                S = max(p) + 1
                # [q_nope Wk | q_pe] . [latent | k_pe]: both score terms in one product
                q_abs = torch.matmul(q_nope[b, t : t + rows].transpose(0, 1), wk)  # [H,n,C]
                q_cat = torch.cat([q_abs, q_pe[b, t : t + rows].transpose(0, 1)], dim=-1) * m.scale  # [H,n,C+R]
                scores = torch.matmul(q_cat, cache[:S].t())  # [H,n,S]
                if len(p) > 1 or S != p[0] + 1:
                    hide = torch.arange(S, device=q.device) > torch.tensor(p, device=q.device).unsqueeze(-1)  # [n,S]
                    scores.masked_fill_(hide, float("-inf"))
                probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
                lat = torch.matmul(probs, cache[:S, : m.c])  # [H,n,C]
                out[b, t : t + rows] = torch.matmul(lat, wv.transpose(1, 2)).transpose(0, 1)  # [n,H,vdim]
        return out

    # ---- mixture of experts ------------------------------------------------------------------

    def route(self, gate: "Gate", x: torch.Tensor, want_nobias: bool = False):
        """The router: x [N,D] -> weights [N,K] float32, experts [N,K], and the experts chosen
        without the bias [N,K] when `want_nobias` (else None). noaux_tc: sigmoid scores, the
        bias for selection only, groups by the sum of their top two; V2: softmax, max-per-group."""
        if self.exact and x.shape[0] > 1:  # one token at a time (see the top)
            parts = [self.route(gate, r, want_nobias) for r in x.split(1)]
            w, idx, nobias = (torch.cat(p) if p[0] is not None else None for p in zip(*parts))
            return w, idx, nobias
        logits = self.matmul_t(x.float(), self.router_weight(gate))  # [N,E]
        scores = logits.sigmoid() if gate.score_func == "sigmoid" else logits.softmax(dim=-1)
        idx = gate.select(scores, gate.e_score_correction_bias)
        nobias = gate.select(scores, None) if want_nobias and gate.e_score_correction_bias is not None else None
        w = scores.gather(1, idx)
        if gate.norm:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * gate.route_scale, idx, nobias

    def router_weight(self, gate: "Gate") -> torch.Tensor:
        """The router weight in float32 (a copy kept by the gate)."""
        return gate.weight_f32()

    def moe_experts(self, moe: "MoE", x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """sum_k w[n,k] expert_idx[n,k](x[n]) over this rank's experts, plus this rank's part of
        the shared experts: x [N,D], w/idx [N,K] -> [N,D] (before the MoE's all_reduce)."""
        y = self._routed(moe, x, w, idx)
        return y if moe.shared_experts is None else y + moe.shared_experts(x, self)

    def _routed(self, moe: "MoE", x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One pass per local expert that fired, over the tokens that chose it (one token at a
        time when exact); stacked weights (not FP8) of few tokens take fewer, larger ops."""
        if not self.exact and moe.w13 is not None:
            if moe.use_dense(x.shape[0]):
                return moe.routed_dense(x, w, idx)
            if moe.use_batched(idx.numel()):
                return moe.routed_batched(x, w, idx)
        return self._expert_loop(moe, x, w, idx)

    def _expert_loop(self, moe: "MoE", x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)
        counts = torch.bincount(idx.flatten(), minlength=len(moe.experts)).tolist()
        for e in range(moe.lo, moe.hi):
            if counts[e] == 0:
                continue
            tok, slot = torch.where(idx == e)
            y.index_add_(0, tok, moe.experts[e](x[tok], self) * w[tok, slot, None].to(x.dtype))
        return y

    # ---- the MTP module's entry --------------------------------------------------------------

    def mtp_entry(self, m: "MTP", embed: "VocabParallelEmbedding", tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """eh_proj([enorm(embed(t_{p+1})), hnorm(h_p)]): tokens [B,T], hidden [B,T,D] -> [B,T,D]."""
        e = self.rms_norm(embed(tokens), m.enorm.weight, m.enorm.eps)
        h = self.rms_norm(hidden, m.hnorm.weight, m.hnorm.eps)
        return m.eh_proj(torch.cat([e, h], dim=-1), self)


class CpuOps(TorchOps):
    """The C kernels (kernels/cpu_gemm.c, cpu_ops.c, cpu_fp8.c) where they apply, the reference
    where they do not (other dtypes, strided inputs, FP8 weights the kernels cannot take, V2's
    router, a prefill's large products where oneDNN is faster). A prefill's large products on
    AVX2 take the packed product (PACK_ROWS), whose sums run in another order than the row
    kernels'. In an exact forward (a decode step, a verification) each choice depends on shapes
    that a step and a verification share, never on the number of rows, so both take the same
    path. Large calls are split across the runtime's threads; the split never changes a
    result."""

    name = "cpu"

    def __init__(self, rt: Runtime, exact: bool, kern: cpu_build.CpuKernels):
        super().__init__(rt, exact)
        self.kern, self.lib = kern, kern.lib
        self.all_products = rt.c_does_all_products
        self._told: weakref.WeakSet = weakref.WeakSet()  # FP8 weights whose fallback DSV3_DEBUG has reported
        self._fp8_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per MoE: its FP8 experts' addresses

    def threads_for(self, macs: int) -> int:
        return self.rt.threads if macs >= PARALLEL_MACS else 1

    def _c_rows(self, rows: int) -> bool:
        """Whether a product of `rows` rows runs in C (else torch): always in an exact forward
        or where the C kernels take every product; in a prefill, up to Runtime.small_rows rows."""
        return self.exact or self.all_products or rows <= self.rt.small_rows

    # ---- products ----------------------------------------------------------------------------

    def _packed(self, rows: int) -> bool:
        """Whether a product of `rows` rows takes the packed prefill product (see PACK_ROWS)."""
        return not self.exact and self.all_products and self.kern.packed_prefill and rows > PACK_ROWS

    def _prefill_product(self, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        """x [..., K] . wᵀ through dsv3_gemm_prefill: w [N,K] in x's dtype, or FP8 codes with their
        block scales s; the outputs split across threads in whole panels (a split never changes them)."""
        K, N = x.shape[-1], w.shape[0]
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = x.new_empty(*x.shape[:-1], N)
        wtype = 2 if s is not None else int(w.dtype == BF16)
        xp, wp, sp, yp = x2.data_ptr(), w.data_ptr(), s.data_ptr() if s is not None else None, out.data_ptr()
        bf16, ldx, ldw, M = int(x.dtype == BF16), x2.stride(0), w.stride(0), x2.shape[0]

        def cols(n0: int, n1: int) -> int:
            return self.lib.dsv3_gemm_prefill(bf16, wtype, xp, ldx, wp, ldw, sp, yp, N, M, K, n0, n1)

        if run_split(N, cols, self.threads_for(M * N * K), align=16):
            raise MemoryError("dsv3_gemm_prefill: out of memory for its scratch buffer")
        return out

    def matmul_t(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if w.dtype != x.dtype or x.dtype not in (BF16, torch.float32) or w.stride(-1) != 1 or not self._c_rows(rows):
            return F.linear(x, w)
        if self._packed(rows):
            return self._prefill_product(x, w, None)
        x2 = x.reshape(rows, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        N, K = w.shape
        out = x.new_empty(*x.shape[:-1], N)
        xp, wp, yp, es, bf16 = x2.data_ptr(), w.data_ptr(), out.data_ptr(), x.element_size(), int(x.dtype == BF16)
        sx, sw = x2.stride(0), w.stride(0)

        def cols(n0: int, n1: int) -> int:  # outputs n0..n1: each computed the same way whatever the split
            return self.lib.dsv3_gemm(bf16, 0, xp, wp + n0 * sw * es, yp + n0 * es, 1, 1, rows, n1 - n0, K,
                                      0, 0, sx, 0, 0, sw, 0, 0, N)

        if run_split(N, cols, self.threads_for(rows * N * K), align=8):
            raise MemoryError("dsv3_gemm: out of memory for its scratch buffer")
        return out

    def dequantize(self, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        return dequantize_weight(q, s, dtype, out=out, kern=self.kern, workers=self.rt.threads)

    def linear(self, x: torch.Tensor, lin: "Linear") -> torch.Tensor:
        """FP8 weights straight from their codes (cpu_gemm.c's dsv3_fp8_gemm: never a dequantized
        copy); dense ones through `matmul_t`."""
        rows = x.numel() // max(x.shape[-1], 1)
        tiles = not self.exact and self.rt.amx and self.kern.amx_fp8 and rows > AMX_ROWS and x.dtype == BF16
        if not lin.is_fp8 or x.dtype not in (BF16, torch.float32) or not (tiles or self._c_rows(rows)) or \
                not self._fp8_ready(lin):
            return super().linear(x, lin)
        if self._packed(rows):
            return self._prefill_product(x, lin.weight, lin.weight_scale_inv)
        if not tiles and not self.exact and rows > PACK_ROWS:  # a prefill: one dequantized weight in scratch, then torch's product
            return super().linear(x, lin)
        N, K = lin.weight.shape
        x2 = x.reshape(rows, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = x.new_empty(*x.shape[:-1], N)
        xp, qp, sp, yp = x2.data_ptr(), lin.weight.data_ptr(), lin.weight_scale_inv.data_ptr(), out.data_ptr()
        bf16, ldx = int(x.dtype == BF16), x2.stride(0)
        fn = self.lib.dsv3_fp8_gemm_amx if tiles else self.lib.dsv3_fp8_gemm

        def cols(n0: int, n1: int) -> int:  # outputs n0..n1: each computed the same way whatever the split
            return fn(bf16, xp, ldx, qp, sp, yp, N, rows, K, n0, n1)

        if run_split(N, cols, self.threads_for(rows * N * K), align=128):
            raise MemoryError(f"{fn.__name__}: out of memory for its scratch buffer")
        return out

    def _fp8_ready(self, lin: "Linear") -> bool:
        """Whether the FP8 kernels can take this weight: exactly this rank's part (a tensor-parallel
        cut inside a 128 block leaves the weight padded to whole blocks) with 128x128 block scales
        in float32. Otherwise the reference dequantizes it, and DSV3_DEBUG=1 says why (once)."""
        q, s = lin.weight, lin.weight_scale_inv
        blocks = (cdiv(q.shape[0], BLOCK), cdiv(q.shape[1], BLOCK))
        why = ("a tensor-parallel part not aligned to 128" if not lin.whole else
               f"scales {tuple(s.shape)} are not 128x128 blocks of {tuple(q.shape)}" if tuple(s.shape) != blocks or
               s.dtype != torch.float32 or not (q.is_contiguous() and s.is_contiguous()) else
               "it has NaN codes (the kernels read codes as numbers only)" if not self._nan_free(lin) else None)
        if why and self.rt.debug and lin not in self._told:
            self._told.add(lin)
            print(f"dsv3 ops: an FP8 weight {tuple(q.shape)} takes the reference path: {why}", file=sys.stderr)
        return why is None

    def _nan_free(self, lin: "Linear") -> bool:
        """No NaN code in lin's weight: known for loaded weights (loading refuses them), else
        scanned once per runtime."""
        if lin.codes_checked:
            return True
        if lin not in self.rt.nan_free:
            self.rt.nan_free[lin] = not bool(((lin.weight.view(torch.uint8) & 0x7F) == 0x7F).any())
        return self.rt.nan_free[lin]

    # ---- norms -------------------------------------------------------------------------------

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        if x.stride(-1) != 1 or x.dtype not in (BF16, torch.float32):
            return super().rms_norm(x, w, eps)
        D = x.shape[-1]
        x2 = x.reshape(-1, D)  # a view unless x's rows are unevenly spaced
        y = torch.empty(x.shape, dtype=x.dtype)
        self.lib.dsv3_rmsnorm(int(x.dtype == BF16), x2.data_ptr(), x2.stride(0), w.data_ptr(), y.data_ptr(), x2.shape[0], D, eps)
        return y

    # ---- attention ---------------------------------------------------------------------------

    def mla_absorbed(self, m: "MLA", q: torch.Tensor, kva: torch.Tensor, at: "Positions") -> torch.Tensor:
        """cpu_ops.c's dsv3_mla: the same steps and roundings as the reference. A decode or a
        verification: one call. A prefill: the cache entries first, then the tokens' attention
        in parts across threads (a token's result does not depend on its part)."""
        if not (self.exact or self.all_products) or not (q.is_contiguous() and kva.is_contiguous()):
            return super().mla_absorbed(m, q, kva, at)
        B, T = q.shape[:2]
        w = self.kv_b(m, q.dtype)
        if not w.is_contiguous():
            w = w.contiguous()
        out = q.new_empty(B, T, m.h, m.vdim)
        norm, es, CR, maxS = m.kv_a_layernorm, q.element_size(), m.c + m.rope, m.kv_cache.shape[1]

        def call(b: int, t0: int, t1: int, nb: int, mode: int) -> int:  # tokens t0..t1 of sequences b..b+nb
            return self.lib.dsv3_mla(int(q.dtype == BF16), q.data_ptr() + (b * T + t0) * q.shape[2] * q.shape[3] * es,
                                     kva.data_ptr() + (b * T + t0) * CR * es, norm.weight.data_ptr(), norm.eps,
                                     at.cos_table.data_ptr(), at.sin_table.data_ptr(), at.pos.data_ptr() + (b * T + t0) * 8,
                                     m.kv_cache.data_ptr() + b * maxS * CR * es, maxS, w.data_ptr(), m.scale,
                                     out.data_ptr() + (b * T + t0) * m.h * m.vdim * es,
                                     nb, t1 - t0, m.h, m.nope, m.rope, m.c, m.vdim, mode)

        threads = self.threads_for(B * T * at.S * m.h * (CR + m.c))
        if B * T <= ATTEND_PART:
            failed = call(0, 0, T, B, MLA_WRITE | MLA_ATTEND)
        else:
            failed = call(0, 0, T, B, MLA_WRITE)
            rows = max(1, min(ATTEND_PART, m.score_budget // (threads * m.h * at.S)))  # the threads' scores within budget
            parts = [(b, t) for b in range(B) for t in range(0, T, rows)]
            failed = failed or run_split(len(parts), lambda j0, j1: sum(
                call(b, t, min(T, t + rows), 1, MLA_ATTEND) for b, t in parts[j0:j1]), threads)
        if failed:
            raise MemoryError("dsv3_mla: out of memory for its scratch buffers")
        return out

    # ---- mixture of experts ------------------------------------------------------------------

    def route(self, gate: "Gate", x: torch.Tensor, want_nobias: bool = False):
        """cpu_ops.c's dsv3_route for DeepSeek-V3's router (noaux_tc over sigmoid scores)."""
        if want_nobias or not (gate.method == "noaux_tc" and gate.score_func == "sigmoid") or x.dtype not in (BF16, torch.float32):
            return super().route(gate, x, want_nobias)
        N, E = x.shape[0], gate.weight.shape[0]
        x = x.contiguous()
        idx = torch.empty(N, gate.k, dtype=torch.long)
        w = torch.empty(N, gate.k, dtype=torch.float32)
        bias = gate.e_score_correction_bias
        if self.lib.dsv3_route(int(x.dtype == BF16), x.data_ptr(), gate.weight_f32().data_ptr(),
                               bias.data_ptr() if bias is not None else None, N, x.shape[1], E, gate.groups,
                               gate.topk_groups, gate.k, int(gate.norm), gate.route_scale, idx.data_ptr(), w.data_ptr()):
            raise MemoryError("dsv3_route: out of memory for its scratch buffer")
        return w, idx, None

    def moe_experts(self, moe: "MoE", x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """cpu_ops.c's dsv3_moe over the stacked expert weights, or dsv3_moe_fp8 over FP8 experts'
        codes: each local expert once on all its tokens, float32 activations and sums, the
        shared expert in the same call.

        With moe.expert_parts > 1 the experts are cut into that many parts (the shared expert
        one of them) whose float32 sums are added in order (dsv3_sum_f32): the parts run on
        different threads, each reading only its experts' weights, and tokens are cut too where
        there are more threads than parts. In an exact forward a token's result depends on
        neither the other tokens nor the thread count (a prefill's experts of many tokens take
        the packed or AMX products, chosen by the tokens each call sees). With AMX, a bfloat16
        prefill's dense experts go to the reference's loop (each expert's tokens through oneDNN)."""
        amx = not self.exact and not self.all_products and self.rt.amx and x.shape[0] > AMX_ROWS
        if amx and (moe.w13 is not None or not self.kern.amx_fp8):
            return super().moe_experts(moe, x, w, idx)  # AMX: each expert's tokens through oneDNN
        fp8 = self._fp8_experts(moe) if moe.w13 is None else None  # FP8 experts the kernel can take
        if x.dtype not in (BF16, torch.float32) or (fp8 is None if moe.w13 is None else x.dtype != moe.w13.dtype):
            return super().moe_experts(moe, x, w, idx)
        x, w, idx = x.contiguous(), w.float().contiguous(), idx.contiguous()
        y = torch.empty_like(x)
        N, K = idx.shape
        D, I = x.shape[1], moe.cfg_inter
        bf16, es = int(x.dtype == BF16), x.element_size()
        xp, ip, wp = x.data_ptr(), idx.data_ptr(), w.data_ptr()
        if fp8 is None:
            se = moe.shared_experts
            sw = (se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight) if se is not None else ()
            sp = [t.data_ptr() for t in sw] or [None] * 3
            Is = sw[0].shape[0] if sw else 0
            shared = bool(sw)

            def run(t0: int, t1: int, lo: int, hi: int, with_shared: bool, out: int, f32: bool) -> int:
                """Tokens t0..t1 through the routed experts lo..hi (and the shared one) into `out`."""
                return self.lib.dsv3_moe(bf16, xp + t0 * D * es, ip + t0 * K * 8, wp + t0 * K * 4,
                                         moe.w13.data_ptr() + (lo - moe.lo) * 2 * I * D * es,
                                         moe.w2.data_ptr() + (lo - moe.lo) * D * I * es, out, t1 - t0, K, D, I, lo, hi,
                                         *(sp if with_shared else [None] * 3), Is if with_shared else 0, int(f32),
                                         packed)
        else:
            table, shared_table, Is, rest = fp8
            shared = shared_table is not None

            def run(t0: int, t1: int, lo: int, hi: int, with_shared: bool, out: int, f32: bool) -> int:
                return self.lib.dsv3_moe_fp8(bf16, xp + t0 * D * es, ip + t0 * K * 8, wp + t0 * K * 4,
                                             table.data_ptr() + (lo - moe.lo) * 6 * 8,
                                             shared_table.data_ptr() if with_shared else None, out, t1 - t0, K, D, I,
                                             lo, hi, Is if with_shared else 0, int(f32), packed)

        # a prefill's experts of many tokens (moe_drive): 2, FP8 experts on the AMX tiles
        packed = 2 if amx and fp8 is not None else int(not self.exact and self.kern.packed_prefill)
        threads = self.threads_for(N * 3 * D * (K * I + Is))
        P = moe.expert_parts
        if P == 1:  # one part: tokens across threads, one run each (each reads every expert's weights)
            yp = y.data_ptr()
            failed = run_split(N, lambda t0, t1: run(t0, t1, moe.lo, moe.hi, shared, yp + t0 * D * es, False),
                               threads, per_worker=1)
        else:
            # parts: the shared expert (when there is one), then the routed experts in P - 1 ranges
            bounds = [moe.lo + (moe.hi - moe.lo) * i // (P - 1) for i in range(P)]
            parts = [(moe.lo, moe.lo, True)] if shared else []
            parts += [(bounds[i], bounds[i + 1], False) for i in range(P - 1)]
            chunk = max(1, min(N, moe.part_budget // (len(parts) * D * 4)))  # tokens whose parts fit the budget
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
                self.lib.dsv3_sum_f32(acc.data_ptr(), len(parts), n * D, y.data_ptr() + c0 * D * es, bf16)
        if failed:
            raise MemoryError("dsv3_moe: out of memory for its scratch buffers")
        if fp8 is not None and rest:  # a shared expert the FP8 kernel cannot take (a padded tensor-parallel part)
            y += moe.shared_experts(x, self)
        return y

    def _fp8_experts(self, moe: "MoE"):
        """(the routed experts' weight addresses [E_local,6], the shared expert's [6] or None, its
        width, whether the shared expert must go through the reference), or None when a routed
        expert's weights cannot take the FP8 kernel. Made once per layer: parameters do not move."""
        if moe not in self._fp8_tables:
            def addresses(mlp) -> list[int] | None:
                lins = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
                if not all(lin.is_fp8 and self._fp8_ready(lin) for lin in lins):
                    return None
                return [a for lin in lins for a in (lin.weight.data_ptr(), lin.weight_scale_inv.data_ptr())]

            rows = [addresses(moe.experts[e]) for e in range(moe.lo, moe.hi)]
            se = moe.shared_experts
            shared = addresses(se) if se is not None else None
            if any(r is None for r in rows):
                entry = None
            else:
                entry = (torch.tensor(rows, dtype=torch.int64), None if shared is None else torch.tensor(shared, dtype=torch.int64),
                         se.gate_proj.weight.shape[0] if shared is not None else 0, se is not None and shared is None)
            self._fp8_tables[moe] = entry
        return self._fp8_tables[moe]

    # ---- the MTP module's entry --------------------------------------------------------------

    def mtp_entry(self, m: "MTP", embed: "VocabParallelEmbedding", tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """cpu_ops.c's dsv3_mtp_entry: the same bits as the steps one by one, in one call (five
        ops, each paying its own set-up, are most of the module's cost beyond its layer)."""
        w = m.eh_proj.weight
        if embed.dist.world_size != 1 or not (hidden.dtype == w.dtype == embed.weight.dtype == BF16):
            return super().mtp_entry(m, embed, tokens, hidden)
        B, T, D = hidden.shape
        hidden, tokens, y = hidden.contiguous(), tokens.contiguous(), torch.empty_like(hidden)
        rc = self.lib.dsv3_mtp_entry(tokens.data_ptr(), embed.weight.data_ptr(), embed.weight.shape[0], hidden.data_ptr(),
                                     m.enorm.weight.data_ptr(), m.enorm.eps, m.hnorm.weight.data_ptr(),
                                     m.hnorm.eps, w.data_ptr(), y.data_ptr(), B * T, D)
        if rc == -2:
            raise DsvError(f"MTP: a token id outside the vocabulary (0..{embed.weight.shape[0] - 1})")
        if rc:
            raise MemoryError("dsv3_mtp_entry: out of memory for its scratch buffer")
        return y
