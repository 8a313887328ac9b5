"""Checkpoints in the hub layout: index + shards, the HF name table, validation, atomic writes.

Boundary: knows tensor names, shapes, dtypes and files; knows nothing of forward logic.
Reads are lazy (safetensors `safe_open`, one cached handle per shard) so a 700 GB checkpoint is
never held in memory; validation parses the safetensors headers itself to give precise messages.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .config import ModelConfig
from .fp8_format import BLOCK, F8, SCALE_SUFFIX
from .errors import DsvError
from .render import plural

# Linear weights the hub stores as F8_E4M3 with a sibling `weight_scale_inv`: attention
# projections and every MLP projection (dense, routed experts, shared experts), MTP layer
# included. Embeddings, heads, norms, the router, eh_proj and shared_head.head stay BF16.
_FP8_WEIGHT = re.compile(
    r"^model\.layers\.\d+\."
    r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
# Buffers some checkpoints carry that are not weights (Kimi-K2's rotary frequencies, recomputed
# from the config): accepted everywhere, never loaded.
KNOWN_BUFFERS = re.compile(r"\.rotary_emb\.inv_freq$")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
LFS_MAGIC = b"version https://git-lfs"

# safetensors dtype -> bits per element.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
}
FLOAT_DTYPES = (F8, "F8_E5M2", "F16", "BF16", "F32", "F64")


def is_fp8_weight(name: str) -> bool:
    """True for the tensors the hub stores as FP8 (with `<name>_scale_inv` beside them)."""
    return _FP8_WEIGHT.match(name) is not None


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """[out, in] -> [ceil(out/128), ceil(in/128)]."""
    return (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))


def shard_file_name(i: int, n: int) -> str:
    """The hub's shard naming, 1-based: model-00001-of-00163.safetensors."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


# ---- the HF name table ------------------------------------------------------------------------

def _layer_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    p = f"model.layers.{i}."
    s: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (D,),
        p + "post_attention_layernorm.weight": (D,),
    }
    a = p + "self_attn."
    if cfg.q_lora_rank:
        s[a + "q_a_proj.weight"] = (cfg.q_lora_rank, D)
        s[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        s[a + "q_b_proj.weight"] = (H * cfg.qk_head_dim, cfg.q_lora_rank)
    else:
        s[a + "q_proj.weight"] = (H * cfg.qk_head_dim, D)
    s[a + "kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D)
    s[a + "kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
    s[a + "kv_b_proj.weight"] = (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    s[a + "o_proj.weight"] = (D, H * cfg.v_head_dim)
    m = p + "mlp."
    if cfg.is_moe_layer(i):
        E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
        s[m + "gate.weight"] = (E, D)
        if cfg.topk_method == "noaux_tc":
            s[m + "gate.e_score_correction_bias"] = (E,)
        for e in range(E):
            s[m + f"experts.{e}.gate_proj.weight"] = (I, D)
            s[m + f"experts.{e}.up_proj.weight"] = (I, D)
            s[m + f"experts.{e}.down_proj.weight"] = (D, I)
        if cfg.n_shared_experts:
            Is = I * cfg.n_shared_experts
            s[m + "shared_experts.gate_proj.weight"] = (Is, D)
            s[m + "shared_experts.up_proj.weight"] = (Is, D)
            s[m + "shared_experts.down_proj.weight"] = (D, Is)
    else:
        I = cfg.intermediate_size
        s[m + "gate_proj.weight"] = (I, D)
        s[m + "up_proj.weight"] = (I, D)
        s[m + "down_proj.weight"] = (D, I)
    return s


def mtp_layers(cfg: ModelConfig) -> list[int]:
    """Layer indices of the MTP modules: num_hidden_layers, num_hidden_layers+1, ..."""
    return list(range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers))


def expected_shapes(cfg: ModelConfig, *, fp8: bool | None = None, mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """The hub's name -> shape table for `cfg`, in storage order (embedding, layers, norm, head,
    MTP layers). `fp8` (default: what quantization_config says) adds each FP8 weight's
    `weight_scale_inv`; `mtp=False` leaves out the MTP layers (as transformers' save does)."""
    fp8 = cfg.is_fp8 if fp8 is None else fp8
    V, D = cfg.vocab_size, cfg.hidden_size
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg.num_hidden_layers):
        s.update(_layer_shapes(cfg, i))
    s["model.norm.weight"] = (D,)
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (V, D)
    if mtp:
        for i in mtp_layers(cfg):
            p = f"model.layers.{i}."
            s[p + "embed_tokens.weight"] = (V, D)
            s[p + "enorm.weight"] = (D,)
            s[p + "hnorm.weight"] = (D,)
            s[p + "eh_proj.weight"] = (D, 2 * D)
            s.update(_layer_shapes(cfg, i))
            s[p + "shared_head.norm.weight"] = (D,)
            s[p + "shared_head.head.weight"] = (V, D)
    if fp8:
        out: dict[str, tuple[int, ...]] = {}
        for n, shp in s.items():
            out[n] = shp
            if is_fp8_weight(n):
                out[scale_name(n)] = scale_shape(shp)
        s = out
    return s


# ---- safetensors headers ----------------------------------------------------------------------


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system that will hold `path` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def not_a_folder(path: Path) -> str:
    """Why `path` is no folder: "no such folder" or "not a folder (a file)"."""
    return "not a folder (a file)" if path.exists() else "no such folder"


def human(n: float) -> str:
    """Bytes for people: 512 B, 1.5 kB, 688.0 GB (powers of 1000, as the hub shows sizes)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"

@dataclass
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: (tensors, __metadata__). DsvError names the file
    and what is wrong (Git LFS pointer, truncation, corrupt JSON, bad offsets, unknown dtype)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(LFS_MAGIC[:8]) and (head + f.read(len(LFS_MAGIC) - 8)).startswith(LFS_MAGIC):
                raise DsvError(f"{path.name}: a Git LFS pointer file, not the tensor data; run git lfs pull or dsv3 download")
            if len(head) < 8:
                raise DsvError(f"{path.name}: truncated ({size} bytes, shorter than a safetensors header); download it again")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise DsvError(
                    f"{path.name}: truncated or corrupt header (header length {n} but the file is {size} bytes); download it again"
                )
            raw = f.read(n)
    except FileNotFoundError as e:
        raise DsvError(f"{path.name}: missing; download it again") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DsvError(f"{path.name}: corrupt header (not valid JSON: {e}); download it again") from e
    if not isinstance(header, dict):
        raise DsvError(f"{path.name}: corrupt header (not a JSON object); download it again")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise DsvError(f"{path.name}: corrupt header (__metadata__ is not an object)")
    infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype, shape, (start, end) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise DsvError(f"{path.name}: corrupt header entry for {name} ({e!r})") from e
        if dtype not in DTYPE_BITS:
            raise DsvError(f"{path.name}: {name} has unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (isinstance(start, int) and isinstance(end, int)):
            raise DsvError(f"{path.name}: {name} has a malformed shape or offsets in the header")
        want = math.prod(shape) * DTYPE_BITS[dtype] // 8
        if end - start != want:
            raise DsvError(f"{path.name}: {name} spans {end - start} bytes but {dtype}{list(shape)} needs {want}")
        infos[name] = TensorInfo(dtype, shape, start, end)
    pos = 0
    for name, t in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start != pos:
            what = "overlaps the previous tensor" if t.start < pos else f"leaves a gap at byte {pos}"
            raise DsvError(f"{path.name}: corrupt header: {name} {what}; download it again")
        pos = t.end
    data = size - 8 - n
    if pos > data:
        raise DsvError(f"{path.name}: truncated ({data} data bytes, the header describes {pos}); download it again")
    if pos < data:
        raise DsvError(f"{path.name}: {data - pos} unexpected bytes after the last tensor; download it again")
    return infos, {str(k): str(v) for k, v in meta.items()}


# ---- reading ----------------------------------------------------------------------------------

def _read_index(folder: Path) -> tuple[dict[str, str], dict[str, Any]]:
    p = folder / INDEX_NAME
    raw = p.read_bytes()
    if raw.startswith(LFS_MAGIC):
        raise DsvError(f"{INDEX_NAME}: a Git LFS pointer file; run git lfs pull or dsv3 download")
    try:
        d = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DsvError(f"{INDEX_NAME}: not valid JSON ({e}); download it again") from e
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise DsvError(f"{INDEX_NAME}: no weight_map object of name -> shard file")
    for v in set(wm.values()):
        if "/" in v or "\\" in v or v in ("", ".", ".."):
            raise DsvError(f"{INDEX_NAME}: shard name {v!r} is not a plain file name")
    return dict(wm), d.get("metadata") or {}


class Checkpoint:
    """A hub-layout checkpoint folder, read lazily through the index.

    `model.safetensors.index.json` + shards, or a single `model.safetensors`. Shapes and dtypes
    come from the parsed headers; tensors from one cached `safe_open` handle per shard.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        self._handles: dict[str, Any] = {}
        self._config: ModelConfig | None = None
        if not self.path.is_dir():
            raise DsvError(f"{self.path}: {not_a_folder(self.path)}; pass a checkpoint folder (config.json + safetensors)")
        if (self.path / INDEX_NAME).is_file():
            self.weight_map, self.index_metadata = _read_index(self.path)
        elif (self.path / SINGLE_NAME).is_file():
            infos, _ = read_header(self.path / SINGLE_NAME)
            self.weight_map = {n: SINGLE_NAME for n in infos}
            self.index_metadata = {}
            self._headers = {SINGLE_NAME: infos}
        else:
            raise DsvError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME}; is this a checkpoint folder?")
        self.shards = sorted(set(self.weight_map.values()))

    # -- metadata
    @property
    def config(self) -> ModelConfig:
        if self._config is None:
            self._config = ModelConfig.from_json(self.path / "config.json")
        return self._config

    def names(self) -> list[str]:
        return list(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def tensors_in(self, shard: str) -> list[str]:
        return [n for n, s in self.weight_map.items() if s == shard]

    def shard_of(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise DsvError(f"{self.path.name}: no tensor {name} in the checkpoint") from None

    def header(self, shard: str) -> dict[str, TensorInfo]:
        if shard not in self._headers:
            self._headers[shard] = read_header(self.path / shard)[0]
        return self._headers[shard]

    def info(self, name: str) -> TensorInfo:
        shard = self.shard_of(name)
        h = self.header(shard)
        if name not in h:
            raise DsvError(f"{shard}: {name} is in the index but not in this shard; download it again")
        return h[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        return self.info(name).dtype

    def nbytes(self, name: str) -> int:
        return self.info(name).nbytes

    @property
    def has_mtp(self) -> bool:
        cfg = self.config
        return any(f"model.layers.{i}.eh_proj.weight" in self.weight_map for i in mtp_layers(cfg))

    def decode_bytes(self, head_fp8: bool = False) -> int:
        """Bytes of weights one batch-1 decode token of the main model reads, as stored (FP8
        codes + scales, BF16 elsewhere; with `head_fp8` the head as generate --lm-head fp8 holds
        it): every tensor but the embedding (one row of it) and the MTP layers, the routed
        experts by num_experts_per_tok / n_routed_experts (an average expert's share). The
        numerator of a decode's achieved bandwidth."""
        cfg = self.config
        mtp = tuple(f"model.layers.{i}." for i in mtp_layers(cfg))
        total = 0
        for n in self.names():
            if n.endswith("embed_tokens.weight") or n.startswith(mtp):
                continue
            b = self.nbytes(n)
            if head_fp8 and n == "lm_head.weight":
                rows, cols = self.shape(n)
                sr, sc = scale_shape((rows, cols))
                b = rows * cols + sr * sc * 4  # codes + float32 block scales
            total += b * cfg.num_experts_per_tok // cfg.n_routed_experts if ".mlp.experts." in n else b
        return total

    # -- data
    def _handle(self, shard: str):
        h = self._handles.get(shard)
        if h is None:
            from safetensors import safe_open

            self.header(shard)  # good messages for LFS pointers, truncation, corrupt headers
            try:
                h = safe_open(str(self.path / shard), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise DsvError(f"{shard}: cannot open ({e}); download it again") from e
            self._handles[shard] = h
        return h

    def get(self, name: str):
        """The whole tensor (torch, on the CPU)."""
        return self._read(name, "get_tensor")

    def get_slice(self, name: str):
        """A lazy safetensors slice: `sl[a:b]`, `sl[:, a:b]` read only those rows/columns."""
        return self._read(name, "get_slice")

    def _read(self, name: str, method: str):
        self.info(name)
        shard = self.weight_map[name]
        try:
            return getattr(self._handle(shard), method)(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise DsvError(f"{shard}: cannot read {name} ({e})") from e

    def read_into(self, name: str, out, rows: tuple[int, int] | None = None) -> None:
        """Read a whole tensor's bytes, or those of its rows [a, b), straight into `out` (a
        contiguous CPU tensor of that size): plain reads, not a memory map, so the file's pages
        never count in this process's RSS and a large shard does not sit in memory beside the
        model being filled."""
        import torch  # here only: the rest of this module works without torch

        info = self.info(name)
        shard = self.weight_map[name]
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        skip, size = 0, info.nbytes
        if rows is not None:
            row = info.nbytes // max(info.shape[0], 1)
            skip, size = rows[0] * row, (rows[1] - rows[0]) * row
        if len(buf) != size:
            raise DsvError(f"{shard}: {name} has {size} bytes there, the model expects {len(buf)}")
        with open(self.path / shard, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little") + info.start + skip
            done = 0
            while done < len(buf):  # one read returns at most ~2 GB on Linux
                n = os.preadv(f.fileno(), [buf[done:]], start + done)
                if n <= 0:
                    raise DsvError(f"{shard}: ends inside {name} (truncated?); download it again")
                done += n

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.weight_map)} tensors, {len(self.shards)} shards)"


# ---- validation -------------------------------------------------------------------------------

@dataclass
class ValidationReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _examples(names: list[str], k: int = 3) -> str:
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def validate(path: str | Path, check_values: bool = False, progress: Any = None) -> ValidationReport:
    """Check a checkpoint folder without loading it: index vs shards, headers, FP8 scales,
    shapes vs config.json, quantization_config vs dtypes; `check_values` also streams every
    tensor once looking for NaN/Inf. Problems are one line each, naming the file or tensor.
    `progress(done_bytes, total_bytes)` is called while values are scanned."""
    folder = Path(path)
    rep = ValidationReport()
    P = rep.problems.append
    if not folder.is_dir():
        raise DsvError(f"{folder}: {not_a_folder(folder)}; pass a checkpoint folder")

    cfg: ModelConfig | None = None
    try:
        cfg = ModelConfig.from_json(folder / "config.json")
    except DsvError as e:
        P(str(e))

    # Index and shards.
    index_meta: dict[str, Any] = {}
    if (folder / INDEX_NAME).is_file():
        try:
            weight_map, index_meta = _read_index(folder)
        except DsvError as e:
            P(str(e))
            rep.summary = {"path": str(folder)}
            return rep
    elif (folder / SINGLE_NAME).is_file():
        weight_map = None
    else:
        P(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME}; is this a checkpoint folder?")
        rep.summary = {"path": str(folder)}
        return rep

    shard_names = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
    infos: dict[str, TensorInfo] = {}
    where: dict[str, str] = {}
    orphans: set[str] = set()  # in a shard but not (there) in the index: reported once, below
    good_shards: list[str] = []
    for shard in shard_names:
        p = folder / shard
        if not p.is_file():
            n = sum(1 for s in weight_map.values() if s == shard) if weight_map else 0
            what = "a folder, not a safetensors file" if p.is_dir() else "missing"
            P(f"{shard}: {what} ({plural(n, 'tensor')} of the index live there); download it again")
            continue
        try:
            h, _ = read_header(p)
        except DsvError as e:
            P(str(e))
            continue
        good_shards.append(shard)
        for name, t in h.items():
            if weight_map is not None and weight_map.get(name) != shard:
                if name in weight_map:
                    P(f"{shard}: {name} is here but the index says {weight_map[name]}")
                else:
                    P(f"{shard}: {name} is not in {INDEX_NAME}; the index is stale or the shard is foreign")
                orphans.add(name)
                continue
            infos[name] = t
            where[name] = shard
    if weight_map is not None:
        good = set(good_shards)
        for name, shard in weight_map.items():
            if shard in good and name not in infos:
                P(f"{shard}: {name} is in {INDEX_NAME} but not in this shard; download it again")
        stray = sorted(
            p.name for p in folder.glob("*.safetensors") if p.name not in set(shard_names)
        )
        if stray:
            rep.warnings.append(f"{_examples(stray)}: safetensors file(s) not named in {INDEX_NAME} (ignored)")

    total = sum(t.nbytes for t in infos.values())
    if weight_map is not None and set(weight_map) == set(infos):
        ts = index_meta.get("total_size") if isinstance(index_meta, dict) else None
        if ts is not None and ts != total:
            rep.warnings.append(f"{INDEX_NAME}: metadata.total_size is {ts} but the tensors hold {total} bytes")

    # FP8 weights and their scales.
    fp8_weights = [n for n, t in infos.items() if t.dtype == F8]
    for n in fp8_weights:
        t = infos[n]
        if len(t.shape) != 2:
            P(f"{where[n]}: {n} is F8_E4M3 with shape {list(t.shape)}; FP8 weights are 2-D")
            continue
        sn = scale_name(n)
        if sn not in infos:
            if weight_map is not None and sn in weight_map:
                continue  # its shard is broken, reported above
            P(f"{where[n]}: {n} is F8_E4M3 but has no {sn.rsplit('.', 1)[-1]}; the checkpoint is incomplete")
            continue
        s = infos[sn]
        if s.dtype != "F32":
            P(f"{where[sn]}: {sn} is {s.dtype}; FP8 scales are F32")
        want = scale_shape(t.shape)
        if s.shape != want:
            P(f"{where[sn]}: {sn} has shape {list(s.shape)}, expected {list(want)} for weight {list(t.shape)} (128x128 blocks)")
    for n in infos:
        if n.endswith(SCALE_SUFFIX):
            w = n[: -len(SCALE_SUFFIX)]
            if w in infos and infos[w].dtype != F8:
                P(f"{where[n]}: {n} is a scale but {w} is {infos[w].dtype}, not F8_E4M3")
            elif w not in infos and not (weight_map and w in weight_map):
                P(f"{where[n]}: {n} is a scale without its weight {w}")

    # Shapes and quantization against config.json.
    has_mtp = False
    if cfg is not None:
        exp = expected_shapes(cfg, fp8=False)
        mtp_names = set(expected_shapes(cfg, fp8=False)) - set(expected_shapes(cfg, fp8=False, mtp=False))
        present = set(infos) | orphans | (set(weight_map) if weight_map is not None else set())
        has_mtp = bool(mtp_names & present)
        for n, shp in exp.items():
            if n in mtp_names and not has_mtp:
                continue
            if n not in present:
                P(f"{n}: missing (config.json expects {list(shp)}); the checkpoint is incomplete or for another config")
            elif n in infos and infos[n].shape != shp:
                P(f"{where[n]}: {n} has shape {list(infos[n].shape)} but config.json implies {list(shp)}")
        buffers = sorted(n for n in set(infos) - set(exp) if KNOWN_BUFFERS.search(n))
        if buffers:
            rep.warnings.append(f"{_examples(buffers)}: {len(buffers)} non-weight buffer(s), recomputed from config.json (ignored)")
        for n in sorted(set(infos) - set(exp) - set(buffers)):
            if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in exp:
                continue
            P(f"{where[n]}: {n} is not a tensor of this config (config.json)")
        for n, t in infos.items():
            if t.dtype not in FLOAT_DTYPES:
                P(f"{where[n]}: {n} has dtype {t.dtype}; expected a floating-point tensor")
        wrong_fp8 = sorted(n for n in fp8_weights if not is_fp8_weight(n))
        if wrong_fp8:
            P(f"{_examples(wrong_fp8)}: F8_E4M3 but the hub keeps these in BF16")
        linear = [n for n in infos if is_fp8_weight(n)]
        not_fp8 = sorted(n for n in linear if infos[n].dtype != F8)
        if cfg.is_fp8 and not_fp8:
            P(
                f"config.json: quantization_config says fp8 but {len(not_fp8)} of {len(linear)} linear weights are not "
                f"F8_E4M3 (e.g. {_examples(not_fp8, 2)}); remove quantization_config or run dsv3 quantize"
            )
        if not cfg.is_fp8 and fp8_weights:
            P(
                f"config.json: no fp8 quantization_config but {len(fp8_weights)} of the tensors are F8_E4M3 "
                f"(e.g. {_examples(sorted(fp8_weights), 2)}); add quantization_config or run dsv3 quantize --to bf16"
            )
        if cfg.is_fp8:
            bs = (cfg.quantization_config or {}).get("weight_block_size", [BLOCK, BLOCK])
            if list(bs) != [BLOCK, BLOCK]:
                P(f"config.json: weight_block_size {bs} is not supported (only [128, 128])")

    # Values: one tensor at a time.
    if check_values and not rep.problems:
        _check_values(folder, infos, where, cfg, rep, progress)

    dtypes: dict[str, int] = {}
    for t in infos.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
    params = sum(math.prod(t.shape) for n, t in infos.items() if not n.endswith(SCALE_SUFFIX))
    rep.summary = {
        "path": str(folder),
        "format": "fp8" if fp8_weights else "bf16" if dtypes.get("BF16") else "float",
        "shards": len(shard_names),
        "tensors": len(infos),
        "parameters": params,
        "bytes": total,
        "dtypes": dict(sorted(dtypes.items())),
        "fp8_weights": len(fp8_weights),
        "mtp": has_mtp,
        "mtp_in_config": bool(cfg and cfg.has_mtp),
        "model_type": cfg.model_type if cfg else None,
        "values_checked": bool(check_values and not rep.problems),
    }
    return rep


# dtype -> (integer view, exponent mask, what the masked bits equal for NaN/Inf). Checking bit
# patterns in numpy avoids widening to float and torch's thread spin-up per small tensor.
_NONFINITE_BITS = {
    "F32": ("int32", 0x7F800000, 0x7F800000),
    "BF16": ("int16", 0x7F80, 0x7F80),
    "F16": ("int16", 0x7C00, 0x7C00),
    "F64": ("int64", 0x7FF0000000000000, 0x7FF0000000000000),
    F8: ("int8", 0x7F, 0x7F),  # e4m3fn has no Inf; NaN is S.1111.111
    "F8_E5M2": ("int8", 0x7C, 0x7C),
}


def _count_nonfinite(t, dtype: str) -> int:
    import torch

    view, mask, hit = _NONFINITE_BITS[dtype]
    a = t.reshape(-1).view(getattr(torch, view)).numpy()
    return int(((a & mask) == hit).sum())


def _check_values(folder: Path, infos: dict[str, TensorInfo], where: dict[str, str], cfg: ModelConfig | None,
                  rep: ValidationReport, progress: Any) -> None:
    from safetensors import safe_open

    ue8m0 = cfg is not None and cfg.scale_fmt == "ue8m0"
    total = sum(t.nbytes for t in infos.values())
    done = 0
    by_shard: dict[str, list[str]] = {}
    for n in sorted(infos, key=lambda n: (where[n], infos[n].start)):
        by_shard.setdefault(where[n], []).append(n)
    for shard, names in by_shard.items():
        with safe_open(str(folder / shard), framework="pt") as f:
            for n in names:
                dtype = infos[n].dtype
                if dtype in _NONFINITE_BITS:
                    t = f.get_tensor(n)
                    bad = _count_nonfinite(t, dtype)
                    if bad:
                        rep.problems.append(f"{shard}: {n} has {plural(bad, 'NaN/Inf value')}")
                    elif ue8m0 and n.endswith(SCALE_SUFFIX) and dtype == "F32":
                        import torch

                        a = t.reshape(-1).view(torch.int32).numpy()
                        if bool(((a & 0x807FFFFF) != 0).any()):  # sign or mantissa bits set
                            rep.problems.append(f"{shard}: {n} has values that are not positive powers of two but scale_fmt is ue8m0")
                    del t
                done += infos[n].nbytes
                if progress is not None:
                    progress(done, total)


# ---- writing ----------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a folder; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`
    (then fsync the folder), on failure remove it. Nobody ever sees a partial file at `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            yield tmp
        except OSError as e:  # a full disk or a lost mount: the message names the file meant
            if e.filename:
                raise
            raise DsvError(f"{path}: could not write it ({e.strerror or e}); nothing was left at that name") from None
        # Some writers (safetensors) create 0600 files; give the result ordinary permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def save_shard(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors shard atomically; returns the bytes of tensor data written."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata if metadata is not None else {"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic, deterministic JSON (sorted keys only where the caller sorted them)."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_index(folder: str | Path, weight_map: dict[str, str], total_size: int) -> Path:
    """Write model.safetensors.index.json (atomic). Call it last: its presence means the shards are complete."""
    p = Path(folder) / INDEX_NAME
    write_json(p, {"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))})
    return p
