"""Triton kernels for the FP8 block format: weight quant/dequant (128x128 blocks), activation
quant (1x128 tiles), and the block-scaled FP8 GEMM the model uses on CUDA.

Boundary: numbers only, on tensors already on the device. The format's definition and float64
references are in `dsv3cli.fp8` (`quantize_weight_ref`, `dequantize_weight_ref`,
`act_quant_ref`, `fp8_gemm_ref`); the kernels must equal them (the GEMM within float32
accumulation error).

Exactness notes: divisions use `div_rn` (Triton's plain `/` on float32 is an approximate
division on NVIDIA GPUs), the ue8m0 rounding of a scale is done on its bits (no approximate
log2), and the float32 -> e4m3 cast is the hardware's round-to-nearest-even with saturation.
Under TRITON_INTERPRET=1 (the CPU) every kernel runs, but the interpreter's float32 -> float8
cast is wrong for values that round up across a power of two and for ties (DESIGN.md section 6);
the tests account for that, the kernels do not work around it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3cli.fp8_format import BLOCK, cdiv

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


@triton.jit
def _scale(amax, UE8M0: tl.constexpr):
    """float32 block amax -> float32 scale: amax floored at 1e-4, / 448, ue8m0 rounds up to 2**k."""
    s = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
    if UE8M0:
        bits = s.to(tl.int32, bitcast=True)
        e = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)  # s > 0: no sign bit
        s = (e << 23).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _block_tile(M, N, BLOCK: tl.constexpr):
    """This program's BLOCK x BLOCK tile of a row-major [M, N] tensor: (element offsets, in-bounds
    mask, offset of the tile's scale in the [cdiv(M, BLOCK), cdiv(N, BLOCK)] scale tensor)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    return offs, mask, pid_m * tl.cdiv(N, BLOCK) + pid_n


@triton.jit
def _weight_quant_kernel(x_ptr, q_ptr, s_ptr, M, N, UE8M0: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, s_off = _block_tile(M, N, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK, BLOCK]
    s = _scale(tl.max(tl.abs(x)), UE8M0)  # padding is 0: only real elements count
    q = tl.math.div_rn(x, s).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + offs, q, mask=mask)
    tl.store(s_ptr + s_off, s)


@triton.jit
def _weight_dequant_kernel(q_ptr, s_ptr, y_ptr, M, N, BLOCK: tl.constexpr):
    offs, mask, s_off = _block_tile(M, N, BLOCK)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + s_off)
    tl.store(y_ptr + offs, (q * s).to(y_ptr.dtype.element_ty), mask=mask)  # float32 product, one rounding


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, N, UE8M0: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    offs = row.to(tl.int64) * N + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    s = _scale(tl.max(tl.abs(x)), UE8M0)
    tl.store(q_ptr + offs, tl.math.div_rn(x, s).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row.to(tl.int64) * tl.cdiv(N, BLOCK) + pid_n, s)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """c[M, N] = sum over 128-wide k blocks of (a_q @ b_q^T)[block] * a_s[m, kb] * b_s[n // 128, kb]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    nk = tl.cdiv(K, BK)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]  # [BM, BK]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # [BK, BN]: b is [N, K]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * nk
    bs_ptrs = bs_ptr + (offs_n // BK).to(tl.int64) * nk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in range(nk):
        k_ok = offs_k < K - i * BK
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_s = tl.load(as_ptrs + i, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptrs + i, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BK
        b_ptrs += BK
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _ue8m0(scale_fmt: str) -> bool:
    if scale_fmt not in ("e4m3", "ue8m0"):
        raise ValueError(f"scale_fmt must be 'e4m3' or 'ue8m0', got {scale_fmt!r}")
    return scale_fmt == "ue8m0"


def weight_quant(w: torch.Tensor, scale_fmt: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, N] -> (q float8_e4m3fn [M, N], s float32 [ceil(M/128), ceil(N/128)])."""
    assert w.dim() == 2
    w = w.contiguous()
    M, N = w.shape
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(cdiv(M, BLOCK), cdiv(N, BLOCK), dtype=torch.float32, device=w.device)
    if M * N:
        _weight_quant_kernel[(s.shape[0], s.shape[1])](w, q, s, M, N, UE8M0=_ue8m0(scale_fmt), BLOCK=BLOCK, num_warps=8)
    return q, s


def weight_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q float8_e4m3fn [M, N], s float32 [ceil(M/128), ceil(N/128)] -> dtype [M, N]."""
    assert q.dim() == 2 and s.shape == (cdiv(q.shape[0], BLOCK), cdiv(q.shape[1], BLOCK))
    q, s = q.contiguous(), s.to(torch.float32).contiguous()
    M, N = q.shape
    y = torch.empty(M, N, dtype=dtype, device=q.device)
    if M * N:
        _weight_dequant_kernel[(s.shape[0], s.shape[1])](q, s, y, M, N, BLOCK=BLOCK, num_warps=8)
    return y


def act_quant(x: torch.Tensor, scale_fmt: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q float8_e4m3fn [..., K], s float32 [..., ceil(K/128)]): 1x128 tiles."""
    x = x.contiguous()
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(*x.shape[:-1], cdiv(K, BLOCK), dtype=torch.float32, device=x.device)
    if rows and K:
        _act_quant_kernel[(rows, cdiv(K, BLOCK))](x, q, s, K, UE8M0=_ue8m0(scale_fmt), BLOCK=BLOCK)
    return q, s


def fp8_gemm(
    a_q: torch.Tensor, a_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """y [..., N] = dequant(a_q [..., K], a_s [..., ceil(K/128)]) @ dequant(w_q [N, K], w_s)^T,
    accumulated in float32 one 128-wide k block at a time (the block scales applied per block)."""
    K = a_q.shape[-1]
    N = w_q.shape[0]
    assert w_q.shape[1] == K and a_s.shape[-1] == cdiv(K, BLOCK)
    assert w_s.shape == (cdiv(N, BLOCK), cdiv(K, BLOCK))
    lead = a_q.shape[:-1]
    a = a_q.reshape(-1, K).contiguous()
    a_scale = a_s.reshape(-1, a_s.shape[-1]).to(torch.float32).contiguous()
    M = a.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=a_q.device)
    if M and N:
        BM = 64 if M > 32 else 32
        grid = (cdiv(M, BM), cdiv(N, BLOCK))
        _fp8_gemm_kernel[grid](
            a, w_q.contiguous(), c, a_scale, w_s.to(torch.float32).contiguous(), M, N, K,
            BM=BM, BN=BLOCK, BK=BLOCK, num_warps=4, num_stages=3,
        )
    return c.view(*lead, N)
