"""Benchmark of the CPU products at DeepSeek-V3's widths, as ratios against baselines measured in
the same run: a prefill's packed product (cpu_gemm.c's dsv3_gemm_prefill) against the row
kernels (dsv3_gemm, dsv3_fp8_gemm) and torch's float32 product; a decode's products (one row)
in GB/s of weights against a read of the same bytes.

  python benchmarks/products.py [--threads 1] [--variant avx2] [--rows 16 24 48 128]

Prints, for a 7168 -> 2048 expert weight (bfloat16 and FP8) and --rows rows, G multiply-adds/s
of each product and the packed one's ratio against the row kernels; then, for 18432 x 7168 at one
row, each format's GB/s and its share of torch's sum over the same bytes (the read bound).
"""

from __future__ import annotations

import argparse
import time

import torch

from dsv3_kernels import cpu

K, N = 7168, 2048  # hidden -> an expert's width
DECODE = (18432, 7168)  # a dense MLP's gate (larger than the CPU caches)


def best(fn, repeats: int = 5) -> float:
    fn()
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch's threads for its float32 product and the read probe")
    ap.add_argument("--variant", default=None, help="a kernels/cpu.py variant (default: the best this CPU runs)")
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 24, 48, 128])
    a = ap.parse_args()
    kern = cpu.load(a.variant)
    if kern is None:
        raise SystemExit("the C kernels could not be built here (DSV3_DEBUG=1 says why)")
    lib = kern.lib
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g).bfloat16()
    q = (torch.randn(N, K, generator=g) * 64).to(torch.float8_e4m3fn).view(torch.uint8)
    s = torch.rand(N // 128, K // 128, generator=g) / 64
    print(f"kernels {kern.variant}; the C products on one thread, torch's on {a.threads}")
    print(f"prefill, {K} -> {N} (G multiply-adds/s): packed | row kernels | torch float32")
    for M in a.rows:
        x = torch.randn(M, K, generator=g).bfloat16()
        y = torch.empty(M, N, dtype=torch.bfloat16)
        macs = M * N * K / 1e9
        pk_bf = macs / best(lambda: lib.dsv3_gemm_prefill(1, 1, x.data_ptr(), K, w.data_ptr(), K, None, y.data_ptr(), N, M, K, 0, N))
        nt_bf = macs / best(lambda: lib.dsv3_gemm(1, 0, x.data_ptr(), w.data_ptr(), y.data_ptr(), 1, 1, M, N, K,
                                                 0, 0, K, 0, 0, K, 0, 0, N))
        pk_f8 = macs / best(lambda: lib.dsv3_gemm_prefill(1, 2, x.data_ptr(), K, q.data_ptr(), K, s.data_ptr(), y.data_ptr(), N, M, K, 0, N))
        nt_f8 = macs / best(lambda: lib.dsv3_fp8_gemm(1, x.data_ptr(), K, q.data_ptr(), s.data_ptr(), y.data_ptr(), N, M, K, 0, N))
        xf, wf = x.float(), w.float()
        f32 = macs / best(lambda: xf @ wf.T)
        print(f"  {M:4d} rows  bf16 {pk_bf:5.1f} | {nt_bf:5.1f} ({pk_bf / nt_bf:.2f}x)   fp8 {pk_f8:5.1f} | {nt_f8:5.1f} "
              f"({pk_f8 / nt_f8:.2f}x)   f32 {f32:5.1f}")
    rows, cols = DECODE
    wb = torch.randn(rows, cols, generator=g).bfloat16()
    qb = (torch.randn(rows, cols, generator=g) * 64).to(torch.float8_e4m3fn).view(torch.uint8)
    sb = torch.rand(rows // 128, cols // 128, generator=g) / 64
    x = torch.randn(1, cols, generator=g).bfloat16()
    y = torch.empty(1, rows, dtype=torch.bfloat16)
    t_bf = best(lambda: lib.dsv3_gemm(1, 0, x.data_ptr(), wb.data_ptr(), y.data_ptr(), 1, 1, 1, rows, cols,
                                      0, 0, cols, 0, 0, cols, 0, 0, rows))
    t_f8 = best(lambda: lib.dsv3_fp8_gemm(1, x.data_ptr(), cols, qb.data_ptr(), sb.data_ptr(), y.data_ptr(), rows, 1, cols, 0, rows))
    as_f32 = wb.view(torch.float32)  # the same bytes, read by torch's sum
    t_rd = best(lambda: as_f32.sum())
    read = wb.numel() * 2 / t_rd / 1e9
    print(f"decode, one row of {rows} x {cols} (GB/s of weights; a read of the BF16 bytes: {read:.1f} GB/s)")
    print(f"  bf16 {wb.numel() * 2 / t_bf / 1e9:5.1f} ({wb.numel() * 2 / t_bf / 1e9 / read:.0%})   "
          f"fp8 {qb.numel() / t_f8 / 1e9:5.1f} ({qb.numel() / t_f8 / 1e9 / read:.0%})")


if __name__ == "__main__":
    main()
