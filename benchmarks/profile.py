"""Overhead of expert-load profiling: the same prefill with and without the route observer.

Builds a random model in memory (a scaled-down V3 shape: sigmoid routing with groups and the
correction bias), then times prefill forwards of the same tokens alternately plain
(`route_observer = None`) and profiled (`profiling.profile_tokens`, which attaches a RouteCounter),
and prints the ratio of the medians. The goal is ≤ 1.10.

  python benchmarks/profile.py                     # CPU (float32), default shape
  python benchmarks/profile.py --device cuda --tokens 4096 --hidden 2048
  python benchmarks/profile.py --compare-bias      # also count the no-bias choices
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv3_kernels.cpu import enabled as cpu_kernels_enabled
from dsv3cli.config import load_preset
from dsv3cli.model import Transformer
from dsv3cli.ops import Runtime
from dsv3cli.parallel import Dist
from dsv3cli.profiling import profile_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    ap.add_argument("--tokens", type=int, default=512, help="tokens per prefill (batch × length)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--compare-bias", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")

    # the CPU has no fast bfloat16 matmul; float32 is what a CPU run would use
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, args.dtype)
    runtime = Runtime(torch.device(args.device), dtype, threads=args.threads, kernels=cpu_kernels_enabled())
    if not cuda:
        runtime.apply()
    T = args.tokens // args.batch
    cfg = load_preset("tiny").replace(
        hidden_size=args.hidden, moe_intermediate_size=args.hidden // 2, intermediate_size=args.hidden * 2,
        n_routed_experts=args.experts, n_group=8, topk_group=4, num_experts_per_tok=8,
        num_hidden_layers=args.layers, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=args.hidden // 2,
        kv_lora_rank=args.hidden // 4, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        vocab_size=8192, num_nextn_predict_layers=0,
    )
    torch.manual_seed(0)
    model = Transformer(cfg, Dist(), runtime, max_batch_size=args.batch, max_seq_len=T)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.01)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, T), generator=g)
    tokens = prompts.to(args.device)
    start = torch.zeros(args.batch, dtype=torch.long, device=args.device)
    lists = prompts.tolist()

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain():
        model.route_observer = None
        with torch.inference_mode():
            model.forward(tokens, start)

    def profiled():
        profile_tokens(model, cfg, lists, device=args.device, compare_bias=args.compare_bias,
                       batch_size=args.batch)

    # On a CPU the process's own CPU time is the clock: on a shared machine wall time mostly
    # measures the other tenants. On a GPU, wall time around synchronize.
    clock = time.perf_counter if cuda else time.process_time

    def timed(fn):
        sync()
        t = clock()
        fn()
        sync()
        return clock() - t

    plain(), profiled()  # warm-up
    base, prof = [], []
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
        base.append(timed(plain))
        prof.append(timed(profiled))
    # best-of-N is the primary figure (other load only ever adds time); the medians are shown too
    b, p = min(base), min(prof)
    bm, pm = statistics.median(base), statistics.median(prof)
    print(f"clock: {'wall' if cuda else 'process CPU time'}; {runtime.describe()}")
    print(f"device {args.device}, {args.dtype}, {args.batch}x{T} tokens, hidden {args.hidden}, "
          f"{args.experts} experts top-8, {len(cfg.moe_layers)} MoE layers, compare_bias={args.compare_bias}")
    print(f"prefill without profiling: best {b * 1e3:.1f} ms, median {bm * 1e3:.1f} ms ({args.repeats} runs)")
    print(f"prefill with profiling:    best {p * 1e3:.1f} ms, median {pm * 1e3:.1f} ms")
    print(f"ratio profiled/plain: {p / b:.3f} best-of-{args.repeats} (median ratio {pm / bm:.3f}); "
          f"goal <= 1.10: {'ok' if p / b <= 1.10 else 'MISSED'}")


if __name__ == "__main__":
    main()
