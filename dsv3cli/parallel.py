"""Process groups and the tensor/expert-parallel building blocks of the model.

Boundary: knows ranks, world sizes and collectives; knows nothing of files or forward logic above
the layer level. Rank and world size always arrive in a `Dist` (never module globals). Every
collective is visible in a `forward` below (or in `MoE.forward` in model.py).

Layers here (parameters and collectives; how a product is computed is dsv3cli.ops's business,
reached through the `ops` backend each forward passes down):
- `Linear`: a replicated linear; FP8 weights stay float8_e4m3fn with their 128x128 block scales
  (`weight_scale_inv`), and `Scratch` is the model's one buffer for dequantized copies.
- `ColumnParallelLinear` (output rows split; no collective), `RowParallelLinear` (input columns
  split; all_reduce), `VocabParallelEmbedding` (vocab rows split; all_reduce), `ParallelHead`
  (vocab rows split; all_gather of the logits).

FP8 weights split along a dimension at a cut that is not a multiple of 128 keep the whole block
rows/columns that cover the rank's part (`block_cover`), with an offset: the format stays FP8 and
the waste is under one block per side.
"""

from __future__ import annotations

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

from .errors import DsvError, PeerFailure
from .fp8_format import BLOCK



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
            self.codes_checked = False  # no NaN code in weight: set by the loader, which refuses them
        else:
            self.row_off = self.col_off = 0
            self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=dtype), requires_grad=False)
            self.weight_scale_inv = None

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == torch.float8_e4m3fn

    @property
    def whole(self) -> bool:
        """The stored weight is exactly this rank's part (no block-cover padding)."""
        return self.row_off == self.col_off == 0 and tuple(self.weight.shape) == (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        return ops.linear(x, self)


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

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        y = ops.linear(x, self)
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


class ParallelHead(Linear):
    """Vocabulary rows split across ranks; the float32 logits are all-gathered so that every rank
    holds the full vocabulary. With `fp8` (generate's --lm-head fp8) the rows are E4M3 codes in
    128x128 blocks, quantized while loading from the checkpoint's head (`loading`): half the bytes
    a decode step reads there. Each rank's part is then a whole number of blocks, so the blocks,
    and the logits, are the same whatever the world size."""

    def __init__(self, dim: int, vocab_size: int, dist: Dist, *, dtype: torch.dtype, fp8: bool = False,
                 scratch: Scratch | None = None):
        part = -(-vocab_size // dist.world_size)
        if fp8:
            part = -(-part // BLOCK) * BLOCK
        super().__init__(dim, part, dtype=dtype, fp8=fp8, scratch=scratch)
        self.dist, self.vocab_size = dist, vocab_size
        self.rows = (min(dist.rank * part, vocab_size), min((dist.rank + 1) * part, vocab_size))  # real rows held

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:  # [B,T,D] -> [B,T,V] float32
        logits = ops.linear(x, self).float()
        if self.dist.world_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.dist.world_size)]
            tdist.all_gather(parts, logits.contiguous(), group=self.dist.group)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.vocab_size]
