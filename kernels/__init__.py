"""Triton kernels for the FP8 block format, installed as `dsv3_kernels`.

Each kernel has a torch reference in `dsv3cli.fp8`; tests compare them (on the CPU through
Triton's interpreter, TRITON_INTERPRET=1).
"""
