"""MTP speculative decoding: greedy output identical to plain greedy (every K, batch size and
process count), the MTP cache right after partial acceptance, and speculative sampling keeping the
distribution of plain sampling (a chi-square test on a tiny vocabulary)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy import stats as sps

from dsv3_kernels.cpu import supported_variants
from dsv3cli import ops
from dsv3cli.generation import Sampling, generate, make_generator, probs_from_logits, sample_from, speculative_accept
from dsv3cli.loading import load_model
from dsv3cli.ops import Runtime

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 40]]
MAX_SEQ = 64


# ---- speculative sampling keeps the distribution -------------------------------------------------


def spec_sample_chain(K: int, s: Sampling, *, N: int = 200_000, L: int = 3, V: int = 7, seed: int = 0, accept_all: bool = False):
    """Run speculative sampling on synthetic Markov chains (main and a different draft chain over V
    tokens, both through the same temperature/top-k/top-p) until every one of N sequences has L
    tokens. Returns (observed counts of the first L tokens [V**L], plain sampling's probabilities)."""
    g = torch.Generator().manual_seed(seed)
    lm = torch.randn(V, V, generator=g) * 1.5
    Pm = probs_from_logits(lm, s)  # [V,V]: row = previous token
    Pd = probs_from_logits(lm + torch.randn(V, V, generator=g), s)
    buf = torch.zeros(N, L + K + 1, dtype=torch.long)
    have = torch.zeros(N, dtype=torch.long)
    rows = torch.arange(N)
    prev = torch.zeros(N, dtype=torch.long)
    while int(have.min()) < L:
        drafts, pds, x = [], [], prev
        for _ in range(K):
            pd = Pd[x]
            x = sample_from(pd, g)
            drafts.append(x)
            pds.append(pd)
        d = torch.stack(drafts, 1)  # [N,K]
        p_main = Pm[torch.cat([prev[:, None], d], 1)]  # [N,K+1,V]
        if accept_all:  # a broken verifier, to show the test can fail
            n, out = torch.full((N,), K), torch.cat([d, sample_from(p_main[:, K], g)[:, None]], 1)
        else:
            n, out = speculative_accept(d, torch.stack(pds, 1), p_main, g)
        for j in range(K + 1):
            m = (j <= n) & (have + j < buf.shape[1])
            buf[rows[m], (have + j)[m]] = out[m, j]
        have = have + n + 1
        prev = out[rows, n]
    idx = (buf[:, :L] * (V ** torch.arange(L - 1, -1, -1))).sum(1)
    observed = torch.bincount(idx, minlength=V**L).double()
    # plain sampling: P(x1..xL) = Pm(x1|0) Pm(x2|x1) ... Pm(xL|xL-1)
    p = Pm[0].double()
    for _ in range(L - 1):  # p over prefixes [V**l]; a prefix's last token is its index % V
        p = (p[:, None] * Pm.double()[torch.arange(p.numel()) % V]).reshape(-1)
    return observed, p


def chi_square_p(observed: torch.Tensor, p: torch.Tensor) -> float:
    N = observed.sum()
    assert observed[p == 0].sum() == 0, "a token outside top-k/top-p was emitted"
    exp = p * N
    keep = exp > 5
    chi = float(((observed[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(sps.chi2.sf(chi, int(keep.sum()) - 1))


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("s", [Sampling(1.0), Sampling(0.8, top_k=5, top_p=0.9)], ids=["plain", "topk-topp"])
def test_speculative_sampling_keeps_the_distribution(K, s):
    observed, p = spec_sample_chain(K, s, seed=K)
    assert chi_square_p(observed, p) > 1e-3
    tv = 0.5 * float((observed / observed.sum() - p).abs().sum())
    assert tv < 0.02


def test_the_sampling_test_can_fail():
    observed, p = spec_sample_chain(2, Sampling(1.0), accept_all=True)
    assert chi_square_p(observed, p) < 1e-6


# ---- greedy: identical tokens, right caches ------------------------------------------------------


def make_agreeable(src: Path, dst: Path, alpha: float = 0.2) -> Path:
    """A copy of a BF16 checkpoint whose MTP drafts are often right: attention and MLP outputs are
    scaled by alpha (the residual stream carries the current token's embedding, so the main model is
    close to a bigram model) and eh_proj passes the next token's embedding through. Random weights
    accept nothing; this accepts some drafts and rejects others, at every draft position."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
            continue
        ts = load_file(f)
        for name, t in ts.items():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                ts[name] = (t.float() * alpha).to(t.dtype)
            elif name.endswith("eh_proj.weight"):
                D = t.shape[0]
                w = torch.zeros_like(t)
                w[:, :D] = torch.eye(D, dtype=t.dtype)
                ts[name] = w
        save_file(ts, dst / f.name, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def agree_ckpt(tiny_bf16, tmp_path_factory):
    return make_agreeable(tiny_bf16, tmp_path_factory.mktemp("agree") / "ckpt")


@pytest.fixture(scope="module")
def models(tiny_bf16, agree_ckpt):
    kw = dict(dtype=torch.float32, max_batch_size=3, max_seq_len=MAX_SEQ)
    return {"random": load_model(tiny_bf16, **kw), "agree": load_model(agree_ckpt, **kw),
            "fp8-head": load_model(agree_ckpt, head_fp8=True, **kw)}


@pytest.mark.parametrize("which", ["random", "agree", "fp8-head"])
def test_mtp_greedy_equals_plain_greedy(models, which):
    model = models[which]
    for prompts in (PROMPTS, PROMPTS[2:]):
        plain, _ = generate(model, prompts, max_new_tokens=24, max_seq_len=MAX_SEQ, mtp=0)
        for K in (1, 2, 3):
            out, st = generate(model, prompts, max_new_tokens=24, max_seq_len=MAX_SEQ, mtp=K)
            assert out == plain, f"K={K}, batch {len(prompts)}"
            d = st.to_dict()
            if which == "agree" and len(prompts) == 3:
                # partial acceptance happened at every draft position, or the test proves little
                assert all(0 < a < 1 for a in d["acceptance_per_position"]), d["acceptance_per_position"]
                assert d["tokens_per_forward"] > 1.1
    # Near the end of the cache fewer tokens are drafted; output still identical.
    plain, _ = generate(model, PROMPTS, max_new_tokens=60, max_seq_len=20, mtp=0)
    out, _ = generate(model, PROMPTS, max_new_tokens=60, max_seq_len=20, mtp=3)
    assert out == plain and [len(o) for o in out] == [15, 18, 9]


# Every backend this machine can run: each C kernel variant its CPU executes, and the torch
# reference (kernels off); both dtypes; one and two threads.
RUNTIMES = [(v, dt, th) for v in (*supported_variants(), None) for dt in (torch.float32, torch.bfloat16) for th in (1, 2)]
PROMPTS4 = PROMPTS + [[20, 21, 22, 23, 24, 25, 26]]


def _runtime_id(r) -> str:
    v, dt, th = r
    return f"{v or 'torch'}-{str(dt).removeprefix('torch.')}-{th}t"


@pytest.fixture
def split_small_calls(monkeypatch):
    """Split even tiny C calls across the runtime's threads, so two threads really run."""
    monkeypatch.setattr(ops, "PARALLEL_MACS", 1)


@pytest.mark.parametrize("variant,dtype,threads", RUNTIMES, ids=map(_runtime_id, RUNTIMES))
def test_mtp_greedy_equals_plain_greedy_on_every_backend(agree_ckpt, variant, dtype, threads, split_small_calls):
    """K = 1, 2, 3 against K = 0 for batches of 1 to 4 on every backend: the verification forward
    of K+1 tokens must give each row the numbers of single decode steps, whatever the other rows
    (other sequences, at other positions, or finished ones computing garbage)."""
    rt = Runtime(dtype=dtype, threads=threads, kernels=variant is not None, variant=variant)
    model = load_model(agree_ckpt, runtime=rt, max_batch_size=4, max_seq_len=MAX_SEQ)
    assert model.runtime.ops(True).name == ("torch" if variant is None else "cpu")
    accepted = 0
    for B in (1, 2, 3, 4):
        prompts = PROMPTS4[:B]
        plain, _ = generate(model, prompts, max_new_tokens=16, max_seq_len=MAX_SEQ, mtp=0)
        for K in (1, 2, 3):
            out, st = generate(model, prompts, max_new_tokens=16, max_seq_len=MAX_SEQ, mtp=K)
            assert out == plain, f"{_runtime_id((variant, dtype, threads))}: K={K}, batch {B}"
            accepted += st.to_dict()["accepted"]
    assert accepted > 0  # drafts were accepted (and rejected: see test_mtp_greedy_equals_plain_greedy)


@pytest.mark.parametrize("variant,dtype,threads", RUNTIMES, ids=map(_runtime_id, RUNTIMES))
def test_verification_forward_equals_single_steps_bit_for_bit(tiny_bf16, variant, dtype, threads, split_small_calls):
    """The property behind greedy exactness, at the forward: T tokens at once give the logits of
    T one-token steps, bit for bit, and a row's logits do not change when another row's tokens
    do."""
    rt = Runtime(dtype=dtype, threads=threads, kernels=variant is not None, variant=variant)
    model = load_model(tiny_bf16, runtime=rt, max_batch_size=3, max_seq_len=MAX_SEQ)
    g = torch.Generator().manual_seed(11)
    V = model.cfg.vocab_size
    prompt = torch.randint(0, V, (3, 9), generator=g)
    model(prompt, torch.zeros(3, dtype=torch.long))
    starts = torch.tensor([9, 5, 7])  # ragged: rows past their prompts' ends overwrite padding
    for T in (2, 4):
        toks = torch.randint(0, V, (3, T), generator=g)
        steps = torch.cat([model(toks[:, t : t + 1], starts + t)[0] for t in range(T)], dim=1)  # [3,T,V]
        together = model(toks, starts)[0]
        assert torch.equal(together, steps), f"{_runtime_id((variant, dtype, threads))}: T={T}"
        other = toks.clone()
        other[0] = torch.randint(0, V, (T,), generator=g)
        assert torch.equal(model(other, starts)[0][1:], together[1:]), "a row depends on another row's tokens"


def reference_acceptance(model, prompt: list[int], generated: list[int], K: int) -> list[int]:
    """Accepted drafts per position, with every draft recomputed from scratch: the main hiddens of
    the whole (final) sequence, then the MTP module over the true (h_p, t_{p+1}) pairs of the
    history, then K-1 applications to its own hidden and draft."""
    seq = torch.tensor([prompt + generated])
    _, h = model.forward(seq, torch.tensor([0]))  # [1,S,D]
    accepted, L, pos = [0] * K, len(prompt), len(prompt)
    zero = torch.tensor([0])
    while pos - L + 1 < len(generated):
        k = min(K, len(generated) - (pos - L + 1) - 1)
        m_logits, m_hidden = model.mtp_forward(h[:, :pos], seq[:, 1 : pos + 1], zero)
        logit, hid, n = m_logits[:, -1], m_hidden[:, -1], 0
        for j in range(k):
            if j:
                m_logits, m_hidden = model.mtp_forward(hid[:, None], d[:, None], torch.tensor([pos + j - 1]))
                logit, hid = m_logits[:, 0], m_hidden[:, 0]
            d = logit.argmax(-1)
            if n == j and int(d) == int(seq[0, pos + 1 + j]):
                n += 1
        for j in range(n):
            accepted[j] += 1
        pos += n + 1
    return accepted


@pytest.mark.parametrize("K", [1, 2, 3])
def test_mtp_cache_is_right_after_partial_acceptance(models, K):
    """Greedy verification hides wrong drafts, so check the drafts themselves: the acceptance counts
    must equal those of drafts recomputed from scratch at every step."""
    model = models["agree"]
    for prompt in PROMPTS:
        out, st = generate(model, [prompt], max_new_tokens=24, max_seq_len=MAX_SEQ, mtp=K)
        assert st.accepted_at == reference_acceptance(model, prompt, out[0], K)
        assert sum(st.accepted_at) > 0


def test_mtp_sampling_runs_seeded(models):
    model = models["agree"]
    kw = dict(max_new_tokens=16, max_seq_len=MAX_SEQ, sampling=Sampling(0.7, top_k=20, top_p=0.9), mtp=2)
    a, st = generate(model, PROMPTS, generator=make_generator(3, "cpu"), **kw)
    b, _ = generate(model, PROMPTS, generator=make_generator(3, "cpu"), **kw)
    assert a == b and all(len(o) == 16 for o in a)
    assert st.to_dict()["accepted"] > 0


# ---- several processes through the CLI ------------------------------------------------------------


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dsv3cli.app", "generate", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("nproc,K", [(2, 2), (4, 1)])
def test_processes_give_single_process_tokens(models, agree_ckpt, nproc, K):
    plain, _ = generate(models["agree"], PROMPTS, max_new_tokens=12, max_seq_len=MAX_SEQ, mtp=0)
    args = [str(agree_ckpt), "--json", "--dtype", "float32", "--max-new-tokens", "12", "--max-seq-len", str(MAX_SEQ),
            "--batch-size", "3", "--mtp", str(K), "--nproc", str(nproc)]
    for p in PROMPTS:
        args += ["--prompt-ids", ",".join(map(str, p))]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [o["generated_ids"] for o in doc["outputs"]] == plain
    assert doc["stats"]["mtp"] == K and doc["stats"]["accepted"] > 0
    assert "MTP" in r.stderr and r.stderr.count("\n") == 1  # rank 0's summary line only


TRAINED = Path(__file__).resolve().parents[1] / "checkpoints" / "dsv3-mini"


@pytest.mark.skipif(not (TRAINED / "model.safetensors.index.json").is_file(), reason="no trained checkpoint in checkpoints/")
def test_trained_checkpoint_mtp_greedy_identical_and_accepting():
    from dsv3cli.tokenizer import load_tokenizer

    tok = load_tokenizer(TRAINED)
    prompts = [[tok.bos_id] + tok.encode(t) for t in ("The harbour was quiet", "Weather report for", "def mean(values):")]
    model = load_model(TRAINED, dtype=torch.float32, max_batch_size=3, max_seq_len=MAX_SEQ)
    plain, _ = generate(model, prompts, max_new_tokens=16, max_seq_len=MAX_SEQ, mtp=0)
    for K in (1, 2, 3):
        for batch in (prompts, prompts[:1]):
            out, st = generate(model, batch, max_new_tokens=16, max_seq_len=MAX_SEQ, mtp=K)
            assert out == plain[: len(batch)], f"K={K}, batch {len(batch)}"
        if K == 1:
            assert st.to_dict()["acceptance_per_position"][0] > 0.5  # a trained MTP layer drafts well
