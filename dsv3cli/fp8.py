"""The FP8 block format (E4M3, 128x128 weight blocks, 1x128 activation tiles): float64
references and fast CPU paths on torch tensors.

Boundary: this module owns the numbers (scales, rounding, codes). The conversion of a
checkpoint folder is `dsv3cli.convert` (re-exported here: `convert_checkpoint`).
Triton versions of the same kernels live in `dsv3_kernels.fp8` (used on CUDA); fused C
versions of the CPU paths in `dsv3_kernels.cpu` (used when a C compiler is at hand, unless
DSV3_CPU_KERNEL=0; the torch paths here are their fallback and a second reference).

The format, exactly (each fast path and kernel must equal the `*_ref` function bit for bit):
- Weight blocks are 128x128 (activation tiles 1x128); a block at a ragged edge uses only its
  real elements.
- `amax = max|w|` over the block, floored at float32(1e-4) as the official kernel does, so an
  all-zero block stores `s = float32(float32(1e-4) / 448)` (about 2.2e-7; ue8m0: 2**-22) and
  codes 0. Blocks whose amax is below 1e-4 get that same scale.
- `s = float32(amax / 448)`; with `scale_fmt="ue8m0"`: `s = 2**ceil(log2 s)` (a power of two).
- `q = e4m3(round_nearest_even(float32(w / s)))`, saturated at +-448.
- Dequantize: `w = dtype(float32(float32(q) * s))`: the product is the float32 product (as the
  official code and the Triton kernel compute it), then rounded once to the output dtype.
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from dsv3_kernels.cpu import default as load_c_kernels  # None when off (DSV3_CPU_KERNEL=0) or unbuildable
from dsv3_kernels.cpu import default_workers

from .fp8_format import BLOCK, SCALE_FMTS, cdiv

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4  # the official kernel's floor: keeps an all-zero block from dividing by zero

_FP8 = torch.float8_e4m3fn
# Elements per work chunk (at most 128 rows). Measured on a 2-core EPYC: per-op dispatch costs
# more than L2 misses, so 1M elements (a 4 MB float32 temporary, in L3) beat L2-sized chunks:
# dequantization CPU time 0.60 ns/element at 2**20 vs 0.85 at 2**17 and 1.25 at 2**15.
_CHUNK = 1 << 20
_PARALLEL_MIN = 1 << 21  # below this many elements one thread is faster than a pool


def _check_fmt(scale_fmt: str) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")


# ---------------------------------------------------------------- float64 references


def _round_ref(x: torch.Tensor, mant_bits: int, emin: int) -> torch.Tensor:
    """Round float64 `x` to a binary format with `mant_bits` stored mantissa bits and minimum
    normal exponent `emin` (subnormals below), nearest-even; no overflow handling."""
    a = x.abs()
    _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1): floor(log2 a) = e - 1
    e = (e.to(torch.int64) - 1).clamp(min=emin)
    quantum = torch.ldexp(torch.ones_like(a), (e - mant_bits).to(torch.float64))
    return torch.copysign(torch.round(a / quantum) * quantum, x)  # round(): ties to even


_FORMATS = {  # dtype -> (stored mantissa bits, minimum normal exponent)
    torch.float32: (23, -126),
    torch.bfloat16: (7, -126),
    torch.float16: (10, -14),
    _FP8: (3, -6),
}


def _scales_ref(amax: torch.Tensor, scale_fmt: str) -> torch.Tensor:
    """float64 block amax -> float32 scales. float64 division of float32 operands, then one
    rounding to float32, equals float32 division (53 >= 2*24 + 2: double rounding is harmless)."""
    amax = amax.clamp(min=float(torch.tensor(AMAX_FLOOR, dtype=torch.float32)))
    s = (amax / FP8_MAX).to(torch.float32).to(torch.float64)
    if scale_fmt == "ue8m0":
        m, e = torch.frexp(s)  # s = m * 2**e; ceil(log2 s) = e - 1 exactly when m == 0.5
        p2 = torch.ldexp(torch.ones_like(s), (e - (m == 0.5).to(e.dtype)).to(torch.float64))
        s = torch.where(torch.isfinite(s), p2, s)  # NaN/Inf stay (frexp would make them 1)
    return s.to(torch.float32)


def _quantize_ref(w: torch.Tensor, br: int, bc: int, scale_fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_fmt(scale_fmt)
    o, i = w.shape
    x = w.to(torch.float64)
    nr, nc = cdiv(o, br), cdiv(i, bc)
    pad = torch.zeros(nr * br, nc * bc, dtype=torch.float64)  # zeros never change an amax
    pad[:o, :i] = x.abs()
    amax = pad.view(nr, br, nc, bc).amax(dim=(1, 3))  # [nr, nc]
    s = _scales_ref(amax, scale_fmt)
    s_full = s.to(torch.float64).repeat_interleave(br, 0).repeat_interleave(bc, 1)[:o, :i]
    y = (x / s_full).to(torch.float32).to(torch.float64)  # float32(w / s), one rounding
    q = _round_ref(y, 3, -6).clamp(-FP8_MAX, FP8_MAX)
    return q.to(_FP8), s  # exact: q is representable


def quantize_weight_ref(w: torch.Tensor, scale_fmt: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of `quantize_weight`: w [o, i] -> (q float8_e4m3fn [o, i], s float32 [ceil(o/128), ceil(i/128)])."""
    return _quantize_ref(w, BLOCK, BLOCK, scale_fmt)


def act_quant_ref(x: torch.Tensor, scale_fmt: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of `act_quant`: x [..., k] -> (q [..., k], s float32 [..., ceil(k/128)])."""
    lead, k = x.shape[:-1], x.shape[-1]
    q, s = _quantize_ref(x.reshape(math.prod(lead), k), 1, BLOCK, scale_fmt)
    return q.view(*lead, k), s.view(*lead, s.shape[-1])


def dequantize_weight_ref(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """float64 reference of `dequantize_weight`: exact product, rounded to float32, then to `dtype`."""
    o, i = q.shape
    # float8 -> float64 through a table of the 256 codes, so the reference does not use the
    # conversion it checks.
    table = _code_values_ref()
    qv = table[q.view(torch.uint8).long()]
    s_full = s.to(torch.float64).repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:o, :i]
    p = _round_ref(qv * s_full, 23, -126)  # exact product (4 x 24 bits), rounded to float32
    if dtype != torch.float32:
        mant, emin = _FORMATS[dtype]
        p = _round_ref(p, mant, emin)
    return p.to(dtype)  # exact: p is representable


def fp8_gemm_ref(a_q: torch.Tensor, a_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
    """float64 reference of the block-scaled FP8 GEMM: a_q [..., k] with 1x128 scales a_s
    [..., ceil(k/128)], w_q [n, k] with 128x128 scales w_s -> float64 [..., n]. Each 128-wide
    k block's partial product is exact in float64 before its two scales are applied."""
    k = a_q.shape[-1]
    n = w_q.shape[0]
    table = _code_values_ref()
    a = table[a_q.reshape(-1, k).view(torch.uint8).long()]  # [m, k]
    w = table[w_q.view(torch.uint8).long()]  # [n, k]
    a_scale = a_s.reshape(-1, a_s.shape[-1]).to(torch.float64)  # [m, kb]
    w_scale = w_s.to(torch.float64).repeat_interleave(BLOCK, 0)[:n]  # [n, kb]
    out = torch.zeros(a.shape[0], n, dtype=torch.float64)
    for b, k0 in enumerate(range(0, k, BLOCK)):
        part = a[:, k0 : k0 + BLOCK] @ w[:, k0 : k0 + BLOCK].T  # [m, n]
        out += part * a_scale[:, b : b + 1] * w_scale[:, b][None, :]
    return out.view(*a_q.shape[:-1], n)


def _code_values_ref() -> torch.Tensor:
    """The value of each of the 256 E4M3FN codes, from the bit layout (1 sign, 4 exponent bits
    with bias 7, 3 mantissa bits; S.1111.111 is NaN; no infinities)."""
    vals = []
    for c in range(256):
        sign = -1.0 if c & 0x80 else 1.0
        e, m = (c >> 3) & 0xF, c & 0x7
        if e == 0xF and m == 0x7:
            vals.append(math.nan)
        elif e == 0:
            vals.append(sign * m * 2.0**-9)
        else:
            vals.append(sign * (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


# ---------------------------------------------------------------- fast CPU paths


def _block_scales(amax: torch.Tensor, scale_fmt: str) -> torch.Tensor:
    """float32 amax per block -> float32 scales (float32 arithmetic, as the formula says)."""
    s = amax.clamp(min=AMAX_FLOOR) / FP8_MAX
    if scale_fmt == "ue8m0":
        m, e = torch.frexp(s)
        p2 = torch.ldexp(torch.ones_like(s), e - (m == 0.5).to(e.dtype)).to(torch.float32)
        s = torch.where(torch.isfinite(s), p2, s)  # NaN/Inf stay non-finite, as in the reference
    return s


@contextlib.contextmanager
def _single_threaded():
    """torch single-threaded for small ops: OpenMP's fork/join on each small op costs more
    than the op, and stalls for milliseconds on a busy machine."""
    prev = torch.get_num_threads()
    if prev == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _run_inline(n: int, work: Callable[[Sequence[int]], None]) -> None:
    """Small tensors: this thread, torch single-threaded."""
    with _single_threaded():
        work(range(n))


def _run_parallel(n: int, work: Callable[[Sequence[int]], None], workers: int) -> None:
    """Run `work(indices)` over range(n) split round-robin across `workers` threads.
    torch releases the GIL inside its ops, so threads give real parallelism. Each thread keeps
    torch single-threaded: small ops on cache-sized chunks lose to OpenMP's fork/join (badly so
    on a busy machine), and two levels of parallelism would fight over the cores."""
    workers = max(1, min(workers, n))
    prev = torch.get_num_threads()

    def one(k: int) -> None:
        torch.set_num_threads(1)  # this thread's OpenMP team only (and the default for new threads)
        work(range(k, n, workers))

    try:
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(one, k) for k in range(workers)]:
                f.result()
    finally:
        torch.set_num_threads(prev)


def _quantize_c(kern, w: torch.Tensor, br: int, scale_fmt: str, workers: int | None, out: torch.Tensor | None):
    """`_quantize_fast` by the C kernel, for contiguous bfloat16/float32 `w` [o, i] on the CPU."""
    o, i = w.shape
    q = torch.empty(o, i, dtype=_FP8) if out is None else out
    s = torch.empty(cdiv(o, br), cdiv(i, BLOCK), dtype=torch.float32)
    if o * i:
        kern.quantize(w.data_ptr(), q.data_ptr(), s.data_ptr(), o, i, br=br, in_f32=w.dtype == torch.float32,
                      ue8m0=scale_fmt == "ue8m0", workers=workers)
    return q, s


_INT_OF = {2: torch.int16, 4: torch.int32}


def _block_amax(x: torch.Tensor, br: int, nc: int) -> torch.Tensor:
    """x [r, i] float -> float32 max|x| per (row block of br, 128 columns) [ceil(r/br), nc].
    Non-negative floats order like their bit patterns, so the max runs on integers (abs is an
    AND of the sign bit; NaN and Inf stay above every finite value)."""
    r, i = x.shape
    it = _INT_OF[x.element_size()]
    mag = torch.bitwise_and(x.view(it), torch.iinfo(it).max)  # [r, i] bits of |x|
    full = (i // BLOCK) * BLOCK
    parts = []
    if full:
        parts.append(mag[:, :full].reshape(r, full // BLOCK, BLOCK).amax(dim=2))  # [r, full/128]
    if full < i:
        parts.append(mag[:, full:].amax(dim=1, keepdim=True))  # the ragged last block
    m = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [r, nc]
    if br > 1:
        nr = cdiv(r, br)
        if r % br:
            m = torch.cat([m, torch.zeros(nr * br - r, nc, dtype=m.dtype)])  # zero bits: 0.0
        m = m.view(nr, br, nc).amax(dim=1)  # [nr, nc]
    return m.view(x.dtype).to(torch.float32)


def _quantize_fast(
    w: torch.Tensor, br: int, scale_fmt: str, workers: int | None, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [o, i] (float32/bfloat16/float16) -> (q [o, i], s [ceil(o/br), ceil(i/128)]); br = 128 or 1."""
    _check_fmt(scale_fmt)
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        w = w.to(torch.float32)
    o, i = w.shape
    nr, nc = cdiv(o, br), cdiv(i, BLOCK)
    ip = nc * BLOCK
    q = torch.empty(o, i, dtype=_FP8) if out is None else out
    s = torch.empty(nr, nc, dtype=torch.float32)
    # A job is one 128-row block of a weight, or a bunch of rows of activations.
    rows_per_job = br if br > 1 else max(1, _CHUNK // max(ip, 1))
    njobs = cdiv(o, rows_per_job)
    if o * i == 0:
        return q, s

    def work(jobs: Sequence[int]) -> None:
        buf = torch.zeros(rows_per_job, ip, dtype=torch.float32)  # the padding stays 0 (0 / s = 0)
        for j in jobs:
            r0 = j * rows_per_job
            r1 = min(o, r0 + rows_per_job)
            wj = w[r0:r1]
            sj = _block_scales(_block_amax(wj, br, nc), scale_fmt)  # [1 or rows, nc]
            s[r0 // br : r0 // br + sj.shape[0]] = sj
            x = buf[: r1 - r0]
            x[:, :i].copy_(wj)  # exact widening to float32
            # float32(w / s), one rounding; |w / s| <= 448 * (1 + 2**-23) < 464, so the cast
            # below rounds it to at most 448: saturation needs no clamp.
            x.view(r1 - r0, nc, BLOCK).div_(sj.view(-1, nc, 1))
            q[r0:r1].copy_(x[:, :i])  # float32 -> e4m3, nearest-even

    if o * i < _PARALLEL_MIN:
        _run_inline(njobs, work)
    else:
        _run_parallel(njobs, work, default_workers() if workers is None else workers)
    return q, s


def quantize_weight(
    w: torch.Tensor, scale_fmt: str = "e4m3", *, workers: int | None = None, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [o, i] -> (q float8_e4m3fn [o, i], s float32 [ceil(o/128), ceil(i/128)]) on the CPU,
    bit-identical to `quantize_weight_ref`; q is written into `out` (contiguous, [o, i]) when
    given. Non-finite weights give non-finite scales."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight, got shape {tuple(w.shape)}")
    if out is not None and (out.dtype != _FP8 or tuple(out.shape) != tuple(w.shape) or not out.is_contiguous()):
        raise ValueError("out must be a contiguous float8_e4m3fn tensor of the weight's shape")
    _check_fmt(scale_fmt)
    kern = load_c_kernels() if w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float32) else None
    if kern is not None:
        return _quantize_c(kern, w.contiguous(), BLOCK, scale_fmt, workers, out)
    return _quantize_fast(w.contiguous(), BLOCK, scale_fmt, workers, out)


def act_quant(x: torch.Tensor, scale_fmt: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., k] -> (q float8_e4m3fn [..., k], s float32 [..., ceil(k/128)]): per token per 128 channels."""
    _check_fmt(scale_fmt)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(math.prod(lead), k).contiguous()  # [tokens, k] (k may be 0)
    kern = load_c_kernels() if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) else None
    if kern is not None:
        q, s = _quantize_c(kern, x2, 1, scale_fmt, None, None)
    else:
        q, s = _quantize_fast(x2, 1, scale_fmt, None)
    return q.view(*lead, k), s.view(*lead, s.shape[-1])


def _dequant_slow(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    o, i = q.shape
    s_full = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:o, :i]
    out.copy_(q.to(torch.float32) * s_full)
    return out


# float32 bits of (fp8 value * 2**-120) are the fp8 bits moved into place: sign to bit 31,
# exponent and mantissa to bits 26..20. E4M3 subnormals become float32 subnormals, so one
# multiply by (s * 2**120) both restores the exponent bias and applies the scale, exactly
# as float32(q) * s would round it.
_BIAS = 2.0**120
_DEFAULT = object()  # dequantize_weight's kern when not given
_BITS_MASK = 0x87F00000 - (1 << 32)  # as int32


def dequantize_weight(
    q: torch.Tensor,
    s: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    *,
    workers: int | None = None,
    kern=_DEFAULT,
) -> torch.Tensor:
    """q float8_e4m3fn [o, i], s float32 [ceil(o/128), ceil(i/128)] -> w `dtype` [o, i],
    bit-identical to `dequantize_weight_ref`; writes into `out` when given. `kern`: the C kernels
    to use (None: the torch path; default: the best ones unless switched off)."""
    if q.dim() != 2:
        raise ValueError(f"dequantize_weight expects a 2-D weight, got shape {tuple(q.shape)}")
    o, i = q.shape
    nr, nc = cdiv(o, BLOCK), cdiv(i, BLOCK)
    if tuple(s.shape) != (nr, nc):
        raise ValueError(f"scale shape {tuple(s.shape)} does not match weight {tuple(q.shape)}: expected {(nr, nc)}")
    if out is None:
        out = torch.empty(o, i, dtype=dtype)
    q = q.contiguous()
    s = s.to(torch.float32).contiguous()
    if o * i == 0:
        return out
    if kern is _DEFAULT:
        kern = load_c_kernels()
    if kern is not None and q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32):  # NaN codes and any scale

        res = out if out.dtype == dtype and out.is_contiguous() else torch.empty(o, i, dtype=dtype)
        kern.dequantize(q.data_ptr(), s.data_ptr(), res.data_ptr(), o, i, out_f32=dtype == torch.float32, workers=workers)
        return res if res is out else out.copy_(res)
    qb = q.view(torch.uint8)
    # Codes 0x7f / 0xff are NaN; the bit path would read them as 480: let torch handle those.
    with _single_threaded() if o * i < _PARALLEL_MIN else contextlib.nullcontext():
        slow = bool(qb.max() == 255) or bool(qb.view(torch.int8).max() == 127) or bool(s.abs().max() >= 2.0**7)
    if slow:
        return _dequant_slow(q, s, dtype, out)
    sx_all = s * _BIAS  # exact: a power-of-two multiply without overflow (s < 2**7)
    rows = max(1, min(BLOCK, _CHUNK // max(i, 1)))
    njobs = nr * cdiv(BLOCK, rows)
    per_block = cdiv(BLOCK, rows)
    def work(jobs: Sequence[int]) -> None:
        t = torch.empty(rows, i, dtype=torch.int32)
        last_b = -1
        for j in jobs:
            b, k = divmod(j, per_block)
            r0 = b * BLOCK + k * rows
            r1 = min(o, r0 + rows, (b + 1) * BLOCK)
            if r0 >= r1:
                continue
            if b != last_b:
                sx = sx_all[b].repeat_interleave(BLOCK)[:i]  # [i]: this block row's column scales
                last_b = b
            tc = t[: r1 - r0]
            tc.copy_(qb[r0:r1].view(torch.int8))  # sign-extend each code to 32 bits
            tc.bitwise_left_shift_(20).bitwise_and_(_BITS_MASK)
            f = tc.view(torch.float32)  # fp8 value * 2**-120
            if dtype == torch.float32:
                torch.mul(f, sx, out=out[r0:r1])
            else:
                f.mul_(sx)  # float32(q * s): the one float32 rounding
                out[r0:r1].copy_(f)  # rounded once to the output dtype

    if o * i < _PARALLEL_MIN:
        _run_inline(njobs, work)
    else:
        _run_parallel(njobs, work, default_workers() if workers is None else workers)
    return out
