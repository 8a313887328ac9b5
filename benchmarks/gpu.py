"""Benchmark of the CUDA paths, for a machine with a GPU; without one it prints
"no CUDA device: skipped" and exits 0.

Measured in one run, each against a baseline of the same run:
  - the FP8 block GEMM (dsv3_kernels.fp8.fp8_gemm, Triton: E4M3 operands, 1x128 activation and
    128x128 weight scales) vs torch's BF16 matmul, TFLOPS at DeepSeek-V3's projection shapes
    for M = 1, 64 and 4096 rows (and at M = 1 the GB/s of weights each reads);
  - weight dequantization (FP8 -> BF16) and activation quantization (BF16 -> FP8 + scales),
    GB/s moved vs a device copy of the same bytes;
  - batch-1 decode tokens/s of `dsv3 generate --device cuda` on a real-width checkpoint vs
    the bound the weights set: bytes a decode token reads / the copy's read bandwidth.

  python benchmarks/gpu.py                         # makes a 2-layer, 8-expert V3 cut (FP8)
  python benchmarks/gpu.py --checkpoint ./v3-cut-fp8 --new-tokens 128
  python benchmarks/gpu.py --skip-decode --json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

# benchmarks/ holds profile.py, which would shadow the standard library's `profile` (torch imports it).
sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

# (N, K) of V3's linear layers: q_b, o_proj, dense gate/up, dense down, expert gate/up, expert down.
SHAPES = {"q_b": (24576, 1536), "o_proj": (7168, 16384), "dense up": (18432, 7168), "dense down": (7168, 18432),
          "expert up": (2048, 7168), "expert down": (7168, 2048)}
ROWS = (1, 64, 4096)


def timed(fn, repeat: int = 20) -> float:
    """Median seconds of fn() on the device (CUDA events), after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_GBps(nbytes: int) -> float:
    """Bytes moved (read + write) per second by a device-to-device copy of `nbytes`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src)) / 1e9


def bench_gemm() -> list[dict]:
    from dsv3_kernels import fp8 as tk

    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", generator=g).to(torch.bfloat16) * k**-0.5
        w_q, w_s = tk.weight_quant(w)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            a_q, a_s = tk.act_quant(x)
            t8 = timed(lambda: tk.fp8_gemm(a_q, a_s, w_q, w_s))
            t16 = timed(lambda: x @ w.T)
            flops = 2 * m * n * k
            out.append({"shape": name, "M": m, "N": n, "K": k, "fp8_TFLOPS": flops / t8 / 1e12,
                        "bf16_TFLOPS": flops / t16 / 1e12, "fp8_vs_bf16": t16 / t8,
                        "fp8_weight_GBps": (n * k + w_s.numel() * 4) / t8 / 1e9, "bf16_weight_GBps": n * k * 2 / t16 / 1e9})
        del w, w_q, w_s
    return out


def bench_conversions() -> dict:
    from dsv3_kernels import fp8 as tk

    n, k = SHAPES["dense up"]
    w = torch.randn(n, k, device="cuda").to(torch.bfloat16)
    q, s = tk.weight_quant(w)
    moved = n * k * (1 + 2) + s.numel() * 4  # read codes + scales, write BF16
    deq = moved / timed(lambda: tk.weight_dequant(q, s)) / 1e9
    x = torch.randn(4096, k, device="cuda").to(torch.bfloat16)
    moved_a = x.numel() * (2 + 1) + x.numel() // 128 * 4  # read BF16, write codes + scales
    aq = moved_a / timed(lambda: tk.act_quant(x)) / 1e9
    cp = copy_GBps(n * k * 2)
    return {"copy_GBps": cp, "dequant_GBps": deq, "dequant_vs_copy": deq / cp, "act_quant_GBps": aq, "act_quant_vs_copy": aq / cp}


def bench_decode(ckpt: Path | None, new_tokens: int, work: Path) -> dict:
    from dsv3cli.checkpoint import Checkpoint

    dsv3 = str(Path(sys.executable).parent / "dsv3")
    if ckpt is None:
        ckpt = work / "v3-l2-e8-fp8"
        subprocess.run([dsv3, "tiny", str(ckpt), "--preset", "deepseek-v3", "--layers", "2", "--experts", "8",
                        "--no-mtp", "--fp8"], check=True, stdout=subprocess.DEVNULL)
    ck = Checkpoint(ckpt)
    prompt = [random.Random(0).randrange(5, min(ck.config.vocab_size, 100000)) for _ in range(128)]
    p = subprocess.run([dsv3, "generate", str(ckpt), "--device", "cuda", "--prompt-ids", ",".join(map(str, prompt)),
                        "--max-new-tokens", str(new_tokens), "--batch-size", "1", "--mtp", "0", "--json"],
                       check=True, capture_output=True, text=True)
    st = json.loads(p.stdout)["stats"]
    nbytes = ck.decode_bytes()
    read = copy_GBps(1 << 30) / 2  # a copy reads half the bytes it moves
    bound = read * 1e9 / nbytes
    return {"checkpoint": str(ckpt), "decode_bytes_per_token": nbytes, "decode_tokens_per_s": st["decode_tokens_per_s"],
            "prefill_tokens_per_s": st["prefill_tokens_per_s"], "read_GBps": read, "bound_tokens_per_s": bound,
            "decode_vs_bound": st["decode_tokens_per_s"] / bound}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="checkpoint for the decode measurement (default: make a V3 cut)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return
    res = {"device": torch.cuda.get_device_name(), "gemm": bench_gemm(), "conversions": bench_conversions()}
    if not a.skip_decode:
        with tempfile.TemporaryDirectory() as d:
            res["decode"] = bench_decode(a.checkpoint, a.new_tokens, Path(d))
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{res['device']}")
    print(f"{'shape':<12}{'M':>5}  {'FP8 TFLOPS':>10}  {'BF16 TFLOPS':>11}  {'FP8/BF16':>8}  weights GB/s FP8 / BF16")
    for r in res["gemm"]:
        print(f"{r['shape']:<12}{r['M']:>5}  {r['fp8_TFLOPS']:>10.1f}  {r['bf16_TFLOPS']:>11.1f}  {r['fp8_vs_bf16']:>7.2f}x"
              f"  {r['fp8_weight_GBps']:.0f} / {r['bf16_weight_GBps']:.0f}")
    c = res["conversions"]
    print(f"device copy {c['copy_GBps']:.0f} GB/s moved; dequant {c['dequant_GBps']:.0f} GB/s ({c['dequant_vs_copy']:.2f}x), "
          f"act quant {c['act_quant_GBps']:.0f} GB/s ({c['act_quant_vs_copy']:.2f}x)")
    if "decode" in res:
        d = res["decode"]
        print(f"decode {d['decode_tokens_per_s']:.1f} tok/s vs bound {d['bound_tokens_per_s']:.1f} "
              f"({d['decode_bytes_per_token'] / 1e9:.2f} GB/token at {d['read_GBps']:.0f} GB/s read): "
              f"{d['decode_vs_bound']:.0%}; prefill {d['prefill_tokens_per_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
