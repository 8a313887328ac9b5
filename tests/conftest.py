"""Shared fixtures: tiny checkpoints in the hub's exact layout, made once per session."""

from __future__ import annotations

import os

# Triton kernels run on the CPU through the interpreter in tests.
os.environ.setdefault("TRITON_INTERPRET", "1")
