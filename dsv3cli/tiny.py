"""Random checkpoints in the hub's exact layout (config, tokenizer, index, shards, MTP layer, FP8).

Boundary: makes files for tests and demos; no forward logic. Same seed -> identical bytes.
The FP8 variant of a seed is the block quantization of the BF16 variant's weights, so
`dsv3 quantize` of one can be compared with the other.
"""

from __future__ import annotations

import math
from pathlib import Path

from .checkpoint import (
    INDEX_NAME, SINGLE_NAME, expected_shapes, is_fp8_weight, save_shard, scale_name, shard_file_name, write_index,
    write_json,
)
from .config import ModelConfig, load_preset
from .errors import DsvError

MAX_BYTES = 2 * 1024**3  # refuse presets whose BF16 weights exceed this
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
GENERATION_CONFIG = {"_from_model_config": True, "do_sample": True, "temperature": 0.6, "top_p": 0.95}


def tiny_config(preset: str = "tiny", *, fp8: bool = False, config: ModelConfig | None = None) -> ModelConfig:
    cfg = config if config is not None else load_preset(preset)
    raw = {k: v for k, v in cfg.raw.items() if k != "quantization_config"}
    return cfg.replace(quantization_config=dict(FP8_QUANTIZATION_CONFIG) if fp8 else None, raw=raw)


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
    norm shows); router bias small so it changes some routing decisions but not all."""
    import torch

    x = rng.standard_normal(shape, dtype="float32")
    if name.endswith("e_score_correction_bias"):
        return torch.from_numpy(x * 0.05)
    if len(shape) == 1:  # RMSNorm weights
        return _bf16(1.0 + 0.1 * x)
    if name.endswith("embed_tokens.weight"):
        return _bf16(x)
    std = shape[1] ** -0.5
    if name.endswith(("lm_head.weight", "shared_head.head.weight")):
        std *= 2.0
    return _bf16(x * std)


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


def make_tiny(out: str | Path, *, seed: int = 0, fp8: bool = False, shards: int = 3, preset: str = "tiny",
              config: ModelConfig | None = None, force: bool = False) -> Path:
    """Write a random checkpoint of `preset` (or `config`) to `out` in the hub's layout:
    config.json, generation_config.json, tokenizer.json, tokenizer_config.json, shards
    model-0000i-of-0000n.safetensors (the MTP layer at index num_hidden_layers included) and
    model.safetensors.index.json, written last. `shards=1` still writes an index (as the hub)."""
    import numpy as np
    import torch

    from .fp8 import quantize_weight
    if shards < 1:
        raise DsvError(f"--shards {shards}: must be at least 1")
    cfg = tiny_config(preset, fp8=fp8, config=config)
    size = bf16_bytes(cfg)
    if size > MAX_BYTES:
        raise DsvError(
            f"{'preset ' + preset if config is None else 'config'}: {size / 1e9:.1f} GB of weights; dsv3 tiny makes checkpoints up to "
            f"{MAX_BYTES / 1e9:.1f} GB. Use a smaller preset such as tiny"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DsvError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DsvError(f"{out}: not empty; pass --force to overwrite the checkpoint files in it")
        # Only our own file names, so a stale shard count cannot leave a foreign shard behind.
        for p in out.glob("model*.safetensors*"):
            if p.name in (INDEX_NAME, SINGLE_NAME) or p.name.startswith("model-"):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.Generator(np.random.PCG64(seed))
    shapes = expected_shapes(cfg, fp8=False)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        # The MTP layer's embedding and head are copies of the main model's (as on the hub).
        if name.startswith("model.layers.") and name.endswith(".embed_tokens.weight"):
            tensors[name] = tensors["model.embed_tokens.weight"].clone()
            continue
        if name.endswith("shared_head.head.weight") and "lm_head.weight" in tensors:
            tensors[name] = tensors["lm_head.weight"].clone()
            continue
        t = _init_tensor(name, shape, rng)
        if fp8 and is_fp8_weight(name):
            q, s = quantize_weight(t)
            tensors[name], tensors[scale_name(name)] = q, s.float().contiguous()
        else:
            tensors[name] = t

    names = list(tensors)
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    groups = _split(names, sizes, shards, fp8)
    write_checkpoint(out, cfg, tensors, groups, vocab_size=min(cfg.vocab_size, 4096), model_max_length=cfg.max_position_embeddings)
    return out


def write_checkpoint(out: Path, cfg: ModelConfig, tensors: dict, groups: list[list[str]], **tokenizer_kw) -> int:
    """Write a hub-layout folder from tensors already in storage order: one shard per group
    (named as the hub's), config.json, generation_config.json, the tokenizer files
    (`tokenizer.write_tokenizer_files(**tokenizer_kw)`), and the index last, so a folder with an
    index is complete. Returns the bytes of tensor data."""
    from .tokenizer import write_tokenizer_files

    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups, 1):
        fname = shard_file_name(i, len(groups))
        total += save_shard({k: tensors[k] for k in group}, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
    write_json(out / "config.json", dict(sorted(cfg.to_dict().items())))
    gen = dict(GENERATION_CONFIG, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    write_json(out / "generation_config.json", dict(sorted(gen.items())))
    write_tokenizer_files(out, **tokenizer_kw)
    write_index(out, weight_map, total)
    return total
