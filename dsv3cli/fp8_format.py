"""The FP8 block format of the hub's checkpoints, as constants every module that reads or writes
it shares (DESIGN.md §2): E4M3 codes stored as F8_E4M3, one float32 multiplier per 128x128 block
in a sibling tensor named `<weight>_scale_inv`, scales as they are (e4m3) or powers of two (ue8m0).

Boundary: names and numbers only; no torch, so the checkpoint conversion and estimate-cost can
use it without importing torch.
"""

BLOCK = 128  # weight_block_size [128, 128]; activations are quantized per 1 x 128
SCALE_SUFFIX = "_scale_inv"  # despite the name, the multiplier: w = q * scale_inv
SCALE_FMTS = ("e4m3", "ue8m0")
F8 = "F8_E4M3"  # the safetensors dtype of the codes


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative integers: blocks covering a span."""
    return -(-a // b)
