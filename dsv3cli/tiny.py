"""Random checkpoints in the hub's exact layout (config, tokenizer, index, shards, MTP layer, FP8).

Boundary: makes files for tests, demos and benchmarks; no forward logic. Same seed -> identical
bytes. The FP8 variant of a seed is the block quantization of the BF16 variant's weights, so
`dsv3 quantize` of one can be compared with the other. A preset can be cut to fewer layers and
routed experts with every width kept (real-width checkpoints for speed measurements); tensors
are generated and written shard by shard, so memory stays near one shard whatever the size.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Callable, Iterable

from .checkpoint import (
    INDEX_NAME, SINGLE_NAME, expected_shapes, free_bytes, human, is_fp8_weight, save_shard, scale_name,
    shard_file_name, write_index, write_json,
)
from .config import ModelConfig, load_preset
from .errors import DsvError, UsageError

# A full-size preset written by accident (deepseek-v3 is 1.3 TB) is refused; a preset cut with
# --layers/--experts is an explicit request and only has to fit the disk.
MAX_BYTES = 2 * 1024**3
DISK_MARGIN = 256 * 1024**2  # left free beyond the bytes written (file system metadata, logs)
SHARD_TARGET = 2 * 1024**3  # default shard size of large checkpoints: bounds memory while writing
ROW_CHUNK_BYTES = 64 * 1024**2  # large tensors are drawn in row chunks of about this much float32
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
GENERATION_CONFIG = {"_from_model_config": True, "do_sample": True, "temperature": 0.6, "top_p": 0.95}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tiny_config(preset: str = "tiny", *, fp8: bool = False, config: ModelConfig | None = None) -> ModelConfig:
    cfg = config if config is not None else load_preset(preset)
    # One KV head per attention head, as the hub's V3 config says (MLA has no grouped KV heads;
    # llama.cpp's converter checks kv_b_proj against num_key_value_heads).
    raw = {k: v for k, v in cfg.raw.items() if k != "quantization_config"}
    raw["num_key_value_heads"] = cfg.num_attention_heads
    return cfg.replace(quantization_config=dict(FP8_QUANTIZATION_CONFIG) if fp8 else None, raw=raw)


def cut_config(cfg: ModelConfig, *, layers: int | None = None, experts: int | None = None,
               mtp: bool = True) -> tuple[ModelConfig, list[str]]:
    """`cfg` with fewer layers and/or routed experts and every width kept; returns the config and
    one line per routing or layout value it had to change (for the user to see).
    Layers: at least one MoE layer stays (the dense prefix shrinks to layers - 1). Experts: a
    multiple of n_group; topk_group grows until the groups can supply num_experts_per_tok."""
    notes: list[str] = []
    changes: dict = {}
    L = cfg.num_hidden_layers
    if layers is not None:
        if not 1 <= layers <= L:
            raise UsageError(f"--layers {layers}: the preset has {L} layers; pass 1 to {L}")
        changes["num_hidden_layers"] = layers
        if cfg.n_routed_experts and cfg.first_k_dense_replace >= layers:
            dense = max(layers - 1, 0)
            changes["first_k_dense_replace"] = dense
            notes.append(f"first_k_dense_replace {cfg.first_k_dense_replace} -> {dense} (keeps one MoE layer)")
    E, G = cfg.n_routed_experts, max(cfg.n_group, 1)
    if experts is not None:
        if not E:
            raise UsageError(f"--experts {experts}: the preset has no routed experts")
        if not 1 <= experts <= E:
            raise UsageError(f"--experts {experts}: the preset has {E} routed experts; pass 1 to {E}")
        if experts % G:
            raise UsageError(f"--experts {experts}: must be a multiple of the preset's n_group {G} (experts are split into equal groups)")
        changes["n_routed_experts"] = experts
        k = min(cfg.num_experts_per_tok, experts)
        if k != cfg.num_experts_per_tok:
            changes["num_experts_per_tok"] = k
            notes.append(f"num_experts_per_tok {cfg.num_experts_per_tok} -> {k}")
        topk_group = min(G, max(cfg.topk_group, math.ceil(k / (experts // G))))
        if topk_group != cfg.topk_group:
            changes["topk_group"] = topk_group
            notes.append(f"topk_group {cfg.topk_group} -> {topk_group} (so {k} experts can be chosen)")
        notes.append(f"{G} groups of {experts // G} experts, top {topk_group} groups, {k} experts per token")
    if not mtp and cfg.num_nextn_predict_layers:
        changes["num_nextn_predict_layers"] = 0
        notes.append("no MTP layer")
    if not changes:
        return cfg, notes
    raw = {k: v for k, v in cfg.raw.items() if k not in changes}
    out = cfg.replace(**changes, raw=raw)
    out.check("cut preset")
    return out, notes


def tensor_bytes(cfg: ModelConfig, fp8: bool) -> dict[str, int]:
    """name -> stored bytes of every tensor make_tiny writes, in storage order."""
    out = {}
    for name, shape in expected_shapes(cfg, fp8=fp8).items():
        if name.endswith(("_scale_inv", "e_score_correction_bias")):
            width = 4
        else:
            width = 1 if fp8 and is_fp8_weight(name) else 2
        out[name] = math.prod(shape) * width
    return out


def bf16_bytes(cfg: ModelConfig) -> int:
    return sum(math.prod(s) * 2 for s in expected_shapes(cfg, fp8=False).values())


def _bf16(x):
    """float32 numpy array -> torch bfloat16 (round to nearest even on the bits, zero-copy).
    numpy keeps generation single-threaded and its PCG64 stream stable across torch versions."""
    import numpy as np
    import torch

    b = x.astype(np.float32, copy=False).view(np.uint32)
    r = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return torch.from_numpy(r.view(np.int16)).view(torch.bfloat16)


def _init_tensor(name: str, shape: tuple[int, ...], rng):
    """One tensor of the random model. Linear weights: std 1/sqrt(fan_in) so every layer keeps
    activations O(1) and logits are spread but not flat; norms near 1 (not exactly, so a mixed-up
    norm shows); router bias small so it changes some routing decisions but not all. Large
    tensors are drawn in row chunks (the same stream as one draw) to bound the float32 scratch."""
    import torch

    if name.endswith("e_score_correction_bias"):
        return torch.from_numpy(rng.standard_normal(shape, dtype="float32") * 0.05)
    if len(shape) == 1:  # RMSNorm weights
        return _bf16(1.0 + 0.1 * rng.standard_normal(shape, dtype="float32"))
    std = 1.0 if name.endswith("embed_tokens.weight") else shape[1] ** -0.5
    if name.endswith(("lm_head.weight", "shared_head.head.weight")):
        std *= 2.0
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, ROW_CHUNK_BYTES // (4 * shape[1]))
    for a in range(0, shape[0], rows):
        x = rng.standard_normal((min(rows, shape[0] - a), shape[1]), dtype="float32")
        if std != 1.0:
            x *= std
        out[a:a + x.shape[0]] = _bf16(x)
    return out


def _split(names: list[str], sizes: dict[str, int], n: int, fp8: bool) -> list[list[str]]:
    """Contiguous groups of about equal bytes. With FP8 the first cut goes between a weight and
    its scale, so the scale lives in the next shard (loaders must go through the index)."""
    if n > len(names):
        raise DsvError(f"--shards {n}: more shards than tensors ({len(names)})")
    cum = [0]
    for name in names:
        cum.append(cum[-1] + sizes[name])  # cum[j] = bytes before names[j]
    cuts: list[int] = []
    for k in range(1, n):
        lo = (cuts[-1] if cuts else 0) + 1
        hi = len(names) - (n - k)  # leave at least one tensor for each later shard
        cuts.append(next((j for j in range(lo, hi + 1) if cum[j] >= cum[-1] * k / n), hi))
    if fp8 and n >= 2:
        hi = cuts[1] if len(cuts) > 1 else len(names)
        best = [j for j in range(1, hi) if names[j] == scale_name(names[j - 1]) and is_fp8_weight(names[j - 1])]
        if best:
            cuts[0] = min(best, key=lambda j: abs(j - cuts[0]))
    bounds = [0, *cuts, len(names)]
    return [names[a:b] for a, b in zip(bounds, bounds[1:])]


def _tokenizer_writer(cfg: ModelConfig, tokenizer: Path | None) -> Callable[[Path], None]:
    """What writes the tokenizer files: our tiny BPE, or a copy of `tokenizer`'s files, checked
    first against the model's vocabulary."""
    from .tokenizer import load_tokenizer, write_tokenizer_files

    if tokenizer is None:
        return lambda out: write_tokenizer_files(out, vocab_size=min(cfg.vocab_size, 4096),
                                                 model_max_length=cfg.max_position_embeddings)
    for f in TOKENIZER_FILES:
        if not (tokenizer / f).is_file():
            raise DsvError(f"--tokenizer {tokenizer}: no {f} there; pass a folder holding {' and '.join(TOKENIZER_FILES)}")
    n = load_tokenizer(tokenizer).vocab_size
    if n > cfg.vocab_size:
        raise DsvError(f"--tokenizer {tokenizer}: {n} tokens do not fit the model's vocab_size {cfg.vocab_size}; use a preset with a larger vocabulary")

    def copy(out: Path) -> None:
        from .checkpoint import atomic_output

        for f in TOKENIZER_FILES:
            with atomic_output(out / f) as tmp:
                shutil.copyfile(tokenizer / f, tmp)
    return copy


def make_tiny(out: str | Path, *, seed: int = 0, fp8: bool = False, shards: int | None = 3, preset: str = "tiny",
              config: ModelConfig | None = None, force: bool = False, tokenizer: str | Path | None = None,
              cut: bool = False, progress: Callable[[int, int], None] | None = None,
              free_space: Callable[[Path], int] = free_bytes) -> Path:
    """Write a random checkpoint of `preset` (or `config`) to `out` in the hub's layout:
    config.json, generation_config.json, tokenizer.json, tokenizer_config.json, shards
    model-0000i-of-0000n.safetensors (the MTP layer at index num_hidden_layers included) and
    model.safetensors.index.json, written last. `shards=1` still writes an index (as the hub);
    `shards=None` picks 3, or one per ~2 GB for large checkpoints. `cut`: the config is a
    preset cut by the user (no MAX_BYTES limit, only the disk's). `tokenizer`: a folder whose
    tokenizer files are copied instead of writing the tiny BPE. `progress(done, total)` gets
    bytes written; `free_space(folder)` says how many bytes the disk has left there."""
    import numpy as np
    from safetensors import safe_open

    from .fp8 import quantize_weight
    cfg = tiny_config(preset, fp8=fp8, config=config)
    sizes = tensor_bytes(cfg, fp8)
    total = sum(sizes.values())
    if shards is None:
        shards = max(3, math.ceil(total / SHARD_TARGET))
    if shards < 1:
        raise DsvError(f"--shards {shards}: must be at least 1")
    if not cut and bf16_bytes(cfg) > MAX_BYTES:
        raise DsvError(
            f"{'preset ' + preset if config is None else 'config'}: {bf16_bytes(cfg) / 1e9:.1f} GB of weights; dsv3 tiny "
            f"makes full presets up to {MAX_BYTES / 1e9:.1f} GB. Cut it with --layers/--experts, or use a smaller preset such as tiny"
        )
    write_tok = _tokenizer_writer(cfg, Path(tokenizer) if tokenizer is not None else None)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DsvError(f"{out}: exists and is not a folder")
    ours = [p for p in out.glob("model*.safetensors*")
            if p.name in (INDEX_NAME, SINGLE_NAME) or p.name.startswith("model-")] if out.is_dir() else []
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DsvError(f"{out}: not empty; pass --force to overwrite the checkpoint files in it")
    free = free_space(out) + sum(p.stat().st_size for p in ours)
    if total + DISK_MARGIN > free:
        raise DsvError(f"{out}: {human(total)} to write but {human(free)} free there; free space or cut "
                       f"--layers/--experts further")
    # Only our own file names, so a stale shard count cannot leave a foreign shard behind.
    for p in ours:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.Generator(np.random.PCG64(seed))
    names = list(sizes)
    groups = _split(names, sizes, shards, fp8)
    written: dict[str, str] = {}

    def source(name: str) -> str | None:
        """The main model's tensor that `name` is a copy of (the MTP layer's embedding and head, as on the hub)."""
        if name.startswith("model.layers.") and name.endswith(".embed_tokens.weight"):
            return "model.embed_tokens.weight"
        if name.endswith("shared_head.head.weight") and "lm_head.weight" in sizes:
            return "lm_head.weight"
        return None

    shapes = expected_shapes(cfg, fp8=False)
    made: dict = {}  # generated, not yet written: a weight's scale may belong to the next shard

    def shard_tensors(group: list[str]) -> dict:
        for name in group:
            if name in made:
                continue  # a scale, made with its weight
            src = source(name)
            if src is not None:
                if src in made:
                    made[name] = made[src].clone()
                else:  # already written to an earlier shard: read it back, do not draw it again
                    with safe_open(str(out / written[src]), framework="pt") as f:
                        made[name] = f.get_tensor(src)
                continue
            t = _init_tensor(name, shapes[name], rng)
            if fp8 and is_fp8_weight(name):
                q, s = quantize_weight(t)
                made[name], made[scale_name(name)] = q, s.float().contiguous()
            else:
                made[name] = t
        return {n: made.pop(n) for n in group}

    def gen() -> Iterable[dict]:
        done = 0
        for i, group in enumerate(groups, 1):
            tensors = shard_tensors(group)
            yield tensors
            written.update(dict.fromkeys(group, shard_file_name(i, len(groups))))
            done += sum(sizes[n] for n in group)
            if progress is not None:
                progress(done, total)

    write_checkpoint(out, cfg, gen(), len(groups), write_tok)
    return out


def write_checkpoint(out: Path, cfg: ModelConfig, shards: Iterable[dict], n: int,
                     write_tokenizer: Callable[[Path], None]) -> int:
    """Write a hub-layout folder from `n` shards of tensors in storage order (each a dict,
    consumed one at a time, named as the hub's), config.json, generation_config.json, the
    tokenizer files (`write_tokenizer(out)`), and the index last, so a folder with an index is
    complete. Returns the bytes of tensor data."""
    weight_map: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate(shards, 1):
        fname = shard_file_name(i, n)
        total += save_shard(tensors, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    write_json(out / "config.json", dict(sorted(cfg.to_dict().items())))
    gen = dict(GENERATION_CONFIG, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    write_json(out / "generation_config.json", dict(sorted(gen.items())))
    write_tokenizer(out)
    write_index(out, weight_map, total)
    return total
