"""Benchmark `dsv3 generate`'s core against transformers' DeepseekV3ForCausalLM, in one run.

Same checkpoint (a random one with small but less degenerate dims than the test preset), same
dtype, same threads, batch 1:
  - prefill tokens/s over a P-token prompt, and decode tokens/s over N greedy tokens (ours vs
    transformers; the target is >= 3x for both);
  - loading the FP8 variant of the checkpoint in a fresh process: peak RSS vs its bytes on disk
    (target <= 1.2 x disk + 300 MB).
Prints the numbers and the ratios.

  python benchmarks/generate.py                      # bfloat16, all cores, the best C kernels
  python benchmarks/generate.py --dtype float32 --threads 1 --prompt-len 256 --new-tokens 64
  python benchmarks/generate.py --variant generic    # another C kernel build this CPU runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/ holds profile.py, which would shadow the standard library's `profile` (torch imports it).
sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from dsv3_kernels.cpu import enabled as cpu_kernels_enabled  # noqa: E402
from dsv3_kernels.cpu import supported_variants  # noqa: E402
from dsv3cli.config import load_preset  # noqa: E402
from dsv3cli.generation import generate  # noqa: E402
from dsv3cli.loading import load_model  # noqa: E402
from dsv3cli.ops import Runtime  # noqa: E402
from dsv3cli.tiny import make_tiny  # noqa: E402

BENCH_DIMS = dict(
    hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=4, first_k_dense_replace=1,
    num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2, vocab_size=4096,
)
# A heavier one for the FP8 loading measurement: ~190 MB of FP8 weights on disk.
RSS_DIMS = dict(BENCH_DIMS, hidden_size=768, moe_intermediate_size=384, num_hidden_layers=6, vocab_size=8192)


def config(dims: dict):
    cfg = load_preset("tiny")
    raw = dict(cfg.raw, **dims, num_key_value_heads=dims["num_attention_heads"])  # transformers reads it
    return cfg.replace(raw=raw, **dims)


def ours(ckpt: Path, runtime: Runtime, prompt: list[int], n: int, repeats: int) -> tuple[float, float, list[int]]:
    runtime.apply()
    model = load_model(ckpt, runtime=runtime, max_batch_size=1, max_seq_len=len(prompt) + n + 8)
    generate(model, [prompt[:16]], max_new_tokens=4, max_seq_len=len(prompt) + n + 8)  # warm-up
    best_p, best_d, out = 0.0, 0.0, []
    for _ in range(repeats):
        out, st = generate(model, [prompt], max_new_tokens=n, max_seq_len=len(prompt) + n + 8, mtp=0)
        d = st.to_dict()
        best_p, best_d = max(best_p, d["prefill_tokens_per_s"]), max(best_d, d["decode_tokens_per_s"])
    return best_p, best_d, out[0]


def theirs(ckpt: Path, dtype: torch.dtype, threads: int, prompt: list[int], n: int,
           repeats: int) -> tuple[float, float, list[int]]:
    from transformers import DeepseekV3ForCausalLM

    torch.set_num_threads(threads)  # all of them: ours may have left torch one (see Runtime.torch_threads)
    model = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(k: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
        return time.perf_counter() - t, out[0, len(prompt):].tolist()

    run(4)  # warm-up
    best_p, best_d, toks = 0.0, 0.0, []
    for _ in range(repeats):
        t1, _ = run(1)  # prefill + one token
        tn, toks = run(n)
        best_p = max(best_p, len(prompt) / t1)
        best_d = max(best_d, (n - 1) / max(tn - t1, 1e-9))
    return best_p, best_d, toks


RSS_CHILD = """
import json, sys, torch
from dsv3cli.generation import peak_rss_bytes
from dsv3cli.loading import load_model
torch.set_num_threads({threads})
base = peak_rss_bytes()
m = load_model(sys.argv[1], dtype=torch.bfloat16, max_batch_size=1, max_seq_len=256)
print(json.dumps({{"base": base, "peak": peak_rss_bytes()}}))
"""


def fp8_rss(ckpt: Path, threads: int) -> dict:
    disk = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    r = subprocess.run([sys.executable, "-c", RSS_CHILD.format(threads=threads), str(ckpt)], capture_output=True, text=True, check=True)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    peak, base = d["peak"], d["base"]
    return {"disk_mb": disk / 2**20, "peak_rss_mb": peak / 2**20, "baseline_rss_mb": base / 2**20,
            "limit_mb": (1.2 * disk + 300 * 2**20) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", default=None, choices=supported_variants(),
                    help="The C kernel build to run (default: the best this CPU runs).")
    ap.add_argument("--workdir", type=Path, default=None, help="Keep the checkpoints here (default: a temp folder).")
    ap.add_argument("--skip-rss", action="store_true")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    runtime = Runtime(torch.device("cpu"), dtype, threads=a.threads, kernels=cpu_kernels_enabled(), variant=a.variant)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="dsv3-bench-"))
    ckpt = work / "bench_bf16"
    if not (ckpt / "model.safetensors.index.json").exists():
        make_tiny(ckpt, seed=0, shards=2, config=config(BENCH_DIMS), force=True)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, BENCH_DIMS["vocab_size"], (a.prompt_len,), generator=g).tolist()
    print(f"checkpoint {ckpt} ({json.dumps(BENCH_DIMS)})")
    print(f"dtype {a.dtype}, threads {a.threads}, prompt {a.prompt_len} tokens, {a.new_tokens} new tokens, batch 1, best of {a.repeats}")
    kern = runtime.cpu
    note = (" (DSV3_CPU_KERNEL=0 or no compiler)" if kern is None
            else f", bfloat16 dot products in hardware: {'yes' if kern.native_bf16 else 'no'}")
    print(f"dsv3 runs on: {runtime.describe()}{note}")

    op, od, otoks = ours(ckpt, runtime, prompt, a.new_tokens, a.repeats)
    tp, td, ttoks = theirs(ckpt, dtype, a.threads, prompt, a.new_tokens, a.repeats)
    same = next((i for i, (x, y) in enumerate(zip(otoks, ttoks)) if x != y), len(otoks))
    print(f"{'':10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    print(f"{'dsv3':10} {op:14.1f} {od:13.1f}")
    print(f"{'hf':10} {tp:14.1f} {td:13.1f}")
    print(f"ratio      {op / tp:14.2f}x {od / td:12.2f}x   (target >= 3x for both)")
    print(f"greedy tokens identical to transformers' for the first {same} of {len(otoks)} "
          "(float32: all; bfloat16 rounding splits near-ties of a random model, in both implementations)")

    if not a.skip_rss:
        fp8 = work / "rss_fp8"
        if not (fp8 / "model.safetensors.index.json").exists():
            make_tiny(fp8, seed=0, fp8=True, shards=4, config=config(RSS_DIMS), force=True)
        r = fp8_rss(fp8, a.threads)
        print(
            f"FP8 load: {r['disk_mb']:.0f} MB on disk, peak RSS {r['peak_rss_mb']:.0f} MB "
            f"(python+torch before loading {r['baseline_rss_mb']:.0f} MB); "
            f"peak / disk = {r['peak_rss_mb'] / r['disk_mb']:.2f}x; limit 1.2 x disk + 300 MB = {r['limit_mb']:.0f} MB "
            f"-> {'OK' if r['peak_rss_mb'] <= r['limit_mb'] else 'OVER'}"
        )


if __name__ == "__main__":
    main()
