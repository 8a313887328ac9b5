"""Analytic cost model for DeepSeek-V3-architecture models: parameter counts, training FLOPs and
GPU-hours, inference memory, roofline throughput and serving economics, all from a `ModelConfig`.

Boundary: pure Python arithmetic over a config plus two data files — `dsv3cli/data/gpus.json` (the
GPU catalog, one source per row) and `dsv3cli/data/deepseek_v3_report.json` (the published numbers
this model is calibrated against). No torch import (so `dsv3 estimate-cost` starts fast), no
rendering: `estimate()` returns tables of raw numbers with a format hint per column, and
`format_value()` turns one number into text; the command lays the tables out.

Conventions (stated in the output too):
- "Activated" parameters are the weights one token's forward pass multiplies by: attention, dense
  MLP, the routed experts it picks plus the shared ones, router, norms and the LM head. The embedding
  is a row lookup, not a matmul, so it is left out (README_WEIGHTS counts it and quotes 36.7B for V3;
  this count is 36.63B, and 37.55B with the embedding).
- Training FLOPs/token = 6 x activated parameters + attention (QK and AV) over the causal context
  (S/2 keys per query on average), x3 for forward + backward. The MTP module is left out.
- MFU always names its dense peak (BF16 or FP8); sparse peaks are never used.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, NamedTuple

from .config import ModelConfig, load_preset
from .errors import DsvError, UsageError
from .render import plural

from .fp8_format import BLOCK  # FP8 weight scales cover 128x128 blocks
HBM_USABLE = 0.90  # share of HBM left for weights + KV after activations, workspace, fragmentation
GQA_KV_HEADS = 8  # the GQA baseline: 8 KV heads (Llama-3-70B's choice) with the model's head dims
DEFAULT_CONTEXT = 4096
DEFAULT_BATCH = 32
TRAINING_GPUS = 2048
SIZING_CONTEXTS = (4096, 32768, 131072)
BASES = ("bf16", "fp8")
SECTIONS = ("params", "training", "inference", "gpus")


# ---- data files ------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _data(name: str) -> dict[str, Any]:
    return json.loads(resources.files("dsv3cli").joinpath("data").joinpath(name).read_text())


def report() -> dict[str, Any]:
    """DeepSeek's published numbers (Table 1, deployment units, serving economics) with sources."""
    return _data("deepseek_v3_report.json")


@dataclass(frozen=True)
class Gpu:
    name: str
    vendor: str
    bf16_dense_tflops: float
    fp8_dense_tflops: float | None
    bf16_sparse_tflops: float
    fp8_sparse_tflops: float | None
    hbm_gb: float
    hbm_tbps: float
    interconnect: str
    interconnect_gbps: float
    source: str
    aliases: tuple[str, ...] = ()

    def peak_flops(self, basis: str) -> float:
        """Dense tensor-core peak in FLOP/s for `basis` ('bf16' or 'fp8')."""
        tflops = self.bf16_dense_tflops if basis == "bf16" else self.fp8_dense_tflops
        if tflops is None:
            raise UsageError(f"--mfu-basis {basis}: the {self.name} has no FP8 tensor cores; use --mfu-basis bf16")
        return tflops * 1e12

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gb * 1e9

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tbps * 1e12


@lru_cache(maxsize=None)
def gpu_catalog() -> tuple[Gpu, ...]:
    rows = _data("gpus.json")["gpus"]
    return tuple(Gpu(**{**r, "aliases": tuple(r.get("aliases", ()))}) for r in rows)


def find_gpu(name: str) -> Gpu:
    key = name.strip().lower()
    for g in gpu_catalog():
        if key == g.name.lower() or key in g.aliases:
            return g
    known = ", ".join(g.name for g in gpu_catalog())
    raise UsageError(f"--gpu {name!r}: unknown GPU; known GPUs: {known}")


# ---- the tensors of a model --------------------------------------------------------------------
class Tensor(NamedTuple):
    component: str  # attention, norms, dense_mlp, routed_experts, shared_experts, router, embedding, head, mtp
    out: int
    inp: int
    count: int  # how many such tensors (experts)
    active: int  # how many of them one token multiplies by
    fp8: bool  # stored as FP8 with block scales in an FP8 checkpoint
    f32: bool = False  # kept in float32 (the routing bias)

    @property
    def params(self) -> int:
        return self.out * self.inp * self.count

    @property
    def active_params(self) -> int:
        return self.out * self.inp * self.active


def _layer_tensors(cfg: ModelConfig, i: int) -> list[Tensor]:
    """Layer i's weights (i == num_hidden_layers.. are MTP layers, which have the same blocks)."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    t = []
    if cfg.q_lora_rank:
        t += [Tensor("attention", cfg.q_lora_rank, d, 1, 1, True),
              Tensor("attention", cfg.q_lora_rank, 1, 1, 1, False),  # q_a_layernorm
              Tensor("attention", h * cfg.qk_head_dim, cfg.q_lora_rank, 1, 1, True)]
    else:
        t.append(Tensor("attention", h * cfg.qk_head_dim, d, 1, 1, True))
    t += [Tensor("attention", cfg.kv_lora_rank + cfg.qk_rope_head_dim, d, 1, 1, True),  # kv_a_proj_with_mqa
          Tensor("attention", cfg.kv_lora_rank, 1, 1, 1, False),  # kv_a_layernorm
          Tensor("attention", h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, 1, 1, True),
          Tensor("attention", d, h * cfg.v_head_dim, 1, 1, True),  # o_proj
          Tensor("norms", d, 1, 2, 2, False)]  # input + post-attention RMSNorm
    if cfg.is_moe_layer(i):
        e, k, m = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        t += [Tensor("routed_experts", m, d, 2 * e, 2 * k, True),  # gate_proj + up_proj
              Tensor("routed_experts", d, m, e, k, True),  # down_proj
              Tensor("router", e, d, 1, 1, False)]
        if cfg.topk_method == "noaux_tc":
            t.append(Tensor("router", e, 1, 1, 1, False, True))  # e_score_correction_bias, float32
        if cfg.n_shared_experts:
            s = cfg.n_shared_experts * m  # the shared experts are one MLP this wide
            t += [Tensor("shared_experts", s, d, 2, 2, True), Tensor("shared_experts", d, s, 1, 1, True)]
    else:
        f = cfg.intermediate_size
        t += [Tensor("dense_mlp", f, d, 2, 2, True), Tensor("dense_mlp", d, f, 1, 1, True)]
    return t


def main_tensors(cfg: ModelConfig) -> list[Tensor]:
    d, v = cfg.hidden_size, cfg.vocab_size
    t = [Tensor("embedding", v, d, 1, 0, False)]  # a lookup: no matmul, so not activated
    # Layers come in two kinds (dense, MoE): one of each, multiplied, instead of 61 walks.
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    for layers in (dense, moe):
        if layers:
            t += [x._replace(count=x.count * len(layers), active=x.active * len(layers))
                  for x in _layer_tensors(cfg, layers[0])]
    t.append(Tensor("norms", d, 1, 1, 1, False))  # final norm
    if not cfg.tie_word_embeddings:
        t.append(Tensor("head", v, d, 1, 1, False))
    return t


def mtp_tensors(cfg: ModelConfig) -> list[Tensor]:
    """The MTP modules' own weights; embedding and head are the main model's (shared)."""
    d, t = cfg.hidden_size, []
    for j in range(cfg.num_nextn_predict_layers):
        t += [Tensor("mtp", d, 1, 3, 3, False),  # enorm, hnorm, shared_head.norm
              Tensor("mtp", d, 2 * d, 1, 1, False)]  # eh_proj stays BF16 in the FP8 checkpoint
        t += [x._replace(component="mtp") for x in _layer_tensors(cfg, cfg.num_hidden_layers + j)]
    return t


def mtp_file_copies(cfg: ModelConfig) -> int:
    """Parameters the checkpoint files repeat per MTP module: its embed_tokens and shared_head.head."""
    return cfg.num_nextn_predict_layers * 2 * cfg.vocab_size * cfg.hidden_size


# ---- parameters ------------------------------------------------------------------------------
COMPONENTS = ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms", "head")


@dataclass(frozen=True)
class ParamCount:
    total: dict[str, int]  # main model, per component
    active: dict[str, int]
    mtp_total: int  # MTP modules' own weights
    mtp_active: int
    mtp_copies: int  # embedding + head copies the files carry for the MTP modules

    @property
    def main_total(self) -> int:
        return sum(self.total.values())

    @property
    def main_active(self) -> int:
        """Activated per token without the embedding lookup (the convention of this model)."""
        return sum(self.active.values())

    @property
    def main_active_with_embedding(self) -> int:
        return self.main_active + self.total["embedding"]

    @property
    def checkpoint_total(self) -> int:
        """Every parameter the hub files hold (main + MTP + the MTP's embed/head copies)."""
        return self.main_total + self.mtp_total + self.mtp_copies


def count_params(cfg: ModelConfig) -> ParamCount:
    total = dict.fromkeys(COMPONENTS, 0)
    active = dict.fromkeys(COMPONENTS, 0)
    for t in main_tensors(cfg):
        total[t.component] += t.params
        active[t.component] += t.active_params
    mtp = mtp_tensors(cfg)
    return ParamCount(total, active, sum(t.params for t in mtp), sum(t.active_params for t in mtp), mtp_file_copies(cfg))


# ---- bytes -----------------------------------------------------------------------------------
def tensor_bytes(t: Tensor, precision: str) -> dict[str, int]:
    """Bytes of one Tensor row: FP8 weights + float32 block scales, or BF16 ('bf16' counts the few
    float32 tensors too)."""
    if precision == "fp8" and t.fp8:
        scales = math.ceil(t.out / BLOCK) * math.ceil(t.inp / BLOCK) * 4 * t.count
        return {"fp8": t.params, "scales": scales, "bf16": 0}
    return {"fp8": 0, "scales": 0, "bf16": (4 if t.f32 else 2) * t.params}


def weight_bytes(cfg: ModelConfig, precision: str, *, mtp: bool = False, copies: bool = False) -> dict[str, int]:
    """Weight bytes in `precision` ('fp8' = the hub's FP8 layout, 'bf16'): main model, plus the MTP
    modules when `mtp`, plus the files' embedding/head copies for them when `copies`."""
    tensors = main_tensors(cfg) + (mtp_tensors(cfg) if mtp else [])
    out = {"fp8": 0, "scales": 0, "bf16": 2 * mtp_file_copies(cfg) if copies else 0}
    for t in tensors:
        for k, v in tensor_bytes(t, precision).items():
            out[k] += v
    out["total"] = out["fp8"] + out["scales"] + out["bf16"]
    return out


def routed_expert_bytes(cfg: ModelConfig, precision: str) -> int:
    """Bytes of ONE routed expert (gate, up, down) in one MoE layer."""
    if not cfg.moe_layers:
        return 0
    rows = [t for t in _layer_tensors(cfg, cfg.moe_layers[0]) if t.component == "routed_experts"]
    return sum(sum(tensor_bytes(t, precision).values()) for t in rows) // cfg.n_routed_experts


def kv_bytes_per_token(cfg: ModelConfig, attention: str = "mla", dtype_bytes: int = 2) -> int:
    """KV-cache bytes per token over the main model's layers.
    mla: the normalised latent + the shared roped key (what V3 caches); mha: full per-head K and V
    with the same head dims; gqa: GQA_KV_HEADS K/V heads with the same head dims."""
    per_head = cfg.qk_head_dim + cfg.v_head_dim
    width = {
        "mla": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        "mha": cfg.num_attention_heads * per_head,
        "gqa": min(GQA_KV_HEADS, cfg.num_attention_heads) * per_head,
    }[attention]
    return cfg.num_hidden_layers * width * dtype_bytes


# ---- FLOPs -----------------------------------------------------------------------------------
def train_flops_per_token(cfg: ModelConfig, seq: int, causal: bool = True) -> dict[str, float]:
    """Training FLOPs per token (forward + backward) at sequence length `seq`."""
    linear = 6.0 * count_params(cfg).main_active
    keys = seq / 2 if causal else float(seq)  # average keys a query sees
    attention = 6.0 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * keys
    return {"linear": linear, "attention": attention, "total": linear + attention}


def expected_experts_touched(cfg: ModelConfig, tokens: float) -> float:
    """Distinct routed experts a batch of `tokens` reaches in one MoE layer, routing uniform."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    if not e:
        return 0.0
    return e * (1.0 - (1.0 - k / e) ** tokens)


# ---- inputs ----------------------------------------------------------------------------------
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


# Example values per option, for the message when one is not a number.
EXAMPLES = {"--mfu": "0.35, 0.4", "--price": "2, 1.5", "--gpus": "2048, 256", "--context": "4096, 32k",
            "--batch": "1, 64"}


def parse_quantity(text: str, option: str) -> float:
    """'14.8T', '500B', '1e12', '2048' -> a number; UsageError naming `option` otherwise."""
    m = re.fullmatch(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*([kmbgtp]?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"{option} {text!r}: not a number (examples: {EXAMPLES.get(option, '14.8T, 500B, 1e12')})")
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


@dataclass(frozen=True)
class Scenario:
    """What the user can change; None means the calibrated / report default."""

    gpu: str = "H800"
    price: float = 2.0  # $ per GPU-hour
    mfu: float | None = None  # None: the MFU DeepSeek's Table 1 implies
    mfu_basis: str = "bf16"
    tokens: float | None = None  # pre-training tokens; None: 14.8T
    gpus: int | None = None  # None: 2,048 for training, the minimum that fits for inference
    context: int | None = None  # training sequence length and inference context; None: 4,096
    batch: int = DEFAULT_BATCH  # sequences served together

    def check(self) -> "Scenario":
        if self.mfu_basis not in BASES:
            raise UsageError(f"--mfu-basis {self.mfu_basis!r}: use bf16 or fp8")
        if self.mfu is not None and not 0.0 < self.mfu <= 1.0:
            raise UsageError(f"--mfu {self.mfu}: must be in (0, 1], a fraction of the dense {self.mfu_basis} peak (0.39 = 39%)")
        for opt, v in (("--price", self.price), ("--tokens", self.tokens), ("--gpus", self.gpus),
                       ("--max-seq-len", self.context), ("--batch-size", self.batch)):
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise UsageError(f"{opt} {v:g}: must be a positive number")
        for opt, v in (("--gpus", self.gpus), ("--max-seq-len", self.context), ("--batch-size", self.batch)):
            if v is not None and v != int(v):
                raise UsageError(f"{opt} {v:g}: must be a whole number")
        find_gpu(self.gpu).peak_flops(self.mfu_basis)  # unknown GPU, or FP8 basis on a GPU without FP8
        return self


# ---- tables ----------------------------------------------------------------------------------
@dataclass
class Table:
    """Raw numbers in rows; `columns` holds (key, label, format) with a format for `format_value`;
    a row may override a column's format with `"_fmt": {key: format}`."""

    key: str
    title: str
    columns: list[tuple[str, str, str]]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["columns"] = [{"key": k, "label": lab, "format": f} for k, lab, f in self.columns]
        return d

    def cells(self, row: dict[str, Any]) -> list[tuple[Any, str]]:
        """(raw value, format) per column for one row."""
        own = row.get("_fmt", {})
        return [(row.get(k), own.get(k, f)) for k, _, f in self.columns]


def format_value(v: Any, fmt: str) -> str:
    """One cell as text. Formats: text int params bytes gflop flops hours usd usd3 pct f1 f2 x."""
    if v is None:
        return "—"
    if fmt == "text" or isinstance(v, str):
        return str(v)
    if fmt == "params":
        return _scaled(v, ("T", "B", "M", "K"), "", "")
    if fmt == "bytes":
        return _scaled(v, ("TB", "GB", "MB", "KB"), " ", " B")
    if fmt == "gflop":
        return f"{v / 1e9:,.1f}"
    if fmt == "pct":
        return f"{100 * v:,.1f}%"
    simple = _SIMPLE_FORMATS.get(fmt)
    return simple.format(v) if simple else str(v)


_SIMPLE_FORMATS = {
    "int": "{:,.0f}", "hours": "{:,.0f}", "flops": "{:.3e}", "usd": "${:,.0f}", "usd3": "${:,.3f}",
    "f1": "{:,.1f}", "f2": "{:,.2f}", "x": "{:,.1f}x",
}


def _scaled(v: float, units: tuple[str, ...], sep: str, plain_suffix: str) -> str:
    """v with the largest of 1e12, 1e9, 1e6, 1e3 it reaches, named by `units`."""
    for div, unit in zip((1e12, 1e9, 1e6, 1e3), units):
        if abs(v) >= div:
            return f"{v / div:,.2f}{sep}{unit}"
    return f"{v:,.0f}{plain_suffix}"


# ---- parameters table ------------------------------------------------------------------------
_LABELS = {
    "embedding": "embedding (vocab x hidden)",
    "attention": "attention (MLA)",
    "dense_mlp": "dense MLP",
    "routed_experts": "routed experts",
    "shared_experts": "shared experts",
    "router": "router (gate + bias)",
    "norms": "norms",
    "head": "LM head",
}


def params_tables(cfg: ModelConfig) -> list[Table]:
    p = count_params(cfg)
    moe = len(cfg.moe_layers)
    dense = cfg.num_hidden_layers - moe
    where = {
        "embedding": "lookup: not a matmul",
        "attention": plural(cfg.num_hidden_layers, "layer"),
        "dense_mlp": plural(dense, "layer"),
        "routed_experts": f"{plural(moe, 'layer')} x {cfg.n_routed_experts}, {cfg.num_experts_per_tok or 0} per token",
        "shared_experts": f"{plural(moe, 'layer')} x {cfg.n_shared_experts}",
        "router": plural(moe, "layer"),
        "norms": "RMSNorm weights",
        "head": "tied to the embedding" if cfg.tie_word_embeddings else "",
    }
    rows = [{"component": _LABELS[c], "params": p.total[c], "activated": p.active[c], "where": where[c]} for c in COMPONENTS]
    rows += [
        {"component": "main model", "params": p.main_total, "activated": p.main_active,
         "where": "activated: embedding lookup excluded, head included"},
        {"component": "main model, embedding counted", "params": p.main_total, "activated": p.main_active_with_embedding,
         "where": "README_WEIGHTS style (it quotes 36.7B for V3)"},
        {"component": "MTP modules (own weights)", "params": p.mtp_total, "activated": p.mtp_active,
         "where": f"{plural(cfg.num_nextn_predict_layers, 'module')}; embedding and head shared with the main model"},
        {"component": "MTP incl. the shared head", "params": p.mtp_total, "activated": p.mtp_active + p.total["head"],
         "where": "what one MTP draft token multiplies by"},
        {"component": "checkpoint files", "params": p.checkpoint_total, "activated": None,
         "where": "main + MTP + the files' embedding/head copies for MTP"},
    ]
    cols = [("component", "component", "text"), ("params", "parameters", "params"),
            ("activated", "activated / token", "params"), ("where", "", "text")]
    notes = [
        "Activated = weights one token multiplies by (attention, dense MLP, its routed experts + shared experts, "
        "router, norms, LM head); the embedding is a lookup and is excluded. DeepSeek's README_WEIGHTS counts "
        "embedding and head (0.9B each) and quotes 36.7B for V3; counting both here gives the 'embedding counted' row.",
    ]
    return [Table("params", "Parameters", cols, rows, notes)]


# ---- training --------------------------------------------------------------------------------
def _reference() -> dict[str, Any]:
    """DeepSeek-V3 pre-training as published: its sustained FLOP/s per H800 (from Table 1)."""
    tr = report()["training"]
    ref = load_preset("deepseek-v3")
    f = train_flops_per_token(ref, tr["pretraining_context"])["total"]
    hours = tr["phases"][0]["gpu_hours"]
    return {"flops_per_token": f, "achieved": tr["pretraining_tokens"] * f / (hours * 3600.0),
            "gpu": find_gpu(tr["gpu"]), "hours": hours}


def training(cfg: ModelConfig, sc: Scenario) -> dict[str, Any]:
    """Phases of the V3 recipe for `cfg` under `sc`. With every default the phases are Table 1's
    GPU-hours exactly: hours scale from the report by ratios that are exactly 1.0 then."""
    tr, ref = report()["training"], _reference()
    gpu, basis = find_gpu(sc.gpu), sc.mfu_basis
    implied_mfu = ref["achieved"] / ref["gpu"].peak_flops(basis)  # what Table 1 implies, on this basis
    if sc.mfu is None:
        mfu = implied_mfu
        slowdown = ref["gpu"].peak_flops(basis) / gpu.peak_flops(basis)  # same MFU on another GPU
    else:
        mfu = sc.mfu
        slowdown = ref["achieved"] / (gpu.peak_flops(basis) * mfu)
    seq = sc.context or tr["pretraining_context"]
    tokens = sc.tokens or tr["pretraining_tokens"]
    f_seq = train_flops_per_token(cfg, seq)
    f_ref_seq = train_flops_per_token(cfg, tr["pretraining_context"])["total"]
    n = sc.gpus or TRAINING_GPUS
    phases = []
    for i, ph in enumerate(tr["phases"]):
        if i == 0:
            toks, ctx, f = tokens, seq, f_seq["total"]
            hours = ph["gpu_hours"] * (tokens / tr["pretraining_tokens"]) * (f / ref["flops_per_token"]) * slowdown
        else:
            # Context extension and post-training are known only by their GPU-hours: carry them as the
            # 4K-context tokens those hours buy at the pre-training rate (180K GPU-h per trillion).
            toks = ph["gpu_hours"] / ref["hours"] * tr["pretraining_tokens"]
            ctx, f = tr["pretraining_context"], f_ref_seq
            hours = ph["gpu_hours"] * (f / ref["flops_per_token"]) * slowdown
        phases.append({"phase": ph["name"], "tokens": toks, "context": ctx, "flops": toks * f, "gpu_hours": hours,
                       "days": hours / n / 24.0, "usd": hours * sc.price, "mfu": mfu,
                       "report_gpu_hours": ph["gpu_hours"], "report_usd": ph["usd"]})
    total_hours = sum(p["gpu_hours"] for p in phases)
    per_trillion = phases[0]["gpu_hours"] / (tokens / 1e12)
    return {
        "gpu": gpu.name, "gpus": n, "price": sc.price, "mfu": mfu, "mfu_basis": basis,
        "mfu_source": "implied by Table 1" if sc.mfu is None else "--mfu",
        "implied_mfu": implied_mfu, "implied_mfu_bf16": ref["achieved"] / ref["gpu"].peak_flops("bf16"),
        "achieved_tflops_per_gpu": gpu.peak_flops(basis) * mfu / 1e12,
        "reference_achieved_tflops_per_gpu": ref["achieved"] / 1e12,
        "context": seq, "tokens": tokens, "flops_per_token": f_seq,
        "flops_per_token_noncausal": train_flops_per_token(cfg, seq, causal=False)["total"],
        "phases": phases, "total_gpu_hours": total_hours, "total_usd": total_hours * sc.price,
        "total_days": total_hours / n / 24.0,
        "gpu_hours_per_trillion": per_trillion, "days_per_trillion": per_trillion / n / 24.0,
    }


def training_tables(cfg: ModelConfig, sc: Scenario) -> list[Table]:
    t = training(cfg, sc)
    f = t["flops_per_token"]
    flops = Table("training_flops", f"Training FLOPs per token at {t['context']:,} tokens (forward + backward)",
                  [("term", "term", "text"), ("gflop", "GFLOP / token", "gflop")], [
                      {"term": "6 x activated parameters", "gflop": f["linear"]},
                      {"term": "attention QK + AV, causal", "gflop": f["attention"]},
                      {"term": "total", "gflop": f["total"]},
                      {"term": "total if attention were not causal", "gflop": t["flops_per_token_noncausal"]},
                  ], ["The MTP module's training FLOPs are not included."])
    rows = [{k: p[k] for k in ("phase", "tokens", "context", "flops", "gpu_hours", "days", "usd", "mfu", "report_gpu_hours")}
            for p in t["phases"]]
    rows.append({"phase": "total", "tokens": sum(p["tokens"] for p in t["phases"]), "context": None,
                 "flops": sum(p["flops"] for p in t["phases"]), "gpu_hours": t["total_gpu_hours"],
                 "days": t["total_days"], "usd": t["total_usd"], "mfu": t["mfu"],
                 "report_gpu_hours": report()["training"]["total_gpu_hours"]})
    phases = Table("training_phases",
                   f"Training on {t['gpus']:,} x {t['gpu']} at ${t['price']:g}/GPU-hour, MFU {100 * t['mfu']:.1f}% of dense "
                   f"{t['mfu_basis'].upper()} ({t['mfu_source']})",
                   [("phase", "phase", "text"), ("tokens", "tokens", "params"), ("context", "context", "int"),
                    ("flops", "FLOPs", "flops"), ("gpu_hours", "GPU-hours", "hours"), ("days", "days", "f1"),
                    ("usd", "cost", "usd"), ("mfu", "MFU", "pct"), ("report_gpu_hours", "Table 1 (H800)", "hours")],
                   rows,
                   ["Context extension and post-training are known only by their Table 1 GPU-hours; they are carried as the "
                    "4K-context tokens those hours buy at the pre-training rate, so they scale with the model, GPU and MFU.",
                    "Default MFU = what Table 1 implies for DeepSeek-V3 on H800; --mfu replaces it and the hours are computed."])
    ref_gpu = find_gpu(report()["training"]["gpu"])
    summary = Table("training_summary", "Training summary", [("item", "", "text"), ("value", "value", "f2"), ("unit", "", "text")], [
        {"item": "pre-training GPU-hours per trillion tokens", "value": t["gpu_hours_per_trillion"], "unit": "GPU-hours",
         "_fmt": {"value": "hours"}},
        {"item": f"days per trillion tokens on {t['gpus']:,} GPUs", "value": t["days_per_trillion"], "unit": "days",
         "_fmt": {"value": "f1"}},
        {"item": f"MFU Table 1 implies, dense BF16 peak of the {ref_gpu.name}", "value": t["implied_mfu_bf16"], "unit": "",
         "_fmt": {"value": "pct"}},
        {"item": f"MFU Table 1 implies, dense FP8 peak of the {ref_gpu.name}",
         "value": t["reference_achieved_tflops_per_gpu"] * 1e12 / ref_gpu.peak_flops("fp8"), "unit": "", "_fmt": {"value": "pct"}},
        {"item": f"DeepSeek-V3's sustained throughput per {ref_gpu.name}", "value": t["reference_achieved_tflops_per_gpu"],
         "unit": "TFLOP/s", "_fmt": {"value": "f1"}},
        {"item": f"this scenario's throughput per {t['gpu']}", "value": t["achieved_tflops_per_gpu"], "unit": "TFLOP/s",
         "_fmt": {"value": "f1"}},
        {"item": "total GPU-hours", "value": t["total_gpu_hours"], "unit": "GPU-hours", "_fmt": {"value": "hours"}},
        {"item": f"total days on {t['gpus']:,} GPUs", "value": t["total_days"], "unit": "days", "_fmt": {"value": "f1"}},
        {"item": "total cost", "value": t["total_usd"], "unit": "", "_fmt": {"value": "usd"}},
    ], [f"{100 * t['mfu']:.2f}% of the dense {t['mfu_basis'].upper()} peak is used for this scenario's hours; the same MFU "
        "on the other basis gives a 2x different throughput (FP8 peaks are twice BF16's)."])
    return [flops, phases, summary]


# ---- inference -------------------------------------------------------------------------------
def _roofline(flops: float, nbytes: float, gpu: Gpu, n: int, basis: str) -> tuple[float, str]:
    """Seconds for a step on n GPUs at peak, and which of compute or memory binds."""
    t_compute = flops / (n * gpu.peak_flops(basis))
    t_memory = nbytes / (n * gpu.hbm_bytes_per_s)
    return (t_compute, "compute") if t_compute >= t_memory else (t_memory, "memory")


def serving(cfg: ModelConfig, sc: Scenario, precision: str) -> dict[str, Any]:
    """Minimum GPUs to hold weights + KV, and decode / prefill upper bounds from a roofline."""
    gpu = find_gpu(sc.gpu)
    b, c = sc.batch, sc.context or DEFAULT_CONTEXT
    # FP8 weights run on FP8 tensor cores where the GPU has them; else they are upcast to BF16.
    basis = "fp8" if precision == "fp8" and gpu.fp8_dense_tflops else "bf16"
    kv_tok = kv_bytes_per_token(cfg, "mla", 2)
    weights = weight_bytes(cfg, precision, mtp=True)["total"]  # served with the MTP layer for speculation
    need = weights + b * c * kv_tok
    min_gpus = math.ceil(need / (gpu.hbm_bytes * HBM_USABLE))
    n = sc.gpus or min_gpus
    out = {"precision": precision, "gpu": gpu.name, "batch": b, "context": c, "weights_bytes": weights,
           "kv_bytes": b * c * kv_tok, "need_bytes": need, "min_gpus": min_gpus, "min_nodes": math.ceil(min_gpus / 8),
           "gpus": n, "fits": n >= min_gpus, "compute_basis": basis}
    if not out["fits"]:
        return out
    p = count_params(cfg)
    main = weight_bytes(cfg, precision)["total"]
    expert = routed_expert_bytes(cfg, precision)
    moe_layers = len(cfg.moe_layers)
    non_expert = main - moe_layers * cfg.n_routed_experts * expert
    h, L = cfg.num_attention_heads, cfg.num_hidden_layers
    # Decode: one new token for each of b sequences at context c; absorbed MLA reads the latent cache.
    dec_bytes = non_expert + moe_layers * expected_experts_touched(cfg, b) * expert + b * c * kv_tok
    dec_attn = 2.0 * h * c * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * L  # scores over 576, values over 512
    dec_flops = b * (2.0 * p.main_active + dec_attn)
    t_dec, dec_bind = _roofline(dec_flops, dec_bytes, gpu, n, basis)
    # Prefill: b prompts of c tokens; K/V expanded per head, causal.
    toks = b * c
    pre_bytes = non_expert + moe_layers * expected_experts_touched(cfg, toks) * expert + toks * kv_tok
    pre_flops = toks * 2.0 * p.main_active + b * 2.0 * h * (cfg.qk_head_dim + cfg.v_head_dim) * c * c / 2 * L
    t_pre, pre_bind = _roofline(pre_flops, pre_bytes, gpu, n, basis)
    usd_per_s = n * sc.price / 3600.0
    out.update({
        "decode_tokens_per_s": b / t_dec, "decode_tokens_per_s_per_gpu": b / t_dec / n, "decode_binds": dec_bind,
        "decode_step_ms": 1e3 * t_dec, "usd_per_million_output": usd_per_s * t_dec / b * 1e6,
        "prefill_tokens_per_s": toks / t_pre, "prefill_tokens_per_s_per_gpu": toks / t_pre / n, "prefill_binds": pre_bind,
        "usd_per_million_input": usd_per_s * t_pre / toks * 1e6,
    })
    return out


def deployment_units(cfg: ModelConfig, precision: str = "fp8") -> list[dict[str, Any]]:
    """The report's prefill / decode units, their expert placement, and weights per GPU (approx.)."""
    e, moe_layers = cfg.n_routed_experts, len(cfg.moe_layers)
    expert = routed_expert_bytes(cfg, precision)
    attention = sum(sum(tensor_bytes(t, precision).values()) for t in main_tensors(cfg) if t.component == "attention")
    non_expert = weight_bytes(cfg, precision)["total"] - moe_layers * e * expert
    rows = []
    for u in report()["deployment"]["units"]:
        if u["stage"] == "prefill":
            gpus = u["gpus"]
            experts_per_gpu = math.ceil((e + u["redundant_experts"]) / gpus)
        else:  # one routed expert per GPU, plus GPUs for the redundant and shared experts
            gpus = e + u["redundant_experts"]
            experts_per_gpu = 1
        # Attention is split TP4; everything else that is not a routed expert is replicated.
        per_gpu = non_expert - attention + attention / 4 + experts_per_gpu * moe_layers * expert
        rows.append({"stage": u["stage"], "nodes": math.ceil(gpus / 8), "gpus": gpus, "report_gpus": u["gpus"],
                     "attention": u["attention"], "moe": f"EP{gpus}", "experts_per_gpu": experts_per_gpu,
                     "weights_per_gpu": per_gpu})
    return rows


def published_serving() -> dict[str, Any]:
    """DeepSeek's published day of V3/R1 serving, recomputed from its token counts and per-node rates."""
    s = report()["serving"]
    day = 86400.0
    nodes = s["input_tokens_per_day"] / day / s["prefill_tokens_per_s_per_node"] + \
        s["output_tokens_per_day"] / day / s["decode_tokens_per_s_per_node"]
    node_hour = s["gpus_per_node"] * s["price_per_gpu_hour"]
    cost = nodes * node_hour * 24
    price = s["r1_usd_per_million"]
    revenue = (s["input_cache_hit_tokens_per_day"] * price["input_cache_hit"]
               + (s["input_tokens_per_day"] - s["input_cache_hit_tokens_per_day"]) * price["input_cache_miss"]
               + s["output_tokens_per_day"] * price["output"]) / 1e6
    return {
        "nodes": nodes, "cost_per_day": cost, "revenue_per_day": revenue, "margin": (revenue - cost) / cost,
        "prefill_tokens_per_s_per_node": s["prefill_tokens_per_s_per_node"],
        "decode_tokens_per_s_per_node": s["decode_tokens_per_s_per_node"],
        "usd_per_million_input": node_hour / 3600 / s["prefill_tokens_per_s_per_node"] * 1e6,
        "usd_per_million_output": node_hour / 3600 / s["decode_tokens_per_s_per_node"] * 1e6,
        "published": {"nodes": s["average_nodes"], "cost_per_day": s["cost_per_day_usd"],
                      "revenue_per_day": s["theoretical_revenue_per_day_usd"], "margin": s["cost_profit_margin"],
                      "cost_per_day_at_published_nodes": s["average_nodes"] * node_hour * 24},
        "source": s["source"],
    }


def inference_tables(cfg: ModelConfig, sc: Scenario) -> list[Table]:
    c = sc.context or DEFAULT_CONTEXT
    w_rows = []
    for prec, label in (("fp8", "FP8 + block scales"), ("bf16", "BF16")):
        main, with_mtp = weight_bytes(cfg, prec), weight_bytes(cfg, prec, mtp=True)
        files = weight_bytes(cfg, prec, mtp=True, copies=True)
        w_rows.append({"precision": label, "fp8": main["fp8"], "scales": main["scales"], "bf16": main["bf16"],
                       "main": main["total"], "with_mtp": with_mtp["total"], "files": files["total"]})
    weights = Table("weights", "Weight bytes", [
        ("precision", "weights", "text"), ("fp8", "FP8 tensors", "bytes"), ("scales", "scales (fp32)", "bytes"),
        ("bf16", "BF16 tensors", "bytes"), ("main", "main model", "bytes"), ("with_mtp", "+ MTP layer", "bytes"),
        ("files", "checkpoint files", "bytes")], w_rows,
        ["FP8 = E4M3 linear weights with float32 scales per 128x128 block; embeddings, head, norms, router and eh_proj "
         "stay BF16. Checkpoint files also carry the MTP layer's own copies of the embedding and head."])
    mla = kv_bytes_per_token(cfg, "mla", 2)
    kinds = [("mla_bf16", "MLA BF16", "latent + shared roped key", kv_bytes_per_token(cfg, "mla", 2)),
             ("mla_fp8", "MLA FP8", "latent + shared roped key", kv_bytes_per_token(cfg, "mla", 1)),
             ("gqa_bf16", f"GQA-{GQA_KV_HEADS} BF16", f"{GQA_KV_HEADS} K/V heads, same head dims",
              kv_bytes_per_token(cfg, "gqa", 2)),
             ("mha_bf16", "MHA BF16", f"{cfg.num_attention_heads} K/V heads, same head dims", kv_bytes_per_token(cfg, "mha", 2))]
    kv = Table("kv_cache", f"KV cache per token ({plural(cfg.num_hidden_layers, 'layer')})",
               [("cache", "cache", "text"), ("what", "holds", "text"), ("bytes", "bytes / token", "int"),
                ("vs_mla", "x MLA BF16", "x")],
               [{"cache": lab, "what": what, "bytes": v, "vs_mla": v / mla} for _, lab, what, v in kinds])
    contexts = sorted(set(SIZING_CONTEXTS) | {c})
    per_seq = Table("kv_per_sequence", "KV cache per sequence",
                    [("context", "context", "int")] + [(k, lab, "bytes") for k, lab, _, _ in kinds],
                    [{"context": n, **{k: n * v for k, _, _, v in kinds}} for n in contexts])
    serve_rows = [serving(cfg, sc, prec) for prec in ("fp8", "bf16")]
    gpu = find_gpu(sc.gpu)
    serve = Table(
        "serving",
        f"Serving on {gpu.name} ({gpu.hbm_gb:g} GB, {gpu.hbm_tbps:g} TB/s): batch {sc.batch}, context {c:,}, ${sc.price:g}/GPU-hour",
        [("precision", "weights", "text"), ("need_bytes", "weights + KV", "bytes"), ("min_gpus", "min GPUs", "int"),
         ("gpus", "GPUs used", "int"), ("decode_tokens_per_s_per_gpu", "decode tok/s/GPU", "f1"),
         ("decode_binds", "decode bound", "text"), ("usd_per_million_output", "$/M output", "usd3"),
         ("prefill_tokens_per_s_per_gpu", "prefill tok/s/GPU", "f1"), ("prefill_binds", "prefill bound", "text"),
         ("usd_per_million_input", "$/M input", "usd3")],
        [{**r, "decode_binds": r.get("decode_binds", f"does not fit (needs {r['min_gpus']})")} for r in serve_rows],
        [f"Upper bounds: a roofline at 100% of dense peak ({'FP8' if serve_rows[0]['compute_basis'] == 'fp8' else 'BF16'} "
         f"for FP8 weights) and of HBM bandwidth; {int(HBM_USABLE * 100)}% of HBM usable; KV cache in BF16; "
         "routing assumed uniform; MTP layer held for speculative decoding; communication not modelled."])
    units = Table("deployment", "Deployment units of the V3 report (section 3.4), with this model's experts",
                  [("stage", "stage", "text"), ("nodes", "nodes", "int"), ("gpus", "GPUs", "int"),
                   ("report_gpus", "report GPUs", "int"), ("attention", "attention", "text"), ("moe", "MoE", "text"),
                   ("experts_per_gpu", "experts / GPU", "int"), ("weights_per_gpu", "FP8 weights / GPU (approx.)", "bytes")],
                  deployment_units(cfg),
                  ["Prefill: 32 GPUs, 32 redundant experts spread over them; decode: one routed expert per GPU "
                   "plus 64 GPUs for redundant and shared experts."])
    ps = published_serving()
    pub = ps["published"]
    def row(item: str, published: Any, computed: Any, fmt: str) -> dict[str, Any]:
        return {"item": item, "published": published, "computed": computed, "_fmt": {"published": fmt, "computed": fmt}}

    econ = Table("published_serving", "DeepSeek-V3/R1 serving, one day as published (H800, $2/GPU-hour)",
                 [("item", "", "text"), ("published", "published", "f2"), ("computed", "recomputed", "f2")], [
                     row("average H800 nodes", pub["nodes"], ps["nodes"], "f2"),
                     row("cost per day", pub["cost_per_day"], ps["cost_per_day"], "usd"),
                     row("input tokens/s per node (prefill, cache hits incl.)", ps["prefill_tokens_per_s_per_node"], None, "int"),
                     row("output tokens/s per node (decode)", ps["decode_tokens_per_s_per_node"], None, "int"),
                     row("theoretical revenue per day at R1 prices", pub["revenue_per_day"], ps["revenue_per_day"], "usd"),
                     row("cost-profit margin", pub["margin"], ps["margin"], "pct"),
                     row("$ per million input tokens (at the per-node rate)", None, ps["usd_per_million_input"], "usd3"),
                     row("$ per million output tokens (at the per-node rate)", None, ps["usd_per_million_output"], "usd3"),
                 ], [f"Source: {ps['source']}. Recomputed from the published daily tokens (608B in, 342B of them cache "
                     "hits; 168B out), per-node rates and R1 list prices ($0.14 / $0.55 / $2.19 per million)."])
    return [weights, kv, per_seq, serve, units, econ]


def gpu_tables() -> list[Table]:
    rows = [{"gpu": g.name, "vendor": g.vendor, "bf16": g.bf16_dense_tflops, "fp8": g.fp8_dense_tflops,
             "bf16_sparse": g.bf16_sparse_tflops, "fp8_sparse": g.fp8_sparse_tflops, "hbm_gb": g.hbm_gb,
             "hbm_tbps": g.hbm_tbps, "interconnect": g.interconnect, "source": g.source} for g in gpu_catalog()]
    return [Table("gpus", "GPU catalog (dense peaks are what MFU and rooflines use)", [
        ("gpu", "GPU", "text"), ("vendor", "vendor", "text"), ("bf16", "BF16 dense TFLOPS", "f1"),
        ("fp8", "FP8 dense TFLOPS", "f1"), ("bf16_sparse", "BF16 sparse", "f1"), ("fp8_sparse", "FP8 sparse", "f1"),
        ("hbm_gb", "HBM GB", "int"), ("hbm_tbps", "HBM TB/s", "f2"), ("interconnect", "interconnect", "text"),
        ("source", "source", "text")], rows)]


# ---- the one entry point ---------------------------------------------------------------------
def estimate(cfg: ModelConfig, sc: Scenario, *, model: str, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """Every table for `cfg` under `sc`: {'model', 'inputs', 'sections': {name: [Table]}}."""
    sc.check()
    for s in sections:
        if s not in SECTIONS:
            raise UsageError(f"--section {s!r}: use one of {', '.join(SECTIONS)}")
    if cfg.num_hidden_layers < 1 or cfg.hidden_size < 1 or cfg.vocab_size < 1:
        raise DsvError(f"{model}: num_hidden_layers, hidden_size and vocab_size must be positive")
    build = {"params": lambda: params_tables(cfg), "training": lambda: training_tables(cfg, sc),
             "inference": lambda: inference_tables(cfg, sc), "gpus": gpu_tables}
    return {
        "model": {"name": model, "model_type": cfg.model_type},
        "inputs": {**asdict(sc), "training_gpus": sc.gpus or TRAINING_GPUS, "context": sc.context or DEFAULT_CONTEXT},
        "sections": {s: build[s]() for s in sections},
    }
