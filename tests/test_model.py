"""The model against transformers' DeepseekV3ForCausalLM (the independent reference), and against itself.

Checkpoints are saved by transformers (float32, per-expert names, no MTP layer) with random
weights scaled so activations are O(1), loaded with `load_model`, and compared:
- float32 logits over a whole prompt: max |ours - ref| / max |ref| <= 1e-4, for both attention
  paths (absorbed and naive), several configs (q_lora_rank null/set, n_group/topk_group > 1,
  dims not multiples of 128, YaRN with prompts past original_max_position_embeddings);
- 32 greedy tokens with our cache == greedy over transformers' full forwards;
- cached incremental decoding == one full forward; ragged right-padded batch == per-sequence runs;
- the same after FP8 block quantization, against transformers on the dequantized weights;
- the MTP module against transformers' own decoder layer with the MTP layer's weights.

transformers 5.x masks unselected expert groups with -inf (older releases used 0.0, which differs
only when biased scores are negative); the routing biases here are positive so both agree.
"""

from __future__ import annotations

import json

import pytest
import torch

from dsv3_kernels.cpu import supported_variants
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from dsv3cli.loading import load_model  # noqa: E402
from dsv3cli.parallel import Dist  # noqa: E402

TOL = 1e-4
N_GREEDY = 32

BASE = dict(
    vocab_size=200, hidden_size=48, intermediate_size=72, moe_intermediate_size=24, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=20,
    qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10, n_routed_experts=8, num_experts_per_tok=3,
    n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
    rope_interleave=True, attn_implementation="eager", tie_word_embeddings=False,
)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}

# name -> (config overrides, prompt length)
CONFIGS = {
    # q_proj without LoRA, 4 groups keep 2, YaRN x4 over 32 positions, prompt 80 > 32
    "yarn_nolora_groups": (dict(max_position_embeddings=128, rope_parameters=YARN), 80),
    # q LoRA, every layer MoE, 2 shared experts, no group limit, no normalisation, plain RoPE
    "lora_plain_rope": (
        dict(q_lora_rank=24, first_k_dense_replace=0, n_shared_experts=2, n_group=1, topk_group=1,
             norm_topk_prob=False, routed_scaling_factor=1.5, num_hidden_layers=2, max_position_embeddings=96,
             rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
        40,
    ),
    # V3-like ratios: LoRA q, YaRN x40 from 16 (strong mscale), 4 groups keep 3, 16 experts top 4
    "v3like_yarn40": (
        dict(q_lora_rank=36, hidden_size=64, num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=24, n_routed_experts=16, num_experts_per_tok=4,
             topk_group=3, max_position_embeddings=640,
             rope_parameters={**YARN, "factor": 40.0, "original_max_position_embeddings": 16}),
        70,
    ),
    # dims across several 128-blocks and ragged at the edges (FP8 scales per block matter)
    "wide_blocks": (
        dict(hidden_size=160, intermediate_size=272, moe_intermediate_size=144, kv_lora_rank=136, q_lora_rank=200,
             num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=64, qk_rope_head_dim=16, v_head_dim=72,
             num_hidden_layers=2, max_position_embeddings=128, rope_parameters=YARN),
        50,
    ),
    # DeepSeek-V2 (transformers' DeepseekV2ForCausalLM): softmax routing, max-per-group group limit
    "v2_group_limited": (
        dict(model_type="deepseek_v2", norm_topk_prob=False, q_lora_rank=24, topk_method="group_limited_greedy", routed_scaling_factor=1.7,
             n_shared_experts=2, max_position_embeddings=128, rope_parameters=YARN),
        60,
    ),
    # DeepSeek-V2-Lite-like: q_proj, plain greedy softmax top-k, no groups
    "v2_greedy": (
        dict(model_type="deepseek_v2", norm_topk_prob=False, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
             max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        40,
    ),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights that keep activations O(1) (std 1/sqrt(fan_in)), norms around 1, positive biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.rand(b.shape, generator=g))


def make_hf(folder, overrides: dict, seed: int = 0):
    overrides = dict(overrides)
    if overrides.pop("model_type", "deepseek_v3") == "deepseek_v2":
        kw = {k: v for k, v in {**BASE, **overrides}.items() if k != "rope_interleave"}  # V2 always interleaves
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**kw))
    else:
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**BASE, **overrides}))
    model = model.float().eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    return model


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def hf_greedy(hf, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy tokens from transformers with a full forward per step (no cache involved)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = hf(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids[0, prompt.shape[1]:].tolist()


def our_greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy tokens with our cache: one prefill, then one token per forward."""
    logits, _ = model(prompt, torch.zeros(1, dtype=torch.long))
    out = [int(logits[0, -1].argmax())]
    for i in range(n - 1):
        logits, _ = model(torch.tensor([[out[-1]]]), torch.tensor([prompt.shape[1] + i]))
        out.append(int(logits[0, -1].argmax()))
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (transformers model, checkpoint folder, prompt [1,T])."""
    out = {}
    for k, (name, (over, plen)) in enumerate(CONFIGS.items()):
        folder = tmp_path_factory.mktemp(name)
        hf = make_hf(folder, over, seed=k)
        prompt = torch.randint(0, BASE["vocab_size"], (1, plen), generator=torch.Generator().manual_seed(100 + k))
        out[name] = (hf, folder, prompt)
    return out


PARITY: dict[str, float] = {}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_match_transformers(name, hf_models):
    hf, folder, prompt = hf_models[name]
    model = load_model(folder, Dist(), dtype=torch.float32, max_batch_size=1, max_seq_len=prompt.shape[1] + N_GREEDY)
    assert not model.has_mtp  # transformers drops the MTP layer
    with torch.no_grad():
        ref = hf(prompt, use_cache=False).logits
    for impl in ("absorb", "naive"):
        model.attn_impl = impl
        logits, hidden = model(prompt, torch.zeros(1, dtype=torch.long))
        err = rel_err(logits, ref)
        PARITY[f"{name}/{impl}"] = err
        print(f"parity {name} {impl}: max rel err {err:.2e}")
        assert err <= TOL, f"{name} ({impl}): logits differ from transformers by {err:.2e} relative"
        assert hidden.shape == (1, prompt.shape[1], hf.config.hidden_size)
    model.attn_impl = "absorb"
    assert our_greedy(model, prompt, N_GREEDY) == hf_greedy(hf, prompt, N_GREEDY)


def test_incremental_decoding_equals_full_forward(hf_models):
    _, folder, prompt = hf_models["yarn_nolora_groups"]
    model = load_model(folder, Dist(), dtype=torch.float32, max_seq_len=prompt.shape[1])
    full, _ = model(prompt, torch.zeros(1, dtype=torch.long))
    pieces = [model(prompt[:, :37], torch.zeros(1, dtype=torch.long))[0]]
    pos = 37
    for step in (1, 3, 1, 5, 33):  # single tokens and multi-token (MTP verification-like) steps
        pieces.append(model(prompt[:, pos : pos + step], torch.tensor([pos]))[0])
        pos += step
    assert pos == prompt.shape[1]
    assert rel_err(torch.cat(pieces, 1), full) < 1e-5


def test_ragged_batch_equals_single_sequences(hf_models):
    _, folder, prompt = hf_models["v3like_yarn40"]
    lens = [70, 41, 57]
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, BASE["vocab_size"], (n,), generator=g) for n in lens]
    batch = torch.randint(0, BASE["vocab_size"], (3, 70), generator=g)  # padding = garbage tokens
    for b, s in enumerate(seqs):
        batch[b, : len(s)] = s
    model = load_model(folder, Dist(), dtype=torch.float32, max_batch_size=3, max_seq_len=80)
    single = load_model(folder, Dist(), dtype=torch.float32, max_batch_size=1, max_seq_len=80)
    logits, _ = model(batch, torch.zeros(3, dtype=torch.long))
    nxt = torch.tensor([int(logits[b, n - 1].argmax()) for b, n in enumerate(lens)])
    step, _ = model(nxt[:, None], torch.tensor(lens))  # ragged decode: each at its own position
    for b, s in enumerate(seqs):
        ref, _ = single(s[None], torch.zeros(1, dtype=torch.long))
        assert rel_err(logits[b, : len(s)], ref[0]) < 1e-5
        ref_step, _ = single(nxt[b].view(1, 1), torch.tensor([len(s)]))
        assert rel_err(step[b], ref_step[0]) < 1e-5


def _quantize_checkpoint(src, dst, hf) -> None:
    """`dsv3 quantize --to fp8` of `src` into `dst`, and every value of `dst` (FP8 weights
    dequantized) loaded into `hf`, so the reference runs on exactly the quantized model."""
    from dsv3cli.checkpoint import Checkpoint, scale_name
    from dsv3cli.convert import convert_checkpoint
    from dsv3cli.fp8 import dequantize_weight

    convert_checkpoint(src, dst, to="fp8", device="cpu")
    ck = Checkpoint(dst)
    sd = hf.state_dict()
    with torch.no_grad():
        for name in ck.names():
            if name.endswith("_scale_inv"):
                continue
            w = ck.get(name)
            if w.dtype == torch.float8_e4m3fn:
                w = dequantize_weight(w, ck.get(scale_name(name)), torch.float32)
            w = w.float()
            # transformers keeps routed experts fused in memory: [E, 2*I, D] gate_up and [E, D, I] down
            if ".experts." in name:  # model.layers.{i}.mlp.experts.{e}.{proj}.weight
                parts = name.split(".")
                prefix, e, proj = ".".join(parts[:-4]), int(parts[-3]), parts[-2]
                if proj == "down_proj":
                    sd[f"{prefix}.experts.down_proj"][e].copy_(w)
                else:
                    inter = w.shape[0]
                    half = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
                    sd[f"{prefix}.experts.gate_up_proj"][e, half].copy_(w)
            else:
                sd[name].copy_(w)


@pytest.mark.parametrize("name", ["yarn_nolora_groups", "wide_blocks"])
def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(name, hf_models, tmp_path):
    pytest.importorskip("dsv3cli.fp8")
    over, _ = CONFIGS[name]
    _, folder, prompt = hf_models[name]
    hf = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _quantize_checkpoint(folder, tmp_path / "fp8", hf)
    model = load_model(tmp_path / "fp8", Dist(), dtype=torch.float32, max_seq_len=prompt.shape[1] + N_GREEDY)
    assert model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        ref = hf(prompt, use_cache=False).logits
    logits, _ = model(prompt, torch.zeros(1, dtype=torch.long))
    err = rel_err(logits, ref)
    PARITY[f"{name}/fp8"] = err
    print(f"parity {name} fp8: max rel err {err:.2e}")
    assert err <= TOL
    assert our_greedy(model, prompt, N_GREEDY) == hf_greedy(hf, prompt, N_GREEDY)


# ---- the MTP module ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtp_setup(tmp_path_factory):
    """A transformers model with N+1 layers whose last layer serves as the MTP layer of an N-layer
    checkpoint, plus the MTP-only tensors (enorm, hnorm, eh_proj, shared_head, own embedding)."""
    over = dict(CONFIGS["v3like_yarn40"][0], num_hidden_layers=3)
    big_dir = tmp_path_factory.mktemp("mtp_big")
    big = make_hf(big_dir, over, seed=11)
    N, D, V = 2, big.config.hidden_size, big.config.vocab_size
    g = torch.Generator().manual_seed(12)
    tensors = load_file(big_dir / "model.safetensors")
    extra = {
        "enorm.weight": 1 + 0.2 * torch.randn(D, generator=g),
        "hnorm.weight": 1 + 0.2 * torch.randn(D, generator=g),
        "eh_proj.weight": torch.randn(D, 2 * D, generator=g) / (2 * D) ** 0.5,
        "shared_head.norm.weight": 1 + 0.2 * torch.randn(D, generator=g),
        "shared_head.head.weight": torch.randn(V, D, generator=g) / D**0.5,
        "embed_tokens.weight": torch.randn(V, D, generator=g),
    }
    tensors.update({f"model.layers.{N}.{k}": v for k, v in extra.items()})
    folder = tmp_path_factory.mktemp("mtp")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((big_dir / "config.json").read_text())
    cfg.update(num_hidden_layers=N, num_nextn_predict_layers=1)
    (folder / "config.json").write_text(json.dumps(cfg))
    return big, extra, folder


def mtp_reference(big, extra, hidden, next_tokens, pos0: int):
    """transformers' decoder layer N over h (final-normed) and t_{p+1}, positions pos0.., full causal."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    D, eps = big.config.hidden_size, big.config.rms_norm_eps

    def norm(w):
        n = DeepseekV3RMSNorm(D, eps)
        n.weight.data.copy_(w)
        return n

    T = next_tokens.shape[1]
    with torch.no_grad():
        e = torch.nn.functional.embedding(next_tokens, extra["embed_tokens.weight"])
        x = torch.cat([norm(extra["enorm.weight"])(e), norm(extra["hnorm.weight"])(hidden)], -1) @ extra["eh_proj.weight"].T
        pos = torch.arange(pos0, pos0 + T)[None]
        cos_sin = big.model.rotary_emb(x, pos)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        x = big.model.layers[2](x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        h = norm(extra["shared_head.norm.weight"])(x)
        return h @ extra["shared_head.head.weight"].T, h


def test_mtp_module_matches_transformers_layer(mtp_setup):
    big, extra, folder = mtp_setup
    model = load_model(folder, Dist(), dtype=torch.float32, max_seq_len=64)
    assert model.has_mtp and model.mtp.embed_tokens is not None and model.mtp.shared_head.head is not None
    ids = torch.randint(0, big.config.vocab_size, (1, 41), generator=torch.Generator().manual_seed(3))
    _, hidden = model(ids[:, :-1], torch.zeros(1, dtype=torch.long))
    logits, h = model.mtp_forward(hidden, ids[:, 1:], torch.zeros(1, dtype=torch.long))
    ref_logits, ref_h = mtp_reference(big, extra, hidden, ids[:, 1:], 0)
    assert rel_err(logits, ref_logits) <= TOL
    # incremental MTP over its own cache equals the full pass
    model.mtp_forward(hidden[:, :25], ids[:, 1:26], torch.zeros(1, dtype=torch.long))
    step, _ = model.mtp_forward(hidden[:, 25:], ids[:, 26:], torch.tensor([25]))
    assert rel_err(step, logits[:, 25:]) < 1e-5
    # a second draft step feeds the module its own hidden state at positions 1..; position 0 of
    # its cache still holds the first step's entry, so the reference sees that input there
    logits2, _ = model.mtp_forward(h[:, :-1], ids[:, 2:], torch.tensor([1]))
    ref2, _ = mtp_reference(big, extra, torch.cat([hidden[:, :1], ref_h[:, :-1]], 1), ids[:, 1:], 0)
    assert rel_err(logits2, ref2[:, 1:]) <= TOL


def test_logits_at_gives_the_full_logits_at_those_rows(mtp_setup):
    """`logits_at` (the prefill's last token, the MTP draft row) runs the head on one row per
    sequence: the full logits' numbers there. Bit for bit through the bfloat16 C products (rows
    independent by construction); float32 goes through torch's, whose blocking depends on the
    number of rows."""
    big, _, folder = mtp_setup
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(folder, Dist(), dtype=dtype, max_batch_size=3, max_seq_len=64)
        ids = torch.randint(0, big.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(4))
        start = torch.tensor([0, 5, 2])
        at = torch.tensor([8, 0, 3])
        rows = torch.arange(3)
        full, hidden = model(ids, start)  # [3,9,V], [3,9,D]
        part, hidden2 = model(ids, start, logits_at=at)  # [3,V]
        assert part.shape == (3, big.config.vocab_size) and torch.equal(hidden2, hidden)
        same = torch.equal if dtype == torch.bfloat16 else (lambda a, b: rel_err(a, b) <= 1e-6)
        assert same(part, full[rows, at])
        for T in (9, 2):  # a prompt-sized MTP pass and a verification-sized one (the C kernels in bfloat16)
            m_full, m_h = model.mtp_forward(hidden[:, :T], ids[:, :T], start)
            m_part, m_h2 = model.mtp_forward(hidden[:, :T], ids[:, :T], start, logits_at=at.clamp(max=T - 1))
            assert same(m_part, m_full[rows, at.clamp(max=T - 1)]) and torch.equal(m_h2, m_h)


@pytest.mark.parametrize("variant", supported_variants())
def test_mtp_entry_in_one_c_call_equals_the_steps(mtp_setup, variant):
    """The MTP module's entry (embedding, two norms, concat, eh_proj) through dsv3_mtp_entry gives
    the bits of the same steps one by one, and follows torch's steps (kernels off) within
    bfloat16 rounding; an id outside the vocabulary is named, not read out of bounds."""
    from dsv3cli.errors import DsvError
    from dsv3cli.ops import Runtime

    big, _, folder = mtp_setup
    model = load_model(folder, Dist(), dtype=torch.bfloat16, max_batch_size=3, max_seq_len=64)
    m, embed = model.mtp, model.mtp.embed_tokens
    c = Runtime(dtype=torch.bfloat16, variant=variant).ops(exact=True)
    off = Runtime(dtype=torch.bfloat16, kernels=False).ops(exact=True)
    assert c.name == "cpu" and off.name == "torch"
    g = torch.Generator().manual_seed(5)
    for B, T in ((1, 1), (1, 2), (3, 2), (2, 3)):
        ids = torch.randint(0, big.config.vocab_size, (B, T), generator=g)
        hidden = torch.randn(B, T, big.config.hidden_size, generator=g).to(torch.bfloat16)
        with torch.no_grad():
            fused = c.mtp_entry(m, embed, ids, hidden)
            ref = m.eh_proj(torch.cat([m.enorm(embed(ids), c), m.hnorm(hidden, c)], dim=-1), c)  # the steps, in C
            torch_steps = off.mtp_entry(m, embed, ids, hidden)
        assert fused.shape == (B, T, big.config.hidden_size) and torch.equal(fused, ref), (B, T)
        assert rel_err(fused, torch_steps) <= 2e-2, (B, T)
    with torch.no_grad(), pytest.raises(DsvError, match="outside the vocabulary"):
        c.mtp_entry(m, embed, torch.full((1, 2), big.config.vocab_size), hidden[:1, :2])


def test_fp8_kernel_linear_computes_the_block_scaled_product():
    """The CUDA path of an FP8 Linear (act-quant + Triton GEMM), run in the Triton interpreter:
    equal to the float64 product of the quantized activations and the dequantized weight."""
    pytest.importorskip("triton")
    from dsv3_kernels.fp8 import act_quant

    from dsv3cli.fp8 import dequantize_weight, quantize_weight
    from dsv3cli.ops import fp8_linear_triton as fp8_linear_kernel

    g = torch.Generator().manual_seed(5)
    w = torch.randn(200, 300, generator=g) / 300**0.5  # ragged blocks on both sides
    x = torch.randn(3, 5, 300, generator=g)
    q, s = quantize_weight(w)
    y = fp8_linear_kernel(x, q, s)
    xq, xs = act_quant(x)
    xd = xq.double() * xs.double().repeat_interleave(128, -1)[..., :300]
    ref = xd @ dequantize_weight(q, s, torch.float32).double().T
    assert y.shape == (3, 5, 200) and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5
    assert rel_err(y, x @ w.T) < 0.1  # and it is a product with these weights at all


def test_route_observer_sees_every_main_moe_layer(mtp_setup):
    _, _, folder = mtp_setup
    model = load_model(folder, Dist(), dtype=torch.float32, max_batch_size=2, max_seq_len=32)
    calls = []
    model.route_observer = lambda layer, idx, nobias, valid: calls.append((layer, idx, nobias, valid))
    tokens = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(4))
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 13:] = False
    _, hidden = model(tokens, torch.zeros(2, dtype=torch.long), valid=valid)
    assert [c[0] for c in calls] == model.cfg.moe_layers == [1]
    _, idx, nobias, seen_valid = calls[0]
    k = model.cfg.num_experts_per_tok
    assert idx.shape == nobias.shape == (40, k) and torch.equal(seen_valid, valid.reshape(-1))
    assert not torch.equal(idx.sort(-1).values, nobias.sort(-1).values)  # the bias changes some choices
    model.mtp_forward(hidden, tokens, torch.zeros(2, dtype=torch.long))
    assert len(calls) == 1  # the MTP layer is not reported
    model.route_observer = None
    model(tokens, torch.zeros(2, dtype=torch.long))
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp8_model_follows_the_cpu_model(tiny_fp8):
    """On CUDA, FP8 linears go through act-quant + the Triton GEMM: the logits move by the
    activation quantization only."""
    prompt = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(9))
    cpu = load_model(tiny_fp8, Dist(), dtype=torch.float32, max_seq_len=64)
    gpu = load_model(tiny_fp8, Dist(), dtype=torch.float32, device="cuda", max_seq_len=64)
    assert gpu.layers[1].mlp.experts[0].gate_proj.weight.dtype == torch.float8_e4m3fn
    ref, _ = cpu(prompt, torch.zeros(1, dtype=torch.long))
    got, _ = gpu(prompt.cuda(), torch.zeros(1, dtype=torch.long, device="cuda"))
    assert rel_err(got.cpu(), ref) < 0.1


def test_prefill_in_query_chunks_equals_one_pass(hf_models):
    """A small score budget splits a long prefill's attention into query chunks; same numbers."""
    _, folder, prompt = hf_models["yarn_nolora_groups"]
    model = load_model(folder, Dist(), dtype=torch.float32, max_seq_len=prompt.shape[1])
    for impl in ("absorb", "naive"):
        model.attn_impl = impl
        whole, _ = model(prompt, torch.zeros(1, dtype=torch.long))
        for m in model.modules():
            if hasattr(m, "score_budget"):
                m.score_budget = 7 * 4 * prompt.shape[1]  # 7 query positions per chunk (4 heads)
        chunked, _ = model(prompt, torch.zeros(1, dtype=torch.long))
        for m in model.modules():
            if hasattr(m, "score_budget"):
                m.score_budget = 1 << 26
        assert rel_err(chunked, whole) < 1e-6


def _moe(cfg, dtype, dist, seed):
    from dsv3cli.model import MoE
    from dsv3cli.parallel import Scratch

    moe = MoE(cfg, dist, 1, dtype=dtype, fp8=False, scratch=Scratch(), scale_fmt="e4m3")
    randomize(moe, seed)
    return moe


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_batched_and_dense_experts_equal_the_expert_loop(dtype, tol):
    """The batched and the dense small-N expert paths against the per-expert loop (the torch
    reference of an exact forward: one expert, one token at a time) and a float64 loop, on fresh
    random inputs at ragged token counts, also for one rank's slice of the experts (world 2), and
    the switch back to the loop when the weights would exceed the budgets."""
    from dsv3cli.config import load_preset
    from dsv3cli.ops import Runtime

    # not multiples of 128; no shared expert: the backends' experts are then the routed ones alone
    cfg = load_preset("tiny").replace(moe_intermediate_size=40, hidden_size=72, n_shared_experts=0)
    ops, loop_ops = Runtime(dtype=dtype, kernels=False).ops(False), Runtime(dtype=dtype, kernels=False).ops(True)
    ops64 = Runtime(dtype=torch.float64, kernels=False).ops(True)
    assert ops.name == loop_ops.name == ops64.name == "torch" and loop_ops.exact
    for rank, world in [(0, 1), (1, 2)]:
        dist = Dist(rank=rank, world_size=world)
        moe, ref = _moe(cfg, dtype, dist, 7 + rank), _moe(cfg, torch.float64, dist, 7 + rank)
        ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in moe.state_dict().items()})
        assert torch.equal(moe.w13[0, : cfg.moe_intermediate_size], moe.experts[moe.lo].gate_proj.weight)
        moe.gather_budget = 1 << 30
        g = torch.Generator().manual_seed(rank)
        for n in (1, 2, 3, 5, 11):
            x = torch.randn(n, cfg.hidden_size, generator=g).to(dtype)
            with torch.no_grad():
                w, idx, _ = ops.route(moe.gate, x)
                assert moe.use_batched(idx.numel())
                fast = moe.routed_batched(x, w, idx)
                dense = moe.routed_dense(x, w, idx)
                loop = loop_ops.moe_experts(moe, x, w, idx)
                exact = ops64.moe_experts(ref, x.double(), w.double(), idx)
            for y in (fast, dense):
                assert y.dtype == dtype and y.shape == x.shape
                assert rel_err(y, exact) <= tol
                if dtype == torch.float32:
                    assert rel_err(y, loop) <= 1e-6
                # Pairs of experts owned by the other rank contribute nothing here.
                if world > 1 and not ((idx >= moe.lo) & (idx < moe.hi)).any():
                    assert not y.any()
            assert rel_err(loop, exact) <= tol
        per_token = moe.w13.shape[0] * (moe.w13[0].numel() + moe.w2[0].numel())
        moe.gather_budget, moe.dense_budget = 0, 2 * per_token
        assert not moe.use_batched(1)
        assert moe.use_dense(2) and not moe.use_dense(3)


def test_router_float32_copy_is_made_once_and_follows_the_weight():
    from dsv3cli.config import load_preset
    from dsv3cli.model import Gate
    from dsv3cli.ops import Runtime, TorchOps

    class Uncached(TorchOps):  # the router on a fresh conversion of the weight per call
        def router_weight(self, gate):
            return gate.weight.float()

    cfg = load_preset("tiny")
    gate = Gate(cfg, dtype=torch.bfloat16)
    rt = Runtime(dtype=torch.bfloat16, kernels=False)
    ops = rt.ops(False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g))
        x = torch.randn(5, cfg.hidden_size, generator=g).to(torch.bfloat16)
        first = ops.route(gate, x)
        kept = gate.weight_f32()
        assert kept is gate.weight_f32() and torch.equal(kept, gate.weight.float())
        ref = Uncached(rt, False).route(gate, x)
        assert all(torch.equal(a, b) for a, b in zip(first[:2], ref[:2]))
        gate.weight.mul_(-1)  # an in-place change (as loading does) must not leave a stale copy
        assert torch.equal(gate.weight_f32(), gate.weight.float())
        assert not torch.equal(ops.route(gate, x)[1], first[1])
