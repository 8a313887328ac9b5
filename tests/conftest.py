"""Shared fixtures: tiny checkpoints in the hub's exact layout, made once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton kernels run on the CPU through the interpreter in tests.
os.environ.setdefault("TRITON_INTERPRET", "1")
# `python -m pytest` puts the working directory first on sys.path. From the repository's root
# its kernels/ folder (installed as dsv3_kernels) would then shadow `kernels`, a Hugging Face
# package that transformers (5.x) imports and requires.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import pytest


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory) -> Path:
    """A 3-shard BF16 tiny checkpoint (seed 0), MTP layer included. Treat it as read-only."""
    from dsv3cli.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_bf16"), seed=0, shards=3)


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory) -> Path:
    """The FP8 variant of tiny_bf16 (same seed: its weights block-quantized), with at least one
    weight_scale_inv in a different shard than its weight. Treat it as read-only."""
    from dsv3cli.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_fp8"), seed=0, fp8=True, shards=3)


@pytest.fixture(autouse=True)
def _torch_single_threaded():
    """Tests use tiny tensors: OpenMP's fork/join costs more than the ops and stalls badly on a
    busy machine. (Code under test that runs its own worker threads still does so.)"""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
