"""Tests of scripts/mini_train.py: the corpus, the losses, the bias update, determinism, and the export
(validated by checkpoint.validate and loaded back by loading.load_model). Tiny shapes throughout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import mini_train as train  # noqa: E402

# A 2-layer model (one dense, one MoE) plus the MTP layer, small enough for a few seconds.
SMALL = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)


def small_settings(**kw) -> train.TrainSettings:
    base = dict(steps=40, batch_size=4, seq_len=48, lr=1e-2, warmup=5, n_docs=600, tokenizer_docs=300,
                vocab_size=300, config=SMALL, threads=1)
    base.update(kw)
    return train.TrainSettings(**base)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    s = small_settings()
    folder = tmp_path_factory.mktemp("mini_tok")
    return s, train.train(s, folder)


def test_corpus_is_deterministic_and_renders_chats(tmp_path):
    a, b, c = train.corpus_documents(3, 50), train.corpus_documents(3, 50), train.corpus_documents(4, 50)
    assert a == b and a != c
    assert {k for k, _ in a} == {"raw", "chat"}
    from dsv3cli.tokenizer import load_tokenizer, write_tokenizer_files

    write_tokenizer_files(tmp_path, 300, text=train.corpus_text_sample(0, 300))
    tok = load_tokenizer(tmp_path)
    ids = train.encode_documents(tok, a)
    assert ids.count(tok.bos_id) == 50  # one BOS per document, raw or chat
    text = tok.decode(ids)
    assert "<｜User｜>" in text and "<｜Assistant｜>" in text


def test_a_few_steps_decrease_the_losses(trained):
    _, res = trained
    h = res.history
    first = sum(r["main"] for r in h[:3]) / 3
    last = sum(r["main"] for r in h[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert sum(r["mtp"] for r in h[-3:]) / 3 < sum(r["mtp"] for r in h[:3]) / 3 - 1.0


def test_training_forward_matches_incremental_decoding(trained):
    """The losses train what decoding computes: the full-sequence training forward (naive
    attention, no cache history) equals token-by-token decoding through the latent cache
    (absorbed attention), for the main model and for the MTP module (h_p paired with t_{p+1})."""
    _, res = trained
    model = res.model
    T = 12
    tokens = torch.randint(0, res.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, mtp_logits = train.training_forward(model, tokens)  # [2,T,V], [2,T-1,V]
        model.attn_impl = "absorb"
        try:
            steps, hs, msteps = [], [], []
            for t in range(T):
                lg, h = model.forward(tokens[:, t : t + 1], torch.full((2,), t))
                steps.append(lg)
                hs.append(h)
            for t in range(T - 1):
                lg, _ = model.mtp_forward(hs[t], tokens[:, t + 1 : t + 2], torch.full((2,), t))
                msteps.append(lg)
        finally:
            model.attn_impl = "naive"
    torch.testing.assert_close(logits, torch.cat(steps, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mtp_logits, torch.cat(msteps, 1), atol=1e-4, rtol=1e-4)


def test_balance_loss_of_balanced_and_skewed_routing():
    """sum_i f_i P_i is 1 when every expert gets its share of tokens (whatever the scores), and
    grows when the tokens and the scores pile onto one expert."""
    from dsv3cli.model import Gate
    from dsv3cli.ops import Runtime

    ops = Runtime(dtype=torch.float32, kernels=False).ops(exact=False)
    cfg = train.mini_config(300, **SMALL)
    E, K, D = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    gate = Gate(cfg, dtype=torch.float32)
    gate.weight.zero_()
    gate.weight[0] = 2.0 / D  # expert 0 scores sigmoid(2), the others sigmoid(0) = 0.5
    x = torch.ones(2 * 8, D)
    balanced = torch.arange(2 * 8 * K).remainder(E).view(-1, K)
    assert train.balance_loss([(gate, x, balanced)], batch_size=2).item() == pytest.approx(1.0)
    skewed = torch.zeros_like(balanced)  # every slot on expert 0: f_0 = E
    s0 = torch.sigmoid(torch.tensor(2.0)).item()
    p0 = s0 / (s0 + 0.5 * (E - 1))
    assert train.balance_loss([(gate, x, skewed)], batch_size=2).item() == pytest.approx(E * p0, rel=1e-4)
    # Its gradient lowers the favoured expert's score.
    gate.weight.requires_grad_(True)
    train.balance_loss([(gate, x, skewed)], batch_size=2).backward()
    assert (gate.weight.grad[0] > 0).all()


def test_bias_update_moves_the_load_toward_balance():
    """Real routing of the model's Gate over fixed inputs that favour two experts: repeated
    updates bias_i += γ·sign(mean − load_i) bring MaxVio down."""
    from dsv3cli.model import Gate
    from dsv3cli.ops import Runtime

    ops = Runtime(dtype=torch.float32, kernels=False).ops(exact=False)
    cfg = train.mini_config(300, **dict(SMALL, n_routed_experts=8, n_group=4, topk_group=2))
    g = torch.Generator().manual_seed(0)
    gate = Gate(cfg, dtype=torch.float32)
    gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.1)
    gate.weight[:2] += 0.5  # experts 0 and 1 score high for most inputs
    x = torch.randn(512, cfg.hidden_size, generator=g).abs()

    def step():
        _, idx, _ = ops.route(gate, x)
        return train.update_bias([(gate, x, idx)], gamma=0.01)[0]

    before = step()
    assert gate.e_score_correction_bias[:2].max() < 0 < gate.e_score_correction_bias[2:].max()
    for _ in range(150):
        after = step()
    assert before > 1.0 and after < 0.5 * before, (before, after)


def test_same_seed_same_bits_other_seed_other_bits(tmp_path):
    runs = []
    for i, seed in enumerate((5, 5, 6)):
        res = train.train(small_settings(steps=3, seed=seed), tmp_path / f"r{i}")
        runs.append(([r["loss"] for r in res.history], res.model.state_dict()))
    (la, sa), (lb, sb), (lc, sc) = runs
    assert la == lb
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert la != lc


def test_export_validates_and_loads_back(trained, tmp_path):
    from dsv3cli.checkpoint import Checkpoint, validate
    from dsv3cli.loading import load_model
    from dsv3cli.tokenizer import load_tokenizer

    s, res = trained
    train.export(res.model, tmp_path, s)
    rep = validate(tmp_path, check_values=True)
    assert rep.ok, rep.problems
    ck = Checkpoint(tmp_path)
    N = res.cfg.num_hidden_layers
    assert ck.dtype(f"model.layers.{N}.eh_proj.weight") == "BF16"
    assert ck.dtype("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"
    assert len(ck.shards) == 2
    # The trained routing bias is what the file holds.
    torch.testing.assert_close(ck.get("model.layers.1.mlp.gate.e_score_correction_bias"),
                               res.model.layers[1].mlp.gate.e_score_correction_bias)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == res.cfg.vocab_size and tok.bos_id == 0 and 1 in tok.eos_ids

    loaded = load_model(tmp_path, dtype=torch.float32, max_seq_len=64)
    tokens = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "Count from 3 to 9."}]))])
    z = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        ref = res.model.forward(tokens, z)
        got = loaded.forward(tokens, z)
        ref_m = res.model.mtp_forward(ref[1][:, :-1], tokens[:, 1:], z)
        got_m = loaded.mtp_forward(got[1][:, :-1], tokens[:, 1:], z)
    # BF16 storage of float32 weights: close, and the same greedy choices nearly everywhere.
    torch.testing.assert_close(got[0], ref[0], atol=0.15, rtol=0.05)
    torch.testing.assert_close(got_m[0], ref_m[0], atol=0.15, rtol=0.05)
    assert (got[0].argmax(-1) == ref[0].argmax(-1)).float().mean() > 0.9


def test_shipped_checkpoint_validates_answers_and_drafts_well():
    """checkpoints/dsv3-mini (made by scripts/train_mini.py) stays valid and loadable as the code
    evolves, answers a corpus question, and its MTP module's drafts are mostly accepted."""
    from pathlib import Path

    from dsv3cli.checkpoint import validate
    from dsv3cli.generation import generate
    from dsv3cli.loading import load_model
    from dsv3cli.tokenizer import load_tokenizer

    ck = Path(__file__).resolve().parent.parent / "checkpoints" / "dsv3-mini"
    if not (ck / "model.safetensors.index.json").is_file():
        pytest.skip("checkpoints/dsv3-mini is not built (python scripts/train_mini.py)")
    rep = validate(ck)
    assert rep.ok, rep.problems
    tok = load_tokenizer(ck)
    model = load_model(ck, dtype=torch.float32, max_seq_len=128)
    assert model.has_mtp
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "List the months of the year."}]))
    with train.fixed_threads(1):  # tiny matmuls: a second thread only adds contention
        out, st = generate(model, [prompt], max_new_tokens=40, max_seq_len=128, mtp=1, eos_ids=tok.eos_ids)
    assert tok.decode(out[0]).startswith("January, February, March, April")
    assert st.accepted_at[0] / st.drafted_at[0] >= 0.85, st.to_dict()
