"""Build a `Transformer` straight from a hub-layout checkpoint, each rank reading only its slices.

Boundary: maps HF tensor names to the model's parameters and to how they are split across ranks
(`SHARDING`, the one table of it); reads through `dsv3cli.checkpoint.Checkpoint` (lazy safetensors
slices). No forward logic. FP8 weights are copied as FP8 together with the rows/columns of their
block scales that cover this rank's part; BF16/F32 tensors are cast to the compute dtype (norms,
the routing bias and FP8 scales stay float32); an FP8 head (`head_fp8`) is quantized as it is read.

Checkpoints saved by transformers (per-expert names, no MTP layer, possibly a single
model.safetensors) load too; the MTP module is then absent.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from dsv3_kernels.cpu import enabled as cpu_kernels_enabled

from . import memory
from .checkpoint import Checkpoint, human
from .errors import DsvError
from .fp8_format import BLOCK, F8
from .fp8_format import SCALE_SUFFIX as SCALE
from .model import Transformer
from .ops import Runtime
from .parallel import Dist, Linear, ParallelHead, block_cover, split_range
from .parallel import resolve_dtype

# How each tensor is split, by HF name (first match wins). The scale of an FP8 weight follows its
# weight, in block units.
#   vocab: rows split (ceil parts; the last padded)    col: output rows split (dim 0)
#   row:   input columns split (dim 1)                  expert: whole, on the rank owning the expert
#   replicated: whole on every rank
SHARDING: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), kind)
    for p, kind in [
        (r"(^model\.|\.)embed_tokens\.weight$", "vocab"),
        (r"^lm_head\.weight$|\.shared_head\.head\.weight$", "vocab"),
        (r"\.self_attn\.(q_proj|q_b_proj|kv_b_proj)\.weight", "col"),
        (r"\.self_attn\.o_proj\.weight", "row"),
        (r"\.mlp\.experts\.\d+\.", "expert"),
        (r"\.mlp\.(shared_experts\.)?(gate_proj|up_proj)\.weight", "col"),
        (r"\.mlp\.(shared_experts\.)?down_proj\.weight", "row"),
        (r"", "replicated"),  # norms, q_a_proj, kv_a_proj_with_mqa, router, bias, eh_proj
    ]
]
LAYER = re.compile(r"model\.layers\.(\d+)\.")
SPLIT_DIM = {"vocab": 0, "col": 0, "row": 1}



def compute_dtype(ck: Checkpoint, requested: str) -> torch.dtype:
    """--dtype for this checkpoint (generate and profile-experts alike): auto is float32 when the
    embedding, which no checkpoint quantizes, is stored as F32, else bfloat16."""
    return resolve_dtype(requested, ck.dtype("model.embed_tokens.weight") if requested == "auto" else None)


def shard_kind(name: str) -> str:
    for pat, kind in SHARDING:
        if pat.search(name):
            return kind
    return "replicated"


def hf_name(key: str, num_hidden_layers: int) -> str:
    """The checkpoint name of a model state_dict key (the MTP module is layer num_hidden_layers)."""
    if key.startswith("mtp."):
        return f"model.layers.{num_hidden_layers}.{key[4:]}"
    if key.startswith("lm_head."):
        return key
    return "model." + key


def load_model(
    ckpt_path: str | Path | Checkpoint,
    dist: Dist = Dist(),
    *,
    runtime: Runtime | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    max_batch_size: int = 1,
    max_seq_len: int = 4096,
    mtp: bool = True,
    head_fp8: bool = False,
    progress: Callable[[int, int], None] | None = None,
    check_memory: bool = True,
) -> Transformer:
    """A Transformer with this rank's share of the checkpoint's weights.

    `runtime` says where and how to compute (default: `device` and `dtype` with torch's thread
    count and the C kernels unless switched off); `mtp=False` neither builds nor reads the MTP
    module; `head_fp8` quantizes the head(s) into FP8 blocks as they are read (`ParallelHead`).
    `progress(done, total)` is called after each tensor (for a progress bar). Unless
    `check_memory` is False (--force), refuses first when this rank's share, KV cache and scratch
    exceed the memory it may use (`dsv3cli.memory`).
    """
    if runtime is None:
        runtime = Runtime(torch.device(device), dtype, threads=torch.get_num_threads(), kernels=cpu_kernels_enabled())
    ck = ckpt_path if isinstance(ckpt_path, Checkpoint) else Checkpoint(ckpt_path)
    cfg = ck.config
    N = cfg.num_hidden_layers
    # Decoder layers are those without an MTP entry (eh_proj): more of them than config.json's
    # count would be dropped without a word, leaving a truncated model.
    layers = {int(m.group(1)) for n in ck.names() if (m := LAYER.match(n))}
    decoder = sorted(i for i in layers if not ck.has(f"model.layers.{i}.eh_proj.weight"))
    if decoder and decoder[-1] >= N:
        raise DsvError(
            f"{ck.path}: the tensors hold decoder layers up to model.layers.{decoder[-1]} but config.json has "
            f"num_hidden_layers {N}; a model of {N} layers would leave the rest out: fix config.json"
        )
    # The file, not config.json, decides: transformers drops layer N but keeps num_nextn_predict_layers.
    if cfg.num_nextn_predict_layers > 0 and not ck.has(f"model.layers.{N}.eh_proj.weight"):
        cfg = cfg.replace(num_nextn_predict_layers=0)
    probe = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    fp8 = ck.has(probe) and ck.dtype(probe) == F8
    if fp8 != cfg.is_fp8:
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
        cfg = cfg.replace(quantization_config=qc if fp8 else None)

    if check_memory:
        need = memory.rank_needs(ck, dist, runtime.dtype, max_batch_size, max_seq_len, mtp=mtp, head_fp8=head_fp8)
        cpu = runtime.device.type == "cpu"
        here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if cpu else 1  # ranks sharing this RAM
        memory.preflight(need, memory.available(runtime.device), ranks_here=here, what=f"{ck.path}: ")
    with _out_of_memory(ck, "allocating the model and its KV cache"):
        model = Transformer(cfg, dist, runtime, max_batch_size=max_batch_size, max_seq_len=max_seq_len, mtp=mtp,
                            head_fp8=head_fp8)
        if model.mtp is not None:
            model.mtp.add_own_embedding_and_head(
                embedding=ck.has(f"model.layers.{N}.embed_tokens.weight"),
                head=ck.has(f"model.layers.{N}.shared_head.head.weight"),
                head_fp8=head_fp8,
            )
    quantized = {f"{k}.{p}": m for k, m in model.named_modules() if isinstance(m, ParallelHead) and m.is_fp8
                 for p in ("weight", "weight" + SCALE)}

    # Check every name before reading anything: a missing tensor should not cost a full load.
    plan: list[tuple[str, torch.Tensor]] = []
    heads: list[tuple[str, ParallelHead]] = []  # quantized while read (head_fp8)
    missing: list[str] = []
    for key, t in model.state_dict(keep_vars=True).items():
        name = hf_name(key, N)
        if name == "lm_head.weight" and not ck.has(name) and cfg.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        if key in quantized:
            if key.endswith(".weight"):
                heads.append((name, quantized[key]))
                if not ck.has(name):
                    missing.append(name)
            continue
        weight = name[: -len(SCALE)] if name.endswith(SCALE) else name
        if not ck.has(name) or not ck.has(weight):
            missing.append(name)
        plan.append((name, t))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DsvError(
            f"{ck.path}: missing tensors {', '.join(missing[:5])}{more}; the checkpoint is incomplete "
            "or not of this config (run dsv3 verify)"
        )
    # Whole tensors stored as the model holds them are read straight into their parameters; the
    # rest goes through safetensors, shard by shard, closing each before the next: it maps files
    # into memory, and the pages read stay resident (and count in RSS) while the file is open.
    plan.sort(key=lambda item: ck.shard_of(item[0]))
    with torch.no_grad(), _out_of_memory(ck, "reading the weights"):
        for i, (name, t) in enumerate(plan):
            if i and ck.shard_of(name) != ck.shard_of(plan[i - 1][0]):
                ck.close()
            if _whole_in_place(ck, name, t, dist):
                ck.read_into(name, t)
                _check_finite(name, t, ck.dtype(name))
            else:
                t.copy_(_read(ck, name, t, dist).to(device=t.device, dtype=t.dtype))
            if progress is not None:
                progress(i + 1, len(plan) + len(heads))
        for i, (name, head) in enumerate(heads):
            _quantize_head(ck, name, head)
            if progress is not None:
                progress(len(plan) + i + 1, len(plan) + len(heads))
    ck.close()
    for m in model.modules():  # every FP8 tensor went through _check_finite above
        if isinstance(m, Linear) and m.is_fp8:
            m.codes_checked = True
    return model


HEAD_ROWS = 64 * BLOCK  # rows of a head read and quantized at a time: ~120 MB of BF16 at V3's width


def _quantize_head(ck: Checkpoint, name: str, head: ParallelHead) -> None:
    """The rows of `name` this rank's FP8 head holds, read and quantized HEAD_ROWS at a time into
    its codes and 128x128 block scales (as dsv3 quantize would); the padding rows stay zero."""
    from .fp8 import quantize_weight

    stored = _STORED.get(ck.dtype(name))
    if stored is None or stored == torch.float8_e4m3fn:
        raise DsvError(f"{name}: stored as {ck.dtype(name)}; --lm-head fp8 quantizes a BF16, F16 or F32 head: "
                       "leave it as stored")
    lo, hi = head.rows
    head.weight.view(torch.uint8)[hi - lo :].zero_()  # the rows read below are written whole
    head.weight_scale_inv[-(-(hi - lo) // BLOCK) :].fill_(1.0)
    for a in range(lo, hi, HEAD_ROWS):
        b = min(a + HEAD_ROWS, hi)
        rows = torch.empty(b - a, head.weight.shape[1], dtype=stored)
        ck.read_into(name, rows, (a, b))
        _, s = quantize_weight(rows.float() if stored == torch.float16 else rows, out=head.weight[a - lo : b - lo])
        if not torch.isfinite(s).all():
            raise DsvError(f"{name}: non-finite values in rows {a}..{b}; the checkpoint is damaged: download or "
                           "convert it again (dsv3 verify --check-values lists every such tensor)")
        head.weight_scale_inv[(a - lo) // BLOCK : (a - lo) // BLOCK + s.shape[0]] = s


@contextmanager
def _out_of_memory(ck: Checkpoint, doing: str) -> Iterator[None]:
    """An allocation that fails (an address-space limit, --force past the preflight, CUDA) as one line."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        text = str(e)
        if "alloc" not in text.lower() and "out of memory" not in text.lower():
            raise
        size = re.search(r"allocate (\d+) bytes", text)
        what = f"{human(int(size.group(1)))} more could not be had" if size else text.splitlines()[0][-160:]
        raise DsvError(f"{ck.path}: out of memory while {doing} ({what}); use more ranks (--nproc), FP8 weights, "
                       "a shorter --max-seq-len or a smaller --batch-size") from None


def _check_finite(name: str, t: torch.Tensor, dtype: str) -> None:
    """FP8 NaN codes (0x7F, 0xFF: E4M3 has no inf) and non-finite scales, named as they are read."""
    if dtype == F8:
        nan = int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())
    elif name.endswith(SCALE):
        nan = int((~torch.isfinite(t)).sum())
    else:
        return
    if nan:
        raise DsvError(f"{name}: {nan} NaN value(s) (FP8 code 0x7F/0xFF or a non-finite scale); the checkpoint is "
                       "damaged: download or convert it again (dsv3 verify --check-values lists every such tensor)")


_STORED = {"BF16": torch.bfloat16, "F32": torch.float32, F8: torch.float8_e4m3fn, "F16": torch.float16}


def _whole_in_place(ck: Checkpoint, name: str, target: torch.Tensor, dist: Dist) -> bool:
    """Whether `name` is this rank's whole `target` byte for byte (no split, no conversion)."""
    split = shard_kind(name.removesuffix(SCALE)) in SPLIT_DIM and dist.world_size > 1
    return (not split and target.is_cpu and target.is_contiguous() and _STORED.get(ck.dtype(name)) == target.dtype
            and tuple(ck.shape(name)) == tuple(target.shape))


def _read(ck: Checkpoint, name: str, target: torch.Tensor, dist: Dist) -> torch.Tensor:
    """This rank's part of `name`, shaped like `target` (vocab parts zero-padded)."""
    is_scale = name.endswith(SCALE)
    weight = name[: -len(SCALE)] if is_scale else name
    kind = shard_kind(weight)
    full = ck.shape(weight)
    if kind not in SPLIT_DIM:
        out = ck.get(name)
    else:
        dim = SPLIT_DIM[kind]
        lo, hi = split_range(full[dim], dist, pad=kind == "vocab")
        fp8 = ck.dtype(weight) == F8
        if fp8 != (target.dtype == torch.float8_e4m3fn or is_scale):
            raise DsvError(f"{weight}: stored as {ck.dtype(weight)} but the model expects {'FP8' if not fp8 else 'no FP8'} here")
        if fp8:  # whole 128-blocks around the rank's part; Linear keeps the offset
            lo, hi = block_cover(lo, hi, full[dim])
            if is_scale:
                lo, hi = lo // BLOCK, -(-hi // BLOCK)
        sl = ck.get_slice(name)
        out = sl[lo:hi] if dim == 0 else sl[:, lo:hi]
        if kind == "vocab" and out.shape[0] < target.shape[0]:
            out = torch.cat([out, out.new_zeros(target.shape[0] - out.shape[0], *out.shape[1:])])
    _check_finite(name, out, ck.dtype(name))
    if tuple(out.shape) != tuple(target.shape):
        raise DsvError(
            f"{name}: shape {list(ck.shape(name))} does not match the config (this rank expects "
            f"{list(target.shape)} of it); the checkpoint and config.json disagree"
        )
    return out
