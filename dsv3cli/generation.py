"""Token-level generation: prefill, the decode loop, sampling, and MTP speculative decoding.

Boundary: token ids in, token ids out. Works against the model's interface
(`forward(tokens, start_pos, logits_at=None) -> (logits, hidden)`, `mtp_forward(hidden, next_tokens,
start_pos, logits_at=None)`)
and a `Dist` (so every rank feeds the same tokens); knows nothing about text, files or the CLI.

Cache bookkeeping (gpt-fast style, a static cache indexed by position): each sequence b has `pos[b]`,
the position of its newest token `cur[b]`, which is not yet in the main cache. A step feeds
`[cur, d_1..d_K]` at positions pos..pos+K; after accepting n drafts, the main cache is right for
positions <= pos+n and the rest is overwritten by later steps. The MTP module at position p reads
(h_p, t_{p+1}); its cache entries past the accepted prefix were written from drafted hiddens, so
every step first rewrites positions pos..pos+n with the true pairs (one MTP forward over K+1
positions), and that forward's output at pos+n is the first draft of the next step.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import DsvError, UsageError
from .model import rows_at
from .parallel import Dist
from .render import plural


# ---- sampling ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def check(self) -> None:
        if self.temperature < 0:
            raise UsageError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UsageError(f"--top-k {self.top_k}: must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p {self.top_p}: must be in (0, 1] (1 = off)")


def probs_from_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The sampling distribution [..., V] float32: temperature, then top-k, then top-p."""
    x = logits.float() / s.temperature
    V = x.shape[-1]
    if 0 < s.top_k < V:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = torch.softmax(x, dim=-1)
    if s.top_p < 1.0:
        sp, idx = p.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the mass
        # (the top token is always kept).
        drop = (sp.cumsum(-1) - sp) >= s.top_p
        sp = sp.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter_(-1, idx, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def sample_from(probs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One draw per row of probs [..., V] -> LongTensor [...].

    The exponential race (argmax p_i / E_i, E_i ~ Exp(1)) picks i with probability p_i / sum(p),
    needs no normalisation and never fails on a row of zeros (such rows are never used).
    """
    e = torch.empty_like(probs).exponential_(1.0, generator=g)
    return (probs / e).argmax(dim=-1)


def speculative_accept(
    drafts: torch.Tensor, p_draft: torch.Tensor, p_main: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling over K drafted tokens (Leviathan et al. / Chen et al.).

    drafts [B,K] were drawn from p_draft [B,K,V]; p_main [B,K+1,V] is the main model's
    distribution at each of the K+1 scored positions. Draft j is accepted with probability
    min(1, p_main/p_draft) while all before it were; at the first rejection one token is drawn
    from normalise(max(0, p_main - p_draft)); when all K are accepted a bonus token is drawn from
    p_main[:, K]. Returns (n_accepted [B], tokens [B,K+1]) where tokens[b, :n+1] are emitted.
    """
    B, K = drafts.shape
    rows = torch.arange(B, device=drafts.device)
    pm = p_main[:, :K].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # [B,K]
    pd = p_draft.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # [B,K]
    u = torch.rand(B, K, generator=g, device=drafts.device)
    ok = u * pd < pm  # u < pm/pd without dividing; pm >= pd always accepts
    n = ok.long().cumprod(-1).sum(-1)  # [B] longest accepted prefix
    resid = (p_main[:, :K] - p_draft).clamp_min(0.0)  # [B,K,V]
    extra_p = torch.cat([resid, p_main[:, K:]], dim=1)[rows, n]  # [B,V]
    extra = sample_from(extra_p, g)  # [B]
    out = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)  # [B,K+1]
    out[rows, n] = extra
    return n, out


# ---- stats -----------------------------------------------------------------------------------


@dataclass
class GenStats:
    """Counters over one or more `generate` calls; `to_dict` derives the rates."""

    sequences: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float | None = None  # of the first batch: prefill + first token
    decode_tokens: int = 0  # tokens emitted by decode steps (the prefill's first token excluded)
    main_forwards: int = 0  # decode-step forwards of the main model
    row_steps: int = 0  # (sequence, step) pairs that were still generating
    step_tokens: int = 0  # tokens those row-steps produced before EOS/limit truncation
    mtp: int = 0
    drafted_at: list[int] = field(default_factory=list)  # per draft position
    accepted_at: list[int] = field(default_factory=list)

    def add(self, o: "GenStats") -> None:
        for name in ("sequences", "prompt_tokens", "generated_tokens", "prefill_s", "decode_s",
                     "decode_tokens", "main_forwards", "row_steps", "step_tokens"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        if self.ttft_s is None:
            self.ttft_s = o.ttft_s
        self.mtp = max(self.mtp, o.mtp)
        for name in ("drafted_at", "accepted_at"):
            a, b = getattr(self, name), getattr(o, name)
            setattr(self, name, [x + y for x, y in zip(a + [0] * (len(b) - len(a)), b + [0] * (len(a) - len(b)))])

    def to_dict(self) -> dict:
        drafted, accepted = sum(self.drafted_at), sum(self.accepted_at)
        rss_mb, cuda_mb = peak_memory_mb()
        return {
            "sequences": self.sequences,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "prefill_tokens_per_s": _rate(self.prompt_tokens, self.prefill_s),
            "decode_tokens_per_s": _rate(self.decode_tokens, self.decode_s),
            "time_to_first_token_s": None if self.ttft_s is None else round(self.ttft_s, 6),
            "main_forwards": self.main_forwards,
            "tokens_per_forward": round(self.step_tokens / self.row_steps, 4) if self.row_steps else None,
            "mtp": self.mtp,
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "acceptance_per_position": [round(a / d, 4) if d else None for a, d in zip(self.accepted_at, self.drafted_at)],
            "peak_rss_mb": rss_mb,
            "peak_cuda_mb": cuda_mb,
        }


def _rate(n: int, s: float) -> float | None:
    return round(n / s, 3) if s > 0 else None


def peak_memory_mb() -> tuple[float, float | None]:
    """(peak resident set of this process, peak CUDA memory allocated or None) in MB."""
    return round(peak_rss_bytes() / 2**20, 1), (
        round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )


def peak_rss_mb_per_rank(dist: Dist) -> list[float]:
    """Every rank's peak resident set in MB, on every rank (a collective when world_size > 1)."""
    mine = round(peak_rss_bytes() / 2**20, 1)
    if dist.world_size == 1:
        return [mine]
    import torch.distributed as tdist

    out: list = [None] * dist.world_size
    tdist.all_gather_object(out, mine, group=dist.group)
    return out


def peak_rss_bytes() -> int:
    """VmHWM of this process. getrusage's ru_maxrss is not used where /proc exists: Linux carries
    it over from the parent across fork + exec, so a small child of a big parent reports the parent's."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---- the loop --------------------------------------------------------------------------------


def model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _sync(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Every rank takes rank 0's tokens, so ranks can never feed different inputs."""
    if dist.world_size > 1:
        torch.distributed.broadcast(t, src=0, group=dist.group)
    return t


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_seq_len: int) -> None:
    """Raise a UsageError for an empty prompt, an id outside the vocabulary or a prompt with no room."""
    for i, p in enumerate(prompts):
        if not p:
            raise UsageError(f"prompt {i + 1}: empty; give at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise UsageError(f"prompt {i + 1}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        if len(p) >= max_seq_len:
            raise UsageError(
                f"prompt {i + 1} ({plural(len(p), 'token')}) leaves no room under --max-seq-len {max_seq_len}; "
                "raise --max-seq-len or shorten the prompt"
            )


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    max_seq_len: int,
    sampling: Sampling = Sampling(),
    mtp: int = 0,
    eos_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    dist: Dist = Dist(),
    on_tokens: Callable[[int, list[int]], None] | None = None,
) -> tuple[list[list[int]], GenStats]:
    """Generate up to `max_new_tokens` per prompt (one batch, right-padded); stop a sequence at
    an id in `eos_ids` (kept in the output) or when prompt + output reach `max_seq_len`.

    `mtp` = K > 0 drafts K tokens per step with the model's MTP module and verifies them with one
    main forward. `on_tokens(b, ids)` is called with each sequence's new tokens as they are decided.
    Returns (generated ids per prompt, stats).
    """
    sampling.check()
    if mtp < 0:
        raise UsageError(f"--mtp {mtp}: must be >= 0")
    if mtp and not getattr(model, "has_mtp", False):
        raise UsageError(f"--mtp {mtp}: this checkpoint has no MTP layer; use --mtp 0")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    if not prompts or any(not p or len(p) >= max_seq_len for p in prompts):
        raise UsageError(f"every prompt needs 1 to {max_seq_len - 1} tokens (--max-seq-len {max_seq_len})")
    B = len(prompts)
    device = model_device(model)
    g = generator if generator is not None else make_generator(0, device)
    eos = set(int(e) for e in eos_ids)
    lens = [len(p) for p in prompts]
    T = max(lens)
    st = GenStats(sequences=B, prompt_tokens=sum(lens), mtp=mtp, drafted_at=[0] * mtp, accepted_at=[0] * mtp)
    rows = torch.arange(B, device=device)

    # Right-padded prompts: a padded slot writes cache entries past the prompt's end, which the
    # position-causal mask hides and the following steps overwrite.
    tokens = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)
    last = torch.tensor(lens, device=device) - 1  # [B]
    zeros = torch.zeros(B, dtype=torch.long, device=device)

    def pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B,V] -> (tokens [B] identical on every rank, their distribution [B,V] or None when greedy)."""
        if sampling.greedy:
            return _sync(logits.argmax(-1), dist), None
        p = probs_from_logits(logits, sampling)
        return _sync(sample_from(p, g), dist), p

    t0 = time.perf_counter()
    logits, hidden = model.forward(tokens, zeros, logits_at=last)  # [B,V] at each prompt's end, [B,T,D]
    check_finite(logits, range(B), [1] * B, lambda: first_nonfinite(model, lambda: model.forward(tokens, zeros, logits_at=last)))
    first, _ = pick(logits)  # [B]
    first_l = first.tolist()
    t1 = time.perf_counter()
    st.prefill_s, st.ttft_s = t1 - t0, t1 - t0

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B

    def emit(b: int, ids: list[int]) -> None:
        """Append ids to sequence b, cut at EOS, max_new_tokens and max_seq_len."""
        room = min(max_new_tokens - len(out[b]), max_seq_len - lens[b] - len(out[b]))
        ids = ids[:room]
        for j, t in enumerate(ids):
            if t in eos:
                ids = ids[: j + 1]
                break
        out[b].extend(ids)
        if on_tokens is not None and ids:
            on_tokens(b, ids)
        if len(ids) == room or (ids and ids[-1] in eos):
            done[b] = True

    for b in range(B):
        emit(b, [first_l[b]])
    st.generated_tokens += B

    cur = first  # [B] newest token, not yet in the main cache
    pos = list(lens)  # its position, per sequence

    def n_drafts() -> int:
        """Drafts for the next step: fewer near the end of the cache or of max_new_tokens."""
        active = [b for b in range(B) if not done[b]]
        if not mtp or not active:
            return 0
        room = min(max_seq_len - 1 - pos[b] for b in active)
        need = max(max_new_tokens - len(out[b]) for b in active) - 1
        return max(0, min(mtp, room, need))

    def starts() -> torch.Tensor:
        # Finished rows compute garbage at positions 0.. of their own (unused) cache rows.
        return torch.tensor([0 if done[b] else pos[b] for b in range(B)], dtype=torch.long, device=device)

    start = starts()  # [B] position of `cur`
    drafts = p_draft = None
    if mtp and not all(done):
        # MTP over the prompt: position p pairs h_p with t_{p+1}; the last one with the new token.
        nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # [B,T]
        nxt[rows, last] = first
        m_logits, m_hidden = model.mtp_forward(hidden, nxt, zeros, logits_at=last)  # [B,V], [B,T,D]
        drafts, p_draft = _draft(model, m_logits, m_hidden, last, start, n_drafts(), pick)

    t2 = time.perf_counter()
    while not all(done):
        active = [b for b in range(B) if not done[b]]
        k = 0 if drafts is None else drafts.shape[1]
        feed = cur.unsqueeze(1) if k == 0 else torch.cat([cur.unsqueeze(1), drafts], dim=1)  # [B,k+1]
        logits, hidden = model.forward(feed, start)  # [B,k+1,V], [B,k+1,D]
        st.main_forwards += 1
        check_finite(logits, active, [len(out[b]) + 1 for b in active], lambda: first_nonfinite(model, lambda: model.forward(feed, start)))
        if sampling.greedy:
            # The argmax at each scored position is what plain greedy decoding emits after the
            # drafts before it, so drafts are accepted while they equal it.
            toks = _sync(logits.argmax(-1), dist)  # [B,k+1]
            toks_l = toks.tolist()
            drafts_l = drafts.tolist() if k else [[]] * B
            n_l = [_agreeing(drafts_l[b], toks_l[b]) for b in range(B)]
        else:
            if k == 0:
                nxt_tok, _ = pick(logits[:, 0])
                n, toks = torch.zeros(B, dtype=torch.long, device=device), nxt_tok.unsqueeze(1)  # [B], [B,1]
            else:
                n, toks = speculative_accept(drafts, p_draft, probs_from_logits(logits, sampling), g)
            n, toks = _sync(n, dist), _sync(toks.contiguous(), dist)
            n_l, toks_l = n.tolist(), toks.tolist()
        for b in active:
            st.row_steps += 1
            st.step_tokens += n_l[b] + 1
            for j in range(k):
                st.drafted_at[j] += 1
                st.accepted_at[j] += int(j < n_l[b])
            before = len(out[b])
            emit(b, toks_l[b][: n_l[b] + 1])
            st.generated_tokens += len(out[b]) - before
            st.decode_tokens += len(out[b]) - before
            pos[b] += n_l[b] + 1
        cur = torch.tensor([toks_l[b][n_l[b]] for b in range(B)], dtype=torch.long, device=device)
        prev_start, start = start, starts()
        drafts = p_draft = None
        if mtp and not all(done):
            # Rewrite the MTP cache at pos..pos+n with the true (h_p, t_{p+1}) pairs; the output at
            # pos+n drafts the next step. Only the first m = max(n)+1 positions are computed (an MoE
            # forward costs more per extra token); a row with a smaller n writes garbage past its
            # pos+n, which the next step overwrites before anything reads it.
            m = max(n_l[b] for b in active) + 1
            if m < k + 1:
                hidden, toks = hidden[:, :m], toks[:, :m]
            at = [min(n_l[b], m - 1) for b in range(B)]  # finished rows may hold any n
            m_logits, m_hidden = model.mtp_forward(hidden, toks, prev_start, logits_at=at)  # [B,V], [B,m,D]
            drafts, p_draft = _draft(model, m_logits, m_hidden, at, start, n_drafts(), pick)
    st.decode_s = time.perf_counter() - t2
    return out, st


def check_finite(logits: torch.Tensor, rows: Sequence[int], steps: Sequence[int],
                 locate: Callable[[], str | None] | None = None) -> None:
    """Stop (DsvError) when the logits of a sequence still generating hold NaN or inf: argmax and
    sampling would go on emitting token 0 as if it were text. `steps[i]`: the generated token
    (from 1) that row `rows[i]` is deciding; `locate()` names the first part with a non-finite
    output (run only then: it repeats the forward)."""
    rows = list(rows)
    bad = ~torch.isfinite(logits[rows]).flatten(1).all(dim=1)
    if bad.any():
        i = int(bad.nonzero()[0])
        where = locate() if locate is not None else None
        raise DsvError(
            f"generation step {steps[i]}: the logits of prompt {rows[i] + 1} are NaN or infinite"
            f"{f' (first in the output of {where})' if where else ''}; the weights hold a NaN or inf value or "
            "overflow (run dsv3 verify --check-values on the checkpoint, or try --dtype float32)"
        )


def first_nonfinite(model, forward: Callable[[], object]) -> str | None:
    """Run `forward()` again with hooks on the embedding, each decoder layer and the final norm:
    the first of them whose output holds NaN or inf, or None."""
    parts = [("the embedding", getattr(model, "embed_tokens", None))]
    parts += [(f"layer {i}", layer) for i, layer in enumerate(getattr(model, "layers", []))]
    parts.append(("the final norm", getattr(model, "norm", None)))
    found: list[str] = []

    def hook(name: str):
        def record(module, inputs, output) -> None:
            t = output[0] if isinstance(output, tuple) else output
            if not found and torch.is_tensor(t) and not bool(torch.isfinite(t).all()):
                found.append(name)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in parts if m is not None]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _agreeing(drafts: list[int], top: list[int]) -> int:
    """How many drafts, from the first, equal the main model's argmax at their position."""
    n = 0
    while n < len(drafts) and drafts[n] == top[n]:
        n += 1
    return n


def _draft(model, logits: torch.Tensor, hidden: torch.Tensor, at: Sequence[int] | torch.Tensor, pos: torch.Tensor, K: int, pick):
    """K draft tokens for positions pos+1..pos+K (pos [B]: the newest token's position).

    logits [B,V] are the MTP output at position pos-1 (it predicts t_{pos+1}), which is row at[b]
    of the module's hidden [B,T,D]; draft j > 1 applies the module again at position pos+j-2 to
    its own hidden and draft. Returns (drafts [B,K], their distributions [B,K,V] or None when
    greedy), or (None, None) for K=0.
    """
    if K == 0:
        return None, None
    h = rows_at(hidden, at) if K > 1 else None  # [B,D]
    toks, probs = [], []
    for j in range(K):
        if j:
            m_logits, m_hidden = model.mtp_forward(h.unsqueeze(1), toks[-1].unsqueeze(1), pos + j - 1)  # [B,1,V], [B,1,D]
            logits, h = m_logits[:, 0], m_hidden[:, 0]
        t, p = pick(logits)
        toks.append(t)
        probs.append(p)
    drafts = torch.stack(toks, dim=1) if K > 1 else toks[0].unsqueeze(1)  # [B,K]
    return drafts, None if probs[0] is None else torch.stack(probs, dim=1)
