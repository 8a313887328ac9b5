"""Memory preflight: what one rank will hold against what it may use, before anything is loaded.

Boundary: the need comes from the checkpoint's headers (this rank's share of every tensor in the
format it is kept in memory), the KV cache for batch x sequence length, and scratch; the limit
from /proc/meminfo's MemAvailable, the cgroup (v1 memory.limit_in_bytes, v2 memory.max, less
what the group already uses that is not reclaimable page cache), the address-space limit
(RLIMIT_AS) and, on CUDA, free device memory. No model, no allocation.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, human, mtp_layers
from .errors import DsvError
from .parallel import Dist

HEADS = ("lm_head.weight", "shared_head.head.weight")
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63
SCRATCH_FRACTION = 0.1  # activations, logits and allocator slack, above a fixed runtime floor
SCRATCH_FLOOR = 256 << 20


@dataclass(frozen=True)
class Need:
    weights: int
    kv_cache: int
    scratch: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.scratch


def rank_needs(ck: Checkpoint, dist: Dist, dtype: torch.dtype, max_batch_size: int, max_seq_len: int,
               mtp: bool = True, head_fp8: bool = False) -> Need:
    """Bytes this rank holds: its share of each tensor (FP8 codes stay 1 byte, their scales and
    1-D tensors float32, the rest in `dtype`; the heads 1 byte a weight with `head_fp8`), the
    latent KV cache of every layer, scratch; the MTP module's only with `mtp`."""
    from .fp8_format import F8
    from .fp8_format import SCALE_SUFFIX as SCALE
    from .loading import shard_kind

    cfg = ck.config
    skip = tuple(f"model.layers.{i}." for i in mtp_layers(cfg)) if not mtp else ()
    weights = 0
    for name in ck.names():
        if skip and name.startswith(skip):
            continue
        info = ck.info(name)
        numel = 1
        for d in info.shape:
            numel *= d
        if info.dtype == F8 or (head_fp8 and name.endswith(HEADS)):
            size = 1
        elif name.endswith(SCALE) or len(info.shape) <= 1:
            size = 4
        else:
            size = dtype.itemsize
        share = 1 if shard_kind(name.removesuffix(SCALE)) == "replicated" else dist.world_size
        weights += numel * size // share
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    kv = layers * max_batch_size * max_seq_len * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize
    return Need(weights, kv, SCRATCH_FLOOR + int(SCRATCH_FRACTION * (weights + kv)))


def cpu_limits(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> list[tuple[int, str]]:
    """(bytes this process may still use, what says so) for each limit that applies."""
    out: list[tuple[int, str]] = []
    meminfo = _fields(proc / "meminfo", " ")
    if "MemAvailable" in meminfo:
        out.append((_kib(meminfo["MemAvailable"]), "MemAvailable"))
    for line in _read(proc / "self" / "cgroup").splitlines():
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2: 0::/path
            out += _cgroup(cgroup, rel, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: N:memory:/path
            out += _cgroup(cgroup / "memory", rel, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = _kib(_fields(proc / "self" / "status", ":\t").get("VmSize", "0 kB"))
        out.append((max(0, soft - used), "the address-space limit (ulimit -v)"))
    return out


def _cgroup(mount: Path, rel: str, limit_file: str, usage_file: str, cache_key: str) -> list[tuple[int, str]]:
    """What the cgroup `rel` under `mount` (inside a container often the mount itself) leaves free."""
    for where in (mount / rel.lstrip("/"), mount):
        raw = _read(where / limit_file).strip()
        if raw:
            break
    else:
        return []
    if raw == "max" or int(raw) >= UNLIMITED:
        return []
    usage = int(_read(where / usage_file).strip() or 0)
    cache = int(_fields(where / "memory.stat", " ").get(cache_key, "0"))  # reclaimable
    return [(max(0, int(raw) - max(0, usage - cache)), f"the cgroup limit {where / limit_file}")]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # absent on this system: that limit does not apply
        return ""


def _fields(path: Path, sep: str) -> dict[str, str]:
    pairs = (ln.split(sep, 1) for ln in _read(path).splitlines() if sep in ln)
    return {k.rstrip(":").strip(): v.strip() for k, v in pairs}


def _kib(value: str) -> int:
    return int(value.split()[0]) * 1024


def available(device: str | torch.device) -> tuple[int, str] | None:
    """The tightest limit for this rank, or None when none is known."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free, f"free memory on {torch.cuda.get_device_name()}"
    limits = cpu_limits()
    return min(limits) if limits else None


def preflight(need: Need, limit: tuple[int, str] | None, *, ranks_here: int = 1, what: str = "") -> None:
    """Refuse (DsvError) when `ranks_here` ranks of `need` each exceed the limit."""
    if limit is None or need.total * ranks_here <= limit[0]:
        return
    bytes_free, source = limit
    who = f"{ranks_here} ranks on this machine need {human(need.total * ranks_here)}, each" if ranks_here > 1 else "this rank needs"
    raise DsvError(
        f"{what}{who} {human(need.total)} (weights {human(need.weights)}, KV cache {human(need.kv_cache)}, "
        f"scratch {human(need.scratch)}) but {human(bytes_free)} is available ({source}); use more ranks "
        "(--nproc, torchrun), FP8 weights (dsv3 quantize), a shorter --max-seq-len or a smaller --batch-size, "
        "or --force to try anyway"
    )
