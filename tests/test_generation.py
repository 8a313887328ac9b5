"""The decode loop (dsv3cli/generation.py): greedy tokens against transformers' own `generate`
and against argmax of full forwards recomputed from scratch; ragged batches, EOS, limits, sampling."""

from __future__ import annotations

import pytest
import torch

from dsv3cli.errors import UsageError
from dsv3cli.generation import (
    GenStats,
    Sampling,
    check_prompts,
    generate,
    make_generator,
    probs_from_logits,
    sample_from,
)
from dsv3cli.loading import load_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 40]]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A tiny DeepseekV3ForCausalLM (random, float32) saved by transformers, and our model loaded from it."""
    transformers = pytest.importorskip("transformers")
    from dsv3cli.config import load_preset

    d = load_preset("tiny").to_dict()
    d.update(num_hidden_layers=2, vocab_size=256, initializer_range=0.1)
    for k in ("architectures", "quantization_config", "torch_dtype", "transformers_version"):
        d.pop(k, None)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**d)).float().eval()
    folder = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(folder)
    ours = load_model(folder, dtype=torch.float32, max_batch_size=len(PROMPTS), max_seq_len=96)
    return hf, ours


def test_greedy_matches_transformers_generate(hf_pair):
    hf, ours = hf_pair
    for prompt in ([5, 17, 99, 3, 42, 7], [200]):
        out, st = generate(ours, [prompt], max_new_tokens=32, max_seq_len=96)
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[0] == ref[0, len(prompt):].tolist()
        assert st.generated_tokens == 32 and st.main_forwards == 31


def full_recompute_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the slow way: a fresh full forward over the whole sequence for every token."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model.forward(torch.tensor([seq]), torch.tensor([0]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_ragged_batch_equals_full_recompute(hf_pair):
    _, ours = hf_pair
    out, st = generate(ours, PROMPTS, max_new_tokens=12, max_seq_len=96)
    for p, o in zip(PROMPTS, out):
        assert o == full_recompute_greedy(ours, p, 12)
    assert st.prompt_tokens == sum(map(len, PROMPTS)) and st.generated_tokens == 36


def test_eos_and_limits_per_sequence(hf_pair):
    _, ours = hf_pair
    base, _ = generate(ours, PROMPTS, max_new_tokens=12, max_seq_len=96)
    eos = base[0][4]  # sequence 0 must stop at its 5th token; the others are unaffected unless they meet it
    out, _ = generate(ours, PROMPTS, max_new_tokens=12, max_seq_len=96, eos_ids=[eos])
    for b, o in enumerate(out):
        cut = base[b].index(eos) + 1 if eos in base[b] else 12
        assert o == base[b][:cut]
    assert len(out[0]) <= 5
    # max_seq_len: prompt + output never exceed the cache; the longest prompt (11) gets 2 tokens.
    out, _ = generate(ours, PROMPTS, max_new_tokens=12, max_seq_len=13)
    assert [len(o) for o in out] == [8, 11, 2] and out[2] == base[2][:2]


def test_check_prompts_rejects_bad_input():
    check_prompts([[1, 2]], vocab_size=10, max_seq_len=3)
    for prompts, word in (([[1, 10]], "outside the vocabulary"), ([[-1]], "outside"), ([[1, 2, 3]], "max-seq-len"), ([[]], "empty")):
        with pytest.raises(UsageError, match=word):
            check_prompts(prompts, vocab_size=10, max_seq_len=3)


def test_probs_from_logits_top_k_top_p():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = probs_from_logits(logits, Sampling(1.0))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = probs_from_logits(logits, Sampling(1.0, top_k=2))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)
    # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too; 0.1 is not.
    p = probs_from_logits(logits, Sampling(1.0, top_p=0.8))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    p = probs_from_logits(logits, Sampling(1.0, top_k=3, top_p=0.5))
    torch.testing.assert_close(p, torch.tensor([1.0, 0, 0, 0, 0]))
    # temperature 0.5 squares the probabilities (then normalises)
    q = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    torch.testing.assert_close(probs_from_logits(logits, Sampling(0.5)), q / q.sum())
    with pytest.raises(UsageError):
        Sampling(1.0, top_p=0.0).check()


def test_sample_from_matches_probabilities():
    p = torch.tensor([0.1, 0.0, 0.6, 0.3])
    g = make_generator(0, "cpu")
    draws = sample_from(p.expand(100_000, 4), g)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert freq[1] == 0
    assert (freq - p.double()).abs().max() < 0.01  # ~6 standard errors


def test_sampling_is_seeded(hf_pair):
    _, ours = hf_pair
    kw = dict(max_new_tokens=10, max_seq_len=96, sampling=Sampling(1.0, top_k=50, top_p=0.95))
    a, _ = generate(ours, PROMPTS, generator=make_generator(7, "cpu"), **kw)
    b, _ = generate(ours, PROMPTS, generator=make_generator(7, "cpu"), **kw)
    c, _ = generate(ours, PROMPTS, generator=make_generator(8, "cpu"), **kw)
    assert a == b and a != c


def test_stats_merge_and_rates():
    a = GenStats(sequences=1, prompt_tokens=4, generated_tokens=5, prefill_s=0.5, decode_s=1.0, ttft_s=0.5,
                 decode_tokens=4, main_forwards=4, row_steps=4, step_tokens=4, mtp=1, drafted_at=[3], accepted_at=[1])
    b = GenStats(sequences=1, prompt_tokens=2, generated_tokens=3, prefill_s=0.5, decode_s=1.0, ttft_s=0.2,
                 decode_tokens=2, main_forwards=1, row_steps=1, step_tokens=2, mtp=1, drafted_at=[1], accepted_at=[1])
    a.add(b)
    d = a.to_dict()
    assert d["prefill_tokens_per_s"] == 6.0 and d["decode_tokens_per_s"] == 3.0
    assert d["time_to_first_token_s"] == 0.5 and d["acceptance_per_position"] == [0.5]
    assert d["tokens_per_forward"] == 1.2 and d["drafted"] == 4 and d["accepted"] == 2
    assert d["peak_rss_mb"] > 0
