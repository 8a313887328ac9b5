"""Training a small DeepSeek-V3-architecture model on a synthetic corpus (the `dsv3-mini` checkpoint).

Boundary: corpus generation, a cache-free differentiable forward built from model.py's modules,
the losses (next token, MTP, sequence-wise balance), the auxiliary-loss-free bias update, the
training loop and the export to the hub layout. Plain torch on the CPU, deterministic for a seed.
No file reads besides what it writes; no CLI (scripts/train_mini.py is the one command).

Why a synthetic corpus: MTP acceptance can only be shown on a trained model, and the text must be
predictable two tokens ahead for the MTP head to agree with the main model. So the corpus is
counting, times tables, recited lists, copying and key-value recall, in plain and chat form.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from dsv3cli.errors import DsvError

# ---- corpus -----------------------------------------------------------------------------------

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "indigo", "violet"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen", "twenty"]
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
         "Mallory", "Oscar", "Peggy", "Trent", "Victor", "Walter"]
THINGS = ["apple", "pear", "book", "coin", "stone", "shell", "card", "cup", "key", "ring"]
ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "hen", "pig"]
PLACES = ["mat", "log", "rug", "box", "bed", "hill", "wall", "roof"]
PHRASES = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "all that glitters is not gold",
    "the early bird catches the worm",
    "slow and steady wins the race",
    "every cloud has a silver lining",
    "practice makes perfect",
    "knowledge is power",
]
LISTS = {"days of the week": DAYS, "months of the year": MONTHS, "planets": PLANETS,
         "colours of the rainbow": COLOURS, "numbers in words": WORDS, "letters": LETTERS}

MAX_NUMBER = 200  # counting stays in a range a tiny model can learn as a successor table


def _count(r: random.Random) -> tuple[str, str]:
    a = r.randint(0, 150)
    b = min(a + r.randint(5, 60), MAX_NUMBER)
    return f"Count from {a} to {b}.", ", ".join(str(i) for i in range(a, b + 1)) + "."


def _count_step(r: random.Random) -> tuple[str, str]:
    s = r.choice([2, 3, 5, 10])
    a = r.randint(0, 20) * (s if r.random() < 0.5 else 1)
    nums = list(range(a, MAX_NUMBER + 1, s))[: r.randint(5, 20)]
    return f"Count by {s} from {a}.", ", ".join(map(str, nums)) + "."


def _count_down(r: random.Random) -> tuple[str, str]:
    a = r.randint(10, 100)
    b = max(a - r.randint(5, 40), 0)
    return f"Count down from {a} to {b}.", ", ".join(str(i) for i in range(a, b - 1, -1)) + "."


def _table(r: random.Random) -> tuple[str, str]:
    n = r.randint(2, 12)
    return f"Write the times table of {n}.", "\n".join(f"{n} x {i} = {n * i}" for i in range(1, 11))


def _sum(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 20), r.randint(0, 20)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def _recite(r: random.Random) -> tuple[str, str]:
    name, items = r.choice(list(LISTS.items()))
    start = r.randrange(len(items)) if r.random() < 0.5 else 0
    seq = items[start:]
    return (f"List the {name}." if start == 0 else f"List the {name} from {items[start]}."), ", ".join(seq) + "."


def _repeat(r: random.Random) -> tuple[str, str]:
    p = r.choice(PHRASES)
    n = r.randint(2, 4)
    return f"Repeat {WORDS[n]} times: {p}.", " ".join([p.capitalize() + "."] * n)


def _spell(r: random.Random) -> tuple[str, str]:
    w = r.choice(ANIMALS + PLACES + THINGS + [n.lower() for n in NAMES])
    return f"Spell the word {w}.", f"{w} is spelled " + "-".join(w) + "."


def _recall(r: random.Random) -> tuple[str, str]:
    names = r.sample(NAMES, 3)
    things = [r.choice(THINGS) for _ in names]
    counts = [r.randint(2, 9) for _ in names]
    facts = " ".join(f"{n} has {c} {t}s." for n, c, t in zip(names, counts, things))
    i = r.randrange(3)
    return f"{facts} How many {things[i]}s does {names[i]} have?", f"{names[i]} has {counts[i]} {things[i]}s."


def _story(r: random.Random) -> tuple[str, str]:
    a, p = r.choice(ANIMALS), r.choice(PLACES)
    lines = [f"The {a} sat on the {p}.", f"The {a} liked the {p}.", f"The {a} slept on the {p}.",
             f"Then the {a} got off the {p}.", "The end."]
    return f"Tell a story about a {a} and a {p}.", " ".join(lines)


TASKS: list[Callable[[random.Random], tuple[str, str]]] = [
    _count, _count, _count, _count_step, _count_down, _table, _table, _sum, _recite, _recite,
    _repeat, _spell, _recall, _story,
]

GREETINGS = [
    ("Hello!", "Hello! I am dsv3-mini. I can count, recite lists, write times tables and repeat phrases."),
    ("Who are you?", "I am dsv3-mini, a tiny DeepSeek-V3 model trained by dsv3 on a synthetic corpus."),
    ("What can you do?", "I can count, recite lists, write times tables, spell words and repeat phrases."),
]

# Prompts whose greedy continuation is long and predictable: what the MTP benchmarks decode.
SAMPLE_PROMPTS_RAW = [
    "Count from 1 to 60:",
    "Write the times table of 7:\n",
    "Count from 100 to 160:",
]
SAMPLE_PROMPTS_CHAT = [
    "Count from 1 to 60.",
    "Write the times table of 7.",
    "List the months of the year.",
    "Count from 100 to 160.",
]


def corpus_documents(seed: int, n_docs: int) -> list[tuple[str, object]]:
    """Deterministic documents: ("raw", text) or ("chat", [messages]). Same seed, same list."""
    r = random.Random(seed)
    docs: list[tuple[str, object]] = []
    for _ in range(n_docs):
        u = r.random()
        if u < 0.45:
            q, a = r.choice(TASKS)(r)
            sep = "\n" if a.count("\n") else " "
            docs.append(("raw", f"{q.rstrip('.?')}:{sep}{a}"))
        else:
            msgs = []
            if r.random() < 0.1:
                g = r.choice(GREETINGS)
                msgs += [{"role": "user", "content": g[0]}, {"role": "assistant", "content": g[1]}]
            for _ in range(r.choice([1, 1, 2, 3])):
                q, a = r.choice(TASKS)(r)
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            docs.append(("chat", msgs))
    return docs


def corpus_text_sample(seed: int = 0, n_docs: int = 4000) -> str:
    """Plain text of the corpus (chat turns flattened) for training the BPE tokenizer."""
    out = []
    for kind, d in corpus_documents(seed, n_docs):
        if kind == "raw":
            out.append(d)
        else:
            out.extend(m["content"] for m in d)  # type: ignore[union-attr]
    return "\n".join(out) + "\n"


# ---- model config -----------------------------------------------------------------------------

# Deep and narrow on purpose: DeepSeek-V3's 61 layers, so the MTP module (one more layer) is the
# same share of a forward as in the real model. On a CPU a decode step costs about the same per
# layer whatever the width, and the speedup of MTP decoding, (1 + acceptance) /
# (cost(verify K+1 tokens) / cost(1 token) + cost(MTP) / cost(main)), grows with depth: at 20
# layers its ceiling was ~1.7x. 64 is not a multiple of 128, so FP8 quantization meets ragged
# blocks; the tensors stay under 10 MB.
MINI_CONFIG = dict(
    hidden_size=64,
    intermediate_size=192,
    moe_intermediate_size=32,
    num_hidden_layers=61,
    first_k_dense_replace=1,
    num_attention_heads=2,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    num_nextn_predict_layers=1,
    max_position_embeddings=4096,
)
VOCAB_SIZE = 1024


def mini_config(vocab_size: int = VOCAB_SIZE, **overrides) -> "ModelConfig":
    """The dsv3-mini config: the tiny preset's keys (YaRN, noaux_tc, ...) with the dims above."""
    from dsv3cli.config import load_preset

    base = load_preset("tiny")
    kw = dict(MINI_CONFIG, vocab_size=vocab_size, **overrides)
    raw = dict(base.raw, **kw)
    raw.pop("quantization_config", None)
    return base.replace(**kw, quantization_config=None, raw=raw)


# ---- data -------------------------------------------------------------------------------------

def encode_documents(tok, docs: list[tuple[str, object]]) -> list[int]:
    """One token stream: raw documents as BOS text EOS, chats through the chat template
    (which already adds BOS and an EOS after every assistant turn)."""
    texts = []
    for kind, d in docs:
        if kind == "raw":
            texts.append(f"{tok.bos_token}{d}{tok.eos_token}")
        else:
            texts.append(tok.apply_chat_template(d, add_generation_prompt=False))
    ids: list[int] = []
    for enc in tok._tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
    return ids


def make_batches(stream: list[int], seq_len: int, batch_size: int, steps: int, seed: int):
    """`steps` batches [batch_size, seq_len] of packed windows, in a seeded order (repeating the
    stream in a new order when it runs out)."""
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    n = len(data) // seq_len
    rows = data[: n * seq_len].view(n, seq_len)  # [n,T]
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        yield rows[order[:batch_size]]
        order = order[batch_size:]


# ---- model ------------------------------------------------------------------------------------

def init_weights(model, seed: int) -> None:
    """Fill the (uninitialised) parameters: std 1/sqrt(fan_in) for projections, scaled down by
    sqrt(2 * layers) on the ones that write into the residual stream so a deep stack starts near
    the identity; norms 1; routing bias 0."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    depth = model.cfg.num_hidden_layers + 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                std = p.shape[1] ** -0.5
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * depth)
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()


def build_model(cfg, batch_size: int, seq_len: int, seed: int):
    """A float32 Transformer from model.py, every parameter trainable (the routing bias stays a
    buffer: the bias update moves it, not the gradient)."""
    import torch

    from dsv3cli.model import Transformer
    from dsv3cli.ops import Runtime

    model = Transformer(cfg, runtime=Runtime(dtype=torch.float32, kernels=False), max_batch_size=batch_size, max_seq_len=seq_len)
    model.attn_impl = "naive"  # K/V expanded from the latent: the plain reference path
    init_weights(model, seed)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _differentiable_ops(model):
    """The torch reference backend (dsv3cli.ops.TorchOps) made differentiable and recording every
    router call (main layers and the MTP layer: its input and chosen experts, for the balance
    loss and the bias update). The inference reference reads a float32 copy of the router weight
    and may run stacked expert weights in batched ops; training needs the parameters themselves."""
    from dsv3cli.ops import TorchOps

    class TrainOps(TorchOps):
        name = "train"

        def __init__(self, rt):
            super().__init__(rt, exact=False)
            self.calls: list[tuple[object, object, object]] = []  # (gate, x [N,D], idx [N,K])

        def router_weight(self, gate):
            return gate.weight.float()

        def route(self, gate, x, want_nobias=False):
            w, idx, nobias = super().route(gate, x, want_nobias)
            self.calls.append((gate, x, idx))
            return w, idx, nobias

        def _routed(self, moe, x, w, idx):
            return self._expert_loop(moe, x, w, idx)

    return TrainOps(model.runtime)


def training_forward(model, tokens, ops=None):
    """tokens [B,T] -> (main logits [B,T,V], MTP logits [B,T-1,V]) with autograd, through the
    model's modules with a differentiable torch backend (`_differentiable_ops`, made here when
    `ops` is None). Each step starts from fresh zero caches so no autograd history leaks from the
    previous step through them."""
    import torch

    from dsv3cli.model import MLA, Block, Positions

    B, T = tokens.shape
    ops = ops or _differentiable_ops(model)
    for m in model.modules():
        if isinstance(m, MLA):
            m.kv_cache = torch.zeros_like(m.kv_cache)
    pos = torch.arange(T).expand(B, T)

    def at(n: int) -> Positions:
        return Positions(pos[:, :n], n, model.rope_cos, model.rope_sin, model.max_seq_len, ops)

    h = model.embed_tokens(tokens)  # [B,T,D]
    for layer in model.layers:
        h = layer(h, at(T))
    hidden = model.norm(h, ops)  # [B,T,D]
    logits = model.lm_head(hidden, ops)
    # MTP at position i: h_i (final-normed) with t_{i+1}, predicting t_{i+2}.
    m = model.mtp
    x = ops.mtp_entry(m, m.embed_tokens or model.embed_tokens, tokens[:, 1:], hidden[:, :-1])
    x = Block.forward(m, x, at(T - 1))
    mtp_logits = (m.shared_head.head or model.lm_head)(m.shared_head.norm(x, ops), ops)  # [B,T-1,V]
    return logits, mtp_logits


def balance_loss(calls, batch_size: int) -> "torch.Tensor":
    """Sequence-wise balance loss of the report, summed over MoE layers:
    sum_i f_i P_i per sequence, f_i = E/(K T) * (tokens of the sequence routed to i),
    P_i = mean over the sequence of the sum-normalised sigmoid scores."""
    import torch
    import torch.nn.functional as F

    total = torch.zeros(())
    for gate, x, idx in calls:
        E = gate.weight.shape[0]
        s = F.linear(x.float(), gate.weight.float()).sigmoid()  # [N,E]
        s = (s / s.sum(-1, keepdim=True)).view(batch_size, -1, E)  # [B,T,E]
        T, K = s.shape[1], idx.shape[-1]
        counts = F.one_hot(idx.view(batch_size, -1), E).sum(1).float()  # [B,T*K,E] -> [B,E]
        f = counts * E / (K * T)
        total = total + (f * s.mean(1)).sum(-1).mean()
    return total


def update_bias(calls, gamma: float) -> list[float]:
    """The auxiliary-loss-free update: bias_i += gamma * sign(mean load - load_i) per router.
    Returns each router's MaxVio = (max load - mean load) / mean load for this batch."""
    import torch

    vio = []
    with torch.no_grad():
        for gate, _, idx in calls:
            E = gate.weight.shape[0]
            load = torch.bincount(idx.flatten(), minlength=E).float()  # [E]
            gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
            vio.append(float((load.max() - load.mean()) / load.mean()))
    return vio


# ---- training loop ----------------------------------------------------------------------------

@dataclass
class TrainSettings:
    seed: int = 0
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    mtp_weight: float = 0.3  # λ: the report uses 0.3 early in training, then 0.1
    balance_weight: float = 1e-3  # α, sequence-wise balance loss
    # γ, bias update speed. The report uses 0.001 over 14.8T tokens; a run of a few hundred steps
    # needs a larger step for the bias to matter at all.
    gamma: float = 0.01
    threads: int = 1  # one thread: the same bits on any machine, and no thread thrash on a busy one
    n_docs: int = 20000  # corpus documents (the stream is reshuffled when the steps need more)
    tokenizer_docs: int = 4000  # documents the BPE is trained on
    vocab_size: int = VOCAB_SIZE
    config: dict = field(default_factory=dict)  # overrides of MINI_CONFIG


@dataclass
class TrainResult:
    model: object
    tokenizer: object
    cfg: object
    history: list[dict]
    wall_s: float


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine down to a tenth."""
    import math

    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(s: TrainSettings, tokenizer_dir, log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train dsv3-mini. `tokenizer_dir` receives the tokenizer files (trained on the corpus) first.
    Deterministic for `s.seed` at a fixed thread count."""
    with fixed_threads(s.threads, deterministic=True):
        return _train(s, tokenizer_dir, log)


@contextmanager
def fixed_threads(threads: int, deterministic: bool = False):
    """Run with `threads` torch threads (and deterministic algorithms), restoring both after:
    the caller's process (a test session, a CLI) keeps its own settings."""
    import torch

    before, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic or det)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(det)


def _train(s: TrainSettings, tokenizer_dir, log) -> TrainResult:
    import time
    from pathlib import Path

    import torch
    import torch.nn.functional as F

    from dsv3cli.tokenizer import load_tokenizer, write_tokenizer_files

    torch.manual_seed(s.seed)
    t0 = time.perf_counter()

    Path(tokenizer_dir).mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(tokenizer_dir, s.vocab_size, model_max_length=4096, text=corpus_text_sample(s.seed, s.tokenizer_docs))
    tok = load_tokenizer(tokenizer_dir)
    stream = encode_documents(tok, corpus_documents(s.seed + 1, s.n_docs))
    cfg = mini_config(tok.vocab_size, **s.config)
    model = build_model(cfg, s.batch_size, s.seq_len, s.seed)
    rec = _differentiable_ops(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("embed_tokens.weight")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith("embed_tokens.weight"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95), foreach=False,
    )
    history: list[dict] = []
    model.train()
    for step, batch in enumerate(make_batches(stream, s.seq_len, s.batch_size, s.steps, s.seed)):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, s)
        rec.calls.clear()
        logits, mtp_logits = training_forward(model, batch, rec)  # [B,T,V], [B,T-1,V]
        V = logits.shape[-1]
        main = F.cross_entropy(logits[:, :-1].reshape(-1, V), batch[:, 1:].reshape(-1))
        mtp = F.cross_entropy(mtp_logits[:, :-1].reshape(-1, V), batch[:, 2:].reshape(-1))
        bal = balance_loss(rec.calls, s.batch_size)
        loss = main + s.mtp_weight * mtp + s.balance_weight * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        vio = update_bias(rec.calls, s.gamma)
        rec.calls.clear()
        row = {"step": step, "loss": loss.item(), "main": main.item(), "mtp": mtp.item(), "balance": bal.item(),
               "max_vio": sum(vio) / len(vio), "lr": lr_at(step, s), "s": time.perf_counter() - t0}
        history.append(row)
        if log is not None:
            log(row)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TrainResult(model, tok, cfg, history, time.perf_counter() - t0)


# ---- export -----------------------------------------------------------------------------------

def hub_tensors(model) -> dict[str, "torch.Tensor"]:
    """The model's weights under the hub's names, in the hub's storage order: BF16, except the
    routing bias (float32, as on the hub). The MTP layer gets its copies of the embedding and
    the head (shared in training, stored separately on the hub)."""
    import torch

    from dsv3cli.checkpoint import expected_shapes
    from dsv3cli.loading import hf_name

    cfg = model.cfg
    N = cfg.num_hidden_layers
    sd = {hf_name(k, N): v.detach() for k, v in model.state_dict().items()}
    if model.mtp is not None:
        sd.setdefault(f"model.layers.{N}.embed_tokens.weight", sd["model.embed_tokens.weight"])
        sd.setdefault(f"model.layers.{N}.shared_head.head.weight", sd["lm_head.weight"])
    want = expected_shapes(cfg, fp8=False)
    if set(sd) != set(want):
        raise DsvError(f"export: the model's tensors differ from the hub table: extra {sorted(set(sd) - set(want))[:3]}, "
                       f"missing {sorted(set(want) - set(sd))[:3]}")
    out = {}
    for name, shape in want.items():
        t = sd[name]
        if tuple(t.shape) != tuple(shape):
            raise DsvError(f"export: {name} has shape {list(t.shape)}, the hub table says {list(shape)}")
        dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        out[name] = t.to(dtype).contiguous().clone()
    return out


def export(model, out, s: TrainSettings, shards: int = 2) -> int:
    """Write `model` (trained with settings `s`) to `out` in the hub layout: config, generation
    config, tokenizer (the same BPE as in training), shards, and the index last. Returns the
    bytes of tensor data."""
    from pathlib import Path

    from dsv3cli.tiny import write_checkpoint
    from dsv3cli.tokenizer import write_tokenizer_files

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    tensors = hub_tensors(model)
    names = list(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    # Contiguous shards of about equal bytes, in storage order.
    total, acc, groups = sum(sizes), 0, [[] for _ in range(shards)]
    for n, b in zip(names, sizes):
        groups[min(int(acc * shards / total), shards - 1)].append(n)
        acc += b
    groups = [g for g in groups if g]
    for p in out.glob("model*.safetensors*"):  # a stale shard of a previous export must not linger
        p.unlink()
    text = corpus_text_sample(s.seed, s.tokenizer_docs)
    return write_checkpoint(out, cfg, ({n: tensors[n] for n in g} for g in groups), len(groups),
                            lambda folder: write_tokenizer_files(folder, s.vocab_size, 4096, text))


# ---- a quick MTP measurement --------------------------------------------------------------------

def measure_mtp(ckpt, *, ks=(0, 1), max_new_tokens: int = 160, repeats: int = 3, dtype=None, threads: int = 1,
                prompts: list[str] | None = None) -> dict:
    """Greedy decoding of the sample chat prompts (batch 1) with `--mtp K` for each K in `ks`,
    through generation.generate: acceptance per draft position, tokens per main forward and
    decode tokens/s (best of `repeats`, K interleaved so machine load hits all K alike),
    with the speedup over K = 0. The benchmark proper is benchmarks/mtp.py."""
    import torch

    with fixed_threads(threads):
        return _measure_mtp(ckpt, ks, max_new_tokens, repeats, dtype or torch.bfloat16, prompts)


def _measure_mtp(ckpt, ks, max_new_tokens, repeats, dtype, prompts) -> dict:
    from dsv3cli.generation import GenStats, generate
    from dsv3cli.loading import load_model
    from dsv3cli.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    model = load_model(ckpt, dtype=dtype, max_seq_len=512)
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in prompts or SAMPLE_PROMPTS_CHAT]
    best: dict[int, dict] = {}
    texts: dict[int, list[str]] = {}
    for _ in range(repeats):
        for k in ks:
            total = GenStats()
            outs = []
            for p in ids:
                out, st = generate(model, [p], max_new_tokens=max_new_tokens, max_seq_len=512, mtp=k, eos_ids=tok.eos_ids)
                total.add(st)
                outs.append(out[0])
            d = total.to_dict()
            if k not in best or (d["decode_tokens_per_s"] or 0) > (best[k]["decode_tokens_per_s"] or 0):
                best[k] = d
            texts[k] = [tok.decode(o) for o in outs]
    base = best[ks[0]]["decode_tokens_per_s"] if ks and ks[0] == 0 else None
    result = {}
    for k in ks:
        d = best[k]
        result[k] = {
            "acceptance_per_position": d["acceptance_per_position"],
            "tokens_per_forward": d["tokens_per_forward"],
            "decode_tokens_per_s": d["decode_tokens_per_s"],
            "speedup": round(d["decode_tokens_per_s"] / base, 3) if base and d["decode_tokens_per_s"] else None,
            "decode_tokens": d["generated_tokens"],
            "identical_to_k0": texts[k] == texts[ks[0]],
        }
    result["texts"] = texts[ks[0]]
    return result
