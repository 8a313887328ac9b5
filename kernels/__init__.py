"""Kernels for the FP8 block format, installed as `dsv3_kernels`: Triton kernels for CUDA
(`fp8`) and fused C kernels for the CPU (`cpu`, compiled from `cpu_fp8.c` and `cpu_gemm.c` on first use).

Each kernel has a torch reference in `dsv3cli.fp8`; tests compare them (the Triton ones on the
CPU through Triton's interpreter, TRITON_INTERPRET=1).
"""
