"""Checkpoints in the hub layout: index + shards, the HF name table, validation, atomic writes.

Boundary: knows tensor names, shapes, dtypes and files; knows nothing of forward logic.
"""

from __future__ import annotations

import re

# Linear weights the hub stores as F8_E4M3 with a sibling `weight_scale_inv`: attention
# projections and every MLP projection (dense, routed experts, shared experts), MTP layer
# included. Embeddings, heads, norms, the router, eh_proj and shared_head.head stay BF16.
_FP8_WEIGHT = re.compile(
    r"^model\.layers\.\d+\."
    r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
SCALE_SUFFIX = "_scale_inv"


def is_fp8_weight(name: str) -> bool:
    """True for the tensors the hub stores as FP8 (with `<name>_scale_inv` beside them)."""
    return _FP8_WEIGHT.match(name) is not None


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX
