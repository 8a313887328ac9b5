"""Process groups and the tensor/expert-parallel building blocks of the model.

Boundary: knows ranks, world sizes and collectives; knows nothing of files or forward logic above
the layer level. Rank and world size always arrive in a `Dist` (never module globals). Every
collective is visible in a `forward` below (or in `MoE.forward` in model.py).

Layers here:
- `Linear`: a replicated linear; FP8 weights stay float8_e4m3fn with their 128x128 block scales
  (`weight_scale_inv`) and are dequantized on use into a shared `Scratch` buffer (CPU), or go
  through the Triton act-quant + block-scaled FP8 GEMM (CUDA, when `dsv3_kernels` has it).
- `ColumnParallelLinear` (output rows split; no collective), `RowParallelLinear` (input columns
  split; all_reduce), `VocabParallelEmbedding` (vocab rows split; all_reduce), `ParallelHead`
  (vocab rows split; all_gather of the logits).

FP8 weights split along a dimension at a cut that is not a multiple of 128 keep the whole block
rows/columns that cover the rank's part (`block_cover`), with an offset: the format stays FP8 and
the waste is under one block per side.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from dsv3_kernels.cpu import load as load_c_kernels  # None when off (DSV3_CPU_KERNEL=0) or unbuildable
from dsv3_kernels.cpu import run_split

from .errors import DsvError, PeerFailure

BLOCK = 128  # FP8 block size of the hub format (weight_block_size [128, 128])
# Below this many multiply-adds a bfloat16 product on the CPU skips oneDNN (see `linear`).
NATIVE_GEMM_MACS = 160_000
# Up to this many rows a bfloat16 product on the CPU goes through the C kernel (cpu_gemm.c), 3x
# faster than torch's at decode sizes (one core: a 1x512 by 512x512 linear 11 vs 31 us, 2 rows
# 14 vs 36 us); above it oneDNN's blocked GEMM wins where the CPU has bfloat16 dot products
# (`CpuKernels.native_bf16`). Without them, ours win at every size (Zen 3, one core, 128 rows by
# 512x1536: 4.0 vs 21.7 ms).
SMALL_ROWS = 32


def resolve_device(device: str) -> str:
    """--device auto|cpu|cuda -> the device to use; cuda asked for but absent is bad input."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DsvError("--device cuda: CUDA is not available on this machine (torch sees no GPU); use --device cpu")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, checkpoint_dtype: str | None) -> torch.dtype:
    """--dtype auto|bfloat16|float32 -> compute dtype; auto is float32 only for F32 checkpoints."""
    if dtype == "auto":
        return torch.float32 if checkpoint_dtype == "F32" else torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """torch's oneDNN (mkldnn) matmuls on or off inside the block."""
    prev = torch.backends.mkldnn.enabled
    if prev == enabled:
        yield
        return
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = prev


def few_token_gemms(x: torch.Tensor, dtype: torch.dtype):
    """oneDNN off for bfloat16 on the CPU when a forward of `x` ([B,T] token ids) has only a few
    tokens (decode, MTP drafts and verification), where its set-up, ~15 us a call on one core,
    costs more than the small products themselves (measured at decode sizes: a 64x96 linear 3.6
    vs 15.8 us, the attention's score product 14 vs 30 us). `linear` turns it back on for the few
    large products."""
    return onednn(False) if dtype == torch.bfloat16 and not x.is_cuda and x.numel() <= 4 else contextlib.nullcontext()


# The C kernels and the threads they may use, as resolved at the start of the model forward in
# progress (unset outside one): a decode step asks ~200 times, and each `load()` reads the
# environment.
_FORWARD_KERNELS: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("dsv3_forward_kernels", default=None)
# A C call of at least this many multiply-adds is split across threads; below it, handing the
# parts to other threads (~20 us) costs more than they save.
PARALLEL_MACS = 1 << 20


def c_does_all_products(kern, dtype: torch.dtype) -> bool:
    """Whether the C kernels `kern` take every product of this dtype, at any size: bfloat16 on a
    CPU without bfloat16 dot products, where torch's bfloat16 products are slow at every size."""
    return kern is not None and dtype == torch.bfloat16 and not kern.native_bf16


@contextmanager
def forward_scope(x: torch.Tensor, dtype: torch.dtype, fp8: bool = False) -> Iterator[None]:
    """The context of one model forward of `x` ([B,T] token ids): `few_token_gemms`, and the C
    kernels resolved once for all the layers, with torch's intra-op thread count.

    When the C kernels do all the products (bfloat16, not FP8, a CPU without bfloat16 dot
    products), torch is left one thread for the forward: it does only small elementwise work
    then, and its OpenMP threads, which spin for a while after each op, would take the cores
    from the kernels' threads (measured, 2 cores, benchmark prefill: 164 ms with, 81 without)."""
    kern, threads = load_c_kernels(), torch.get_num_threads()
    token = _FORWARD_KERNELS.set((kern, threads))
    one = c_does_all_products(kern, dtype) and not fp8 and threads > 1 and x.is_cpu and not torch.is_grad_enabled()
    if one:
        torch.set_num_threads(1)
    try:
        with few_token_gemms(x, dtype):
            yield
    finally:
        _FORWARD_KERNELS.reset(token)
        if one:
            torch.set_num_threads(threads)


def cpu_kernels(x: torch.Tensor):
    """The C kernels for inference on `x` (bfloat16 or float32, on the CPU, no autograd), or None."""
    if not x.is_cpu or x.dtype not in (torch.bfloat16, torch.float32) or torch.is_grad_enabled():
        return None
    resolved = _FORWARD_KERNELS.get()
    return load_c_kernels() if resolved is None else resolved[0]


def c_threads(macs: int) -> int:
    """Threads for a C call of `macs` multiply-adds: torch's intra-op count (as resolved for the
    forward in progress), one for a small call."""
    if macs < PARALLEL_MACS:
        return 1
    resolved = _FORWARD_KERNELS.get()
    return torch.get_num_threads() if resolved is None else resolved[1]


def small_gemm_kernels(x: torch.Tensor, rows: int):
    """The C kernels for a product of `rows` rows of `x` on the CPU (None: use torch): up to
    SMALL_ROWS rows (where they are also row-independent, unlike torch's); bfloat16 at any
    size without bfloat16 dot products in hardware."""
    if (kern := cpu_kernels(x)) is None:
        return None
    return kern if rows <= SMALL_ROWS or c_does_all_products(kern, x.dtype) else None


def _c_gemm(kern, nn: bool, x, w, out, B: int, H: int, M: int, N: int, K: int, sx, sw, so) -> torch.Tensor:
    """dsv3_gemm over the outputs' columns, split across threads when large (each output is
    computed the same way whatever the split)."""
    xp, wp, yp, es, bf16 = x.data_ptr(), w.data_ptr(), out.data_ptr(), x.element_size(), int(x.dtype == torch.bfloat16)
    wcol = es if nn else sw[2] * es  # bytes from one output column's weights to the next

    def cols(n0: int, n1: int) -> int:
        return kern.lib.dsv3_gemm(bf16, int(nn), xp, wp + n0 * wcol, yp + n0 * es, B, H, M, n1 - n0, K, *sx, *sw, *so)

    if run_split(N, cols, c_threads(B * H * M * N * K), align=8):
        raise MemoryError("dsv3_gemm: out of memory for its scratch buffer")
    return out


def matmul_into(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, nn: bool = False) -> torch.Tensor:
    """out = x @ wᵀ (nn: x @ w) over 4-D views: x [B,H,M,K], w [B,H,N,K] (nn: [B,H,K,N]) -> out
    [B,H,M,N]; any strides (w may be expanded, stride 0) but a contiguous last dimension.
    On the CPU few rows (see `small_gemm_kernels`) go through the C kernel; the rest, and the
    reference the tests compare with, is torch.matmul."""
    B, H, M, K = x.shape
    kern = small_gemm_kernels(x, M) if x.dtype == w.dtype == out.dtype else None
    if kern is None or x.stride(-1) != 1 or w.stride(-1) != 1 or out.stride(-1) != 1:
        return out.copy_(torch.matmul(x, w if nn else w.transpose(-1, -2)))
    N = out.shape[-1]
    return _c_gemm(kern, nn, x, w, out, B, H, M, N, K, x.stride()[:3], w.stride()[:3], out.stride()[:3])


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear; on the CPU few rows (see `small_gemm_kernels`) go through the C kernel (float32
    too: 1.2-1.8x torch's at decode sizes on Zen 3), and for bfloat16 oneDNN is used only where
    it pays: from NATIVE_GEMM_MACS multiply-adds on (at 1 row, 256x512 is 16 us natively vs
    23 us; at 2 rows oneDNN wins)."""
    if w.dtype != x.dtype or w.dtype not in (torch.bfloat16, torch.float32) or x.is_cuda:
        return F.linear(x, w)
    rows = x.numel() // max(x.shape[-1], 1)
    kern = small_gemm_kernels(x, rows)
    if kern is not None and w.stride(-1) == 1:
        x2 = x.reshape(rows, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        N, K = w.shape
        out = x.new_empty(*x.shape[:-1], N)
        return _c_gemm(kern, False, x2, w, out, 1, 1, rows, N, K, (0, 0, x2.stride(0)), (0, 0, w.stride(0)), (0, 0, N))
    if w.dtype == torch.float32:
        return F.linear(x, w)
    with onednn(rows * w.numel() > NATIVE_GEMM_MACS):
        return F.linear(x, w)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    group: Any = None


TIMEOUT_ENV = "DSV3_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0  # the first collective waits for the slowest rank to load its share of 688 GB


def collective_timeout_s() -> float:
    """Seconds a collective may wait for the other ranks (DSV3_COLLECTIVE_TIMEOUT_S, default 600)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise DsvError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds above 0, e.g. 600")
    return value


def init_distributed(device: str | torch.device = "cpu", timeout_s: float | None = None) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Returns Dist() when WORLD_SIZE is absent or 1. Multi-node works through torchrun's
    rendezvous, which sets these variables. `timeout_s` (default `collective_timeout_s()`) bounds
    every collective, so a rank that dies or stalls makes the others fail (see `peer_failures`)
    instead of waiting forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if timeout_s is None:
        timeout_s = collective_timeout_s()
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise DsvError(f"environment: WORLD_SIZE={world} but {key} is not set; start with torchrun")
    rank = int(os.environ["RANK"])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    if not tdist.is_initialized():
        tdist.init_process_group(
            "nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return Dist(rank=rank, world_size=world, group=tdist.group.WORLD)


@contextmanager
def peer_failures(dist: Dist) -> Iterator[None]:
    """Turn a collective that failed because another rank died or timed out into a DsvError."""
    try:
        yield
    except (RuntimeError, tdist.DistBackendError) as e:  # DistBackendError is a RuntimeError
        if dist.world_size <= 1 or not _looks_like_peer_failure(e):
            raise
        raise PeerFailure(
            f"rank {dist.rank}: a collective with the other {dist.world_size - 1} process(es) failed "
            f"(another rank exited or made no progress within {TIMEOUT_ENV}): {_first_line(e)}",
            stalled="timed out" in str(e).lower() or "timeout" in str(e).lower(),
        ) from e


def leave(dist: Dist) -> None:
    """Leave the process group together: a rank that exits while its gloo threads still talk to
    a peer aborts ("terminate called without an active exception")."""
    if dist.world_size > 1:
        tdist.barrier(group=dist.group)
        tdist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return re.sub(r"\[[^\]]*\.(cc|cpp|hpp):\d+\]\s*", "", lines[0])[:200]  # drop C++ source locations


def _looks_like_peer_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, tdist.DistBackendError) or any(
        w in text for w in ("connection", "timed out", "timeout", "gloo", "nccl", "peer", "closed")
    )


def split_range(total: int, dist: Dist, *, pad: bool = False) -> tuple[int, int]:
    """[lo, hi) of `total` held by this rank: an even split (pad=True: ceil parts, last one short)."""
    w = dist.world_size
    if pad:
        part = -(-total // w)
        return min(dist.rank * part, total), min((dist.rank + 1) * part, total)
    if total % w:
        raise DsvError(f"world size {w} does not divide {total}")
    part = total // w
    return dist.rank * part, (dist.rank + 1) * part


def block_cover(lo: int, hi: int, total: int) -> tuple[int, int]:
    """The FP8 block-aligned span [a0, a1) that covers [lo, hi) inside a dimension of size `total`."""
    return lo // BLOCK * BLOCK, min(-(-hi // BLOCK) * BLOCK, total)


class Scratch:
    """One reused buffer per (device, dtype) for dequantized FP8 weights, grown to the largest one.

    Only one dequantized weight is alive at a time, so the model never holds a high-precision copy
    of itself.
    """

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        key = (str(device), dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
            self.bufs[key] = buf
        return buf[:n].view(shape)


def fp8_linear_kernel(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, scale_fmt: str = "e4m3") -> torch.Tensor:
    """y = x Wᵀ with W = (q, s): activations quantized per token per 128 channels, then the
    Triton block-scaled FP8 GEMM (the CUDA path; runs on CPU tensors under TRITON_INTERPRET=1)."""
    from dsv3_kernels.fp8 import act_quant, fp8_gemm  # Triton: imported only when used

    xq, xs = act_quant(x, scale_fmt)  # [..., K] fp8, [..., ceil(K/128)] float32
    return fp8_gemm(xq, xs, q, s, out_dtype=x.dtype)


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """The FP8 weight (q, s) in `dtype`, written into `out` (the fast CPU path, or Triton on CUDA)."""
    if q.is_cuda:
        from dsv3_kernels.fp8 import weight_dequant

        return out.copy_(weight_dequant(q, s, dtype))
    from .fp8 import dequantize_weight

    return dequantize_weight(q, s, dtype, out=out)


class Linear(nn.Module):
    """y = x Wᵀ over this rank's part of a (possibly split) weight.

    `rows`/`cols` are the global [lo, hi) spans of the weight this rank computes with; an FP8
    weight stores the block-aligned cover of them and remembers the offsets.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dtype: torch.dtype,
        fp8: bool = False,
        scratch: Scratch | None = None,
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
        scale_fmt: str = "e4m3",
    ):
        super().__init__()
        self.scale_fmt = scale_fmt
        rows = rows or (0, out_features)
        cols = cols or (0, in_features)
        self.out_features, self.in_features = rows[1] - rows[0], cols[1] - cols[0]
        if fp8:
            r0, r1 = block_cover(*rows, out_features)
            c0, c1 = block_cover(*cols, in_features)
            self.row_off, self.col_off = rows[0] - r0, cols[0] - c0
            self.weight = nn.Parameter(torch.empty(r1 - r0, c1 - c0, dtype=torch.float8_e4m3fn), requires_grad=False)
            scale = torch.ones(-(-(r1 - r0) // BLOCK), -(-(c1 - c0) // BLOCK), dtype=torch.float32)
            self.register_buffer("weight_scale_inv", scale)
            self.scratch = scratch or Scratch()
        else:
            self.row_off = self.col_off = 0
            self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=dtype), requires_grad=False)
            self.weight_scale_inv = None

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == torch.float8_e4m3fn

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype`: the parameter itself, or a dequantized view of scratch
        (valid until the next dequantization)."""
        if not self.is_fp8:
            return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        buf = self.scratch.get(tuple(self.weight.shape), dtype, self.weight.device)
        w = dequantize(self.weight, self.weight_scale_inv, dtype, buf)
        return w[self.row_off : self.row_off + self.out_features, self.col_off : self.col_off + self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != torch.float8_e4m3fn:
            return linear(x, w)
        whole = self.row_off == self.col_off == 0 and tuple(w.shape) == (self.out_features, self.in_features)
        if x.is_cuda and whole:
            return fp8_linear_kernel(x, w, self.weight_scale_inv, self.scale_fmt)
        # CPU (and block-padded tensor-parallel parts): one weight at a time through scratch
        return linear(x, self.dense_weight(x.dtype))


class ColumnParallelLinear(Linear):
    """Output features split across ranks; each rank returns its slice (no collective)."""

    def __init__(self, in_features: int, out_features: int, dist: Dist, **kw: Any):
        super().__init__(in_features, out_features, rows=split_range(out_features, dist), **kw)


class RowParallelLinear(Linear):
    """Input features split across ranks; partial sums are all-reduced unless `reduce=False`
    (the caller then reduces once for several of them, as MoE does)."""

    def __init__(self, in_features: int, out_features: int, dist: Dist, *, reduce: bool = True, **kw: Any):
        super().__init__(in_features, out_features, cols=split_range(in_features, dist), **kw)
        self.dist, self.reduce = dist, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.reduce and self.dist.world_size > 1:
            tdist.all_reduce(y, group=self.dist.group)
        return y


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows split across ranks (the last part padded); all_reduce assembles rows."""

    def __init__(self, vocab_size: int, dim: int, dist: Dist, *, dtype: torch.dtype):
        super().__init__()
        self.dist = dist
        self.lo, self.hi = split_range(vocab_size, dist, pad=True)
        part = -(-vocab_size // dist.world_size)
        self.weight = nn.Parameter(torch.zeros(part, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B,T] -> [B,T,D]
        if self.dist.world_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.lo) | (ids >= self.hi)
        y = F.embedding((ids - self.lo).masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        tdist.all_reduce(y, group=self.dist.group)
        return y


class ParallelHead(nn.Module):
    """Vocabulary rows split across ranks; the float32 logits are all-gathered so that every rank
    holds the full vocabulary."""

    def __init__(self, dim: int, vocab_size: int, dist: Dist, *, dtype: torch.dtype):
        super().__init__()
        self.dist, self.vocab_size = dist, vocab_size
        part = -(-vocab_size // dist.world_size)
        self.weight = nn.Parameter(torch.zeros(part, dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,T,D] -> [B,T,V] float32
        logits = linear(x, self.weight).float()
        if self.dist.world_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.dist.world_size)]
            tdist.all_gather(parts, logits.contiguous(), group=self.dist.group)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.vocab_size]
