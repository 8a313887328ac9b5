"""Model configuration: one dataclass read from a hub `config.json` or an embedded preset.

Boundary: pure Python, no torch import (so `dsv3 --help` and `dsv3 estimate-cost` start fast).
Presets are data files in `dsv3cli/presets/*.json`, in the hub's config.json form.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import DsvError

# model_type values that use the DeepSeek-V3 (or V2) MLA + MoE blocks.
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")

# Counts and sizes: whole numbers, at least 1 (POSITIVE) or at least 0 (COUNTS).
POSITIVE = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq", "max_position_embeddings",
)
COUNTS = ("first_k_dense_replace", "n_routed_experts", "n_shared_experts", "num_nextn_predict_layers")
REALS = ("routed_scaling_factor", "rms_norm_eps", "rope_theta")

REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
)


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    num_nextn_predict_layers: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    quantization_config: dict[str, Any] | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    model_type: str = "deepseek_v3"
    torch_dtype: str = "bfloat16"
    # Every key of the source config.json, so a rewrite keeps what we do not model.
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ---- derived -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_mtp(self) -> bool:
        return self.num_nextn_predict_layers > 0

    @property
    def is_fp8(self) -> bool:
        q = self.quantization_config
        return bool(q) and q.get("quant_method") == "fp8"

    @property
    def scale_fmt(self) -> str:
        """'ue8m0' (power-of-two scales, V3.1) or 'e4m3' (plain float32 scales)."""
        q = self.quantization_config or {}
        return "ue8m0" if q.get("scale_fmt") == "ue8m0" else "e4m3"

    def is_moe_layer(self, i: int) -> bool:
        """Layer i (the MTP layer num_hidden_layers included) uses MoE rather than a dense MLP."""
        return (
            self.n_routed_experts > 0
            and i >= self.first_k_dense_replace
            and i % max(self.moe_layer_freq, 1) == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The YaRN rope-scaling parameters, or None when rope is unscaled."""
        rs = self.rope_scaling or {}
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn" or float(rs.get("factor", 1.0)) <= 1.0:
            return None
        return {
            "factor": float(rs["factor"]),
            "original_max_position_embeddings": int(rs.get("original_max_position_embeddings", 4096)),
            "beta_fast": float(rs.get("beta_fast", 32)),
            "beta_slow": float(rs.get("beta_slow", 1)),
            "mscale": float(rs.get("mscale", 1.0)),
            "mscale_all_dim": float(rs.get("mscale_all_dim", 0.0)),
        }

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope) ** -0.5, times mscale**2 under YaRN (DESIGN.md §3)."""
        scale = self.qk_head_dim ** -0.5
        y = self.yarn
        if y is not None and y["mscale_all_dim"]:
            m = 0.1 * y["mscale_all_dim"] * math.log(y["factor"]) + 1.0
            scale *= m * m
        return scale

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return list(e) if isinstance(e, list) else [int(e)]

    # ---- I/O -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        archs = d.get("architectures") or []
        if mt not in SUPPORTED_MODEL_TYPES and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise DsvError(
                f"{source}: model_type {mt!r} is not a DeepSeek-V3-architecture model "
                f"(expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise DsvError(f"{source}: missing keys {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        kw = {k: d[k] for k in names if k in d}
        # Newer transformers write rope_parameters (with rope_theta inside) instead of rope_scaling.
        rp = d.get("rope_parameters")
        if kw.get("rope_scaling") is None and isinstance(rp, dict):
            kw["rope_scaling"] = rp if rp.get("rope_type", rp.get("type")) not in (None, "default") else None
            if "rope_theta" in rp and "rope_theta" not in d:
                kw["rope_theta"] = rp["rope_theta"]
        if d.get("n_routed_experts") is None:
            kw["n_routed_experts"] = 0
        for k in ("n_group", "topk_group"):
            if kw.get(k) is None:
                kw[k] = 1
        if kw.get("n_shared_experts") is None:
            kw["n_shared_experts"] = 0
        if kw.get("first_k_dense_replace") is None:
            kw["first_k_dense_replace"] = 0
        if kw.get("num_nextn_predict_layers") is None:
            kw["num_nextn_predict_layers"] = 0
        if "topk_method" not in d:
            kw["topk_method"] = "noaux_tc" if kw.get("scoring_func", "sigmoid") == "sigmoid" else "greedy"
        if "scoring_func" not in d and mt == "deepseek_v2":
            kw["scoring_func"] = "softmax"
        if "routed_scaling_factor" not in d and mt == "deepseek_v2":
            kw["routed_scaling_factor"] = 1.0
        if "norm_topk_prob" not in d and mt == "deepseek_v2":
            kw["norm_topk_prob"] = False
        try:
            cfg = cls(**kw, raw=dict(d))
        except TypeError as e:  # a key with the wrong type of value
            raise DsvError(f"{source}: {e}") from e
        cfg.check(source)
        return cfg

    def check(self, source: str = "config.json") -> None:
        for key in POSITIVE + COUNTS + ("q_lora_rank",):
            v = getattr(self, key)
            if key == "q_lora_rank" and v is None:
                continue
            low = 0 if key in COUNTS else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise DsvError(f"{source}: {key} is {json.dumps(v)}; expected a whole number >= {low}")
        for key in REALS:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise DsvError(f"{source}: {key} is {json.dumps(v)}; expected a number > 0")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise DsvError(f"{source}: n_routed_experts {self.n_routed_experts} is not divisible by n_group {self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise DsvError(f"{source}: topk_group {self.topk_group} must be between 1 and n_group {self.n_group}")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise DsvError(f"{source}: num_experts_per_tok exceeds n_routed_experts")
        if self.qk_rope_head_dim % 2:
            raise DsvError(f"{source}: qk_rope_head_dim must be even")

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise DsvError(f"{p}: no config.json here; pass a checkpoint folder or a hub config.json")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DsvError(f"{p}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise DsvError(f"{p}: expected a JSON object")
        return cls.from_dict(d, source=str(p))

    def to_dict(self) -> dict[str, Any]:
        """The hub's config.json form: the source's keys, updated with ours."""
        out = dict(self.raw)
        for f in dataclasses.fields(self):
            if f.name == "raw":
                continue
            v = getattr(self, f.name)
            if f.name == "quantization_config" and v is None:
                out.pop(f.name, None)
                continue
            out[f.name] = v
        out.setdefault("architectures", ["DeepseekV3ForCausalLM"])
        out.setdefault("hidden_act", "silu")
        out.setdefault("num_key_value_heads", self.num_attention_heads)
        out.pop("rope_parameters", None)
        return out

    def past_context(self, positions: int, what: str) -> str | None:
        """A warning when `positions` tokens go past max_position_embeddings (`what` names the option)."""
        if positions <= self.max_position_embeddings:
            return None
        return (f"{what} reaches {positions} positions, past this model's max_position_embeddings "
                f"{self.max_position_embeddings} (config.json): the tokens beyond it are out of what it was trained on")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("dsv3cli.presets").iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> ModelConfig:
    names = preset_names()
    if name not in names:
        raise DsvError(f"unknown preset {name!r}; known presets: {', '.join(names)}")
    d = json.loads(resources.files("dsv3cli.presets").joinpath(f"{name}.json").read_text())
    return ModelConfig.from_dict(d, source=f"preset {name}")


def load_config(path_or_preset: str | Path) -> ModelConfig:
    """A checkpoint folder, a config.json path, or a preset name."""
    p = Path(path_or_preset)
    if p.exists():
        return ModelConfig.from_json(p)
    if isinstance(path_or_preset, str) and path_or_preset in preset_names():
        return load_preset(path_or_preset)
    raise DsvError(f"{path_or_preset}: no such file, folder or preset (presets: {', '.join(preset_names())})")
