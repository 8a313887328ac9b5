"""Tensor + expert parallelism across real gloo processes must give the single-process numbers.

Each test spawns `world` processes on 127.0.0.1 (torch.multiprocessing, a free port), loads the
tiny hub-layout checkpoint with `load_model(..., Dist(rank, world))`, runs a ragged batch
prefill, cached greedy decoding and the MTP module, and compares rank 0's results (every rank
holds full logits) with a single-process run.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from dsv3cli.config import load_preset
from dsv3cli.errors import DsvError
from dsv3cli.loading import load_model
from dsv3cli.model import Transformer
from dsv3cli.parallel import Dist, init_distributed, peer_failures

PROMPTS = [[5, 77, 300, 12, 9, 41, 200, 3, 150, 99, 18], [400, 2, 31, 64, 128, 256]]
NEW_TOKENS = 8


def run_model(ckpt, dist: Dist, head_fp8: bool = False) -> dict[str, torch.Tensor]:
    """Prefill a right-padded batch, decode greedily with the cache, and run the MTP module."""
    torch.manual_seed(0)
    model = load_model(ckpt, dist, dtype=torch.float32, device="cpu", max_batch_size=2, max_seq_len=64, head_fp8=head_fp8)
    lens = torch.tensor([len(p) for p in PROMPTS])
    tokens = torch.zeros(len(PROMPTS), int(lens.max()), dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        tokens[b, : len(p)] = torch.tensor(p)
    start = torch.zeros(len(PROMPTS), dtype=torch.long)
    logits, hidden = model(tokens, start)  # [B,T,V], [B,T,D]
    mtp_logits = model.mtp_forward(hidden[:, :-1], tokens[:, 1:], start)[0] if model.has_mtp else None
    nxt = logits[torch.arange(len(PROMPTS)), lens - 1].argmax(-1)  # [B]
    generated = [nxt]
    pos = lens.clone()
    for _ in range(NEW_TOKENS - 1):
        step, _ = model(nxt[:, None], pos)
        nxt = step[:, 0].argmax(-1)
        generated.append(nxt)
        pos += 1
    return {"logits": logits, "mtp_logits": mtp_logits, "tokens": torch.stack(generated, 1)}


def _worker(rank: int, world: int, port: int, ckpt: str, out: str, head_fp8: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = init_distributed("cpu", timeout_s=60)
    try:
        result = run_model(ckpt, dist, head_fp8)
        if rank == 0:
            torch.save(result, out)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tiny_fp8):
    return run_model(tiny_fp8, Dist())


def _compare_with_spawned(world: int, ckpt, single: dict, out: str, keys=("logits", "mtp_logits"), head_fp8=False) -> None:
    mp.spawn(_worker, args=(world, _free_port(), str(ckpt), out, head_fp8), nprocs=world, join=True)
    got = torch.load(out)
    for key in keys:
        err = (got[key] - single[key]).abs().max() / single[key].abs().max()
        assert err < 1e-5, f"world {world}: {key} differ by {err:.2e}"
    assert torch.equal(got["tokens"], single["tokens"])


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_matches_single_process(world, tiny_fp8, single, tmp_path):
    _compare_with_spawned(world, tiny_fp8, single, str(tmp_path / "rank0.pt"))


@pytest.fixture(scope="module")
def vocab_not_divisible(tmp_path_factory):
    """A transformers-saved checkpoint (no MTP) whose vocabulary 500 is not a multiple of 3,
    with 3 heads and 6 experts so that 3 processes can split everything else evenly."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(
        vocab_size=500, hidden_size=48, intermediate_size=72, moe_intermediate_size=24, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=3, num_key_value_heads=3, q_lora_rank=None, kv_lora_rank=20,
        qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10, n_routed_experts=6, num_experts_per_tok=2,
        n_group=2, topk_group=1, max_position_embeddings=64, rope_interleave=True,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vocab500")
    model.save_pretrained(folder)
    return folder


def test_vocab_not_divisible_by_world_is_padded(vocab_not_divisible, tmp_path):
    single = run_model(vocab_not_divisible, Dist())
    _compare_with_spawned(3, vocab_not_divisible, single, str(tmp_path / "rank0.pt"), keys=("logits",))


def test_an_fp8_head_gives_the_same_logits_on_every_world_size(vocab_not_divisible, tmp_path):
    """--lm-head fp8 with 500 rows over 3 ranks: parts of 256 rows (whole blocks), rows 0..255,
    256..499 and none; the blocks, so the logits and tokens, are those of one process. And the
    quantized head moves the logits by no more than FP8 rounding does."""
    single = run_model(vocab_not_divisible, Dist(), head_fp8=True)
    _compare_with_spawned(3, vocab_not_divisible, single, str(tmp_path / "rank0.pt"), keys=("logits",), head_fp8=True)
    stored = run_model(vocab_not_divisible, Dist())["logits"]
    err = (single["logits"] - stored).abs().max() / stored.abs().max()
    assert 0 < err < 0.1, err


def test_world_size_must_divide_heads_and_experts():
    cfg = load_preset("tiny")  # 4 heads, 16 experts
    with pytest.raises(DsvError, match="num_attention_heads"):
        Transformer(cfg, Dist(rank=0, world_size=3), max_seq_len=8)
    with pytest.raises(DsvError, match="n_routed_experts"):
        Transformer(cfg.replace(num_attention_heads=6, n_routed_experts=16), Dist(rank=0, world_size=3), max_seq_len=8)


def _dying_worker(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist = init_distributed("cpu", timeout_s=30)
    model = load_model(ckpt, dist, dtype=torch.float32, max_seq_len=16)
    if rank == 1:
        os._exit(3)  # dies without a word, as a crashed or killed rank does
    start = time.monotonic()
    try:
        with peer_failures(dist):
            for _ in range(50):
                model(torch.tensor([[1, 2, 3]]), torch.zeros(1, dtype=torch.long))
        message = "no error"
    except DsvError as e:
        message = str(e)
    with open(out, "w") as f:
        f.write(f"{time.monotonic() - start:.1f}\n{message}")
    os._exit(0)


def test_a_dead_rank_makes_the_others_fail_clearly(tiny_bf16, tmp_path):
    out = tmp_path / "rank0.txt"
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_dying_worker, args=(r, 2, port, str(tiny_bf16), str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung after its peer died")
    elapsed, message = out.read_text().split("\n", 1)
    assert "rank 0" in message and "another rank exited or made no progress" in message
    assert float(elapsed) < 30


def test_init_distributed_reads_torchrun_env(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert init_distributed("cpu") == Dist()  # not under torchrun: one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DsvError, match="MASTER_ADDR"):
        init_distributed("cpu")


@pytest.mark.parametrize("rows,out,inp", [(1, 64, 96), (2, 256, 512), (3, 5, 7), (1, 1536, 512), (40, 33, 130)])
def test_linear_agrees_with_float64_on_every_backend(rows, out, inp):
    """A bfloat16 Linear through every backend this CPU runs (torch and each C variant, in a
    prefill and in an exact forward) against a float64 product, at ragged shapes on both sides
    of ops.SMALL_ROWS (32); none of them changes torch's settings (oneDNN stays as it was)."""
    from dsv3_kernels.cpu import supported_variants
    from dsv3cli.ops import Runtime
    from dsv3cli.parallel import Linear

    g = torch.Generator().manual_seed(rows * out + inp)
    x = torch.randn(rows, inp, generator=g).to(torch.bfloat16)
    lin = Linear(inp, out, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(out, inp, generator=g) / inp**0.5).to(torch.bfloat16))
    exact = x.double() @ lin.weight.double().t()
    before = torch.backends.mkldnn.enabled
    runtimes = [Runtime(dtype=torch.bfloat16, kernels=False)]
    runtimes += [Runtime(dtype=torch.bfloat16, variant=v) for v in supported_variants()]
    for rt in runtimes:
        for ops in (rt.ops(False), rt.ops(True)):
            y = lin(x, ops)
            assert y.dtype == torch.bfloat16 and y.shape == (rows, out)
            err = ((y.double() - exact).norm() / exact.norm()).item()
            assert err < 1e-2, f"{rt.describe()}, exact {ops.exact}: relative error {err:.3g}"
            assert torch.backends.mkldnn.enabled == before
