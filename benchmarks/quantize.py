"""Benchmark of the FP8 CPU paths and of `dsv3 quantize`, as ratios against baselines measured
in the same run (never absolute times in tests).

  python benchmarks/quantize.py [--gb 2.0] [--workers N] [--dir TMP]

Prints:
- dequantize FP8 -> BF16 (into a preallocated buffer) vs a plain copy of the same output bytes
  into a preallocated buffer (goal >= 0.5x; also the naive `q.float() * s` for scale), and the
  same on uniformly random codes vs the Gaussian weights' codes (goal: within 10%);
- quantize BF16 -> FP8 (into a preallocated buffer) vs the same plain copy (goal >= 0.25x);
- both for the fused C kernel (`dsv3_kernels.cpu`, the default) and for the torch path it
  replaces (DSV3_CPU_KERNEL=0);
- the CPU time per element of each (all threads) and the cores each actually got: on a
  shared machine the wall-clock ratios mostly measure how much CPU the other processes left;
- the whole `dsv3 quantize` (a subprocess, both directions) vs reading its input and writing
  (with fsync) an output of the same size (goal <= 1.5x the time), and its peak RSS vs
  2 x the largest shard + 1 GB.
Tensors and the checkpoint are >= --gb GB of BF16 (larger than the CPU caches); the
checkpoint lives in a temporary folder that is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsv3cli import fp8

# A real V3 expert / dense shape: 2048 x 7168 and 18432 x 7168 are the common ones.
SHAPE = (18432, 7168)


CPU: dict = {}  # label -> best process CPU seconds (all threads): a load-independent view


def _best(fn, repeat=3, label=None) -> float:
    fn()  # warm: first-touch page faults of fresh buffers are not the steady state
    best = float("inf")
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if label:
            CPU[label] = min(CPU.get(label, float("inf")), time.process_time() - c0)
    return best


def _torch_path(on: bool):
    """DSV3_CPU_KERNEL=0 while `on`: fp8 then takes its torch path instead of the C kernel."""
    if on:
        os.environ["DSV3_CPU_KERNEL"] = "0"
    else:
        os.environ.pop("DSV3_CPU_KERNEL", None)


def bench_tensors(gb: float, workers: int | None) -> dict:
    n = max(1, round(gb * 1e9 / (SHAPE[0] * SHAPE[1] * 2)))
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(SHAPE, generator=g) * 0.02).to(torch.bfloat16) for _ in range(n)]
    outs = [torch.empty_like(w) for w in ws]
    nbytes = sum(w.numel() * 2 for w in ws)
    qs = [fp8.quantize_weight(w, workers=workers) for w in ws]
    q8 = [q for q, _ in qs]
    q8_out = [torch.empty_like(q) for q in q8]

    # Uniformly random codes (NaN codes excepted) under the same scales: 6% have exponent 0,
    # the E4M3 subnormals, against about 0.01% of the Gaussian weights' codes.
    uni = []
    for q, sc in qs:
        u = torch.randint(0, 256, q.shape, generator=g, dtype=torch.uint8)
        u[(u & 0x7F) == 0x7F] = 0
        uni.append((u.view(torch.float8_e4m3fn), sc))
    t_copy = _best(lambda: [o.copy_(w) for o, w in zip(outs, ws)], label="copy")
    t_copy8 = _best(lambda: [o.copy_(q) for o, q in zip(q8_out, q8)])
    res = {"tensors": n, "bf16_bytes": nbytes, "copy_GBps": nbytes / t_copy / 1e9, "paths": {}}
    paths = ["C kernel", "torch"] if fp8.load_c_kernels() is not None else ["torch"]
    first = None  # the first path's outputs: the other path must give the same bits
    for path in paths:
        _torch_path(path == "torch")
        t_deq = _best(lambda: [fp8.dequantize_weight(q, s, out=o, workers=workers) for (q, s), o in zip(qs, outs)], label=f"dequant {path}")
        t_uni = _best(lambda: [fp8.dequantize_weight(q, s, out=o, workers=workers) for (q, s), o in zip(uni, outs)],
                      label=f"dequant uniform codes {path}")
        t_q = _best(lambda: [fp8.quantize_weight(w, workers=workers, out=o) for w, o in zip(ws, q8_out)], label=f"quant {path}")
        assert torch.equal(q8_out[0].view(torch.uint8), q8[0].view(torch.uint8))
        if first is None:
            first = outs[0].clone()
        assert torch.equal(outs[0].view(torch.int16), first.view(torch.int16)), "the paths disagree"
        res["paths"][path] = {
            "dequant_vs_copy": t_copy / t_deq,
            "dequant_uniform_vs_gaussian_codes": t_deq / t_uni,
            "dequant_uniform_vs_gaussian_codes_cpu": CPU[f"dequant {path}"] / CPU[f"dequant uniform codes {path}"],
            "quant_vs_copy_bf16": t_copy / t_q,
            "quant_vs_copy_fp8_bytes": t_copy8 / t_q,
            "cores_used": {"dequant": CPU[f"dequant {path}"] / t_deq, "quant": CPU[f"quant {path}"] / t_q},
        }
    _torch_path(False)
    # Naive reference on one tensor only (it is slow), scaled to the same bytes.
    q0, s0 = qs[0]
    s_full = s0.repeat_interleave(128, 0).repeat_interleave(128, 1)
    t_naive = _best(lambda: (q0.float() * s_full).to(torch.bfloat16), repeat=1) * n
    res["naive_dequant_vs_copy"] = t_copy / t_naive
    res["cpu_ns_per_element"] = {k: v / (nbytes / 2) * 1e9 for k, v in CPU.items()}
    res["copy_cores_used"] = CPU["copy"] / t_copy
    return res


def make_checkpoint(folder: Path, gb: float) -> Path:
    """A >= gb GB BF16 checkpoint in the hub's layout (`dsv3 tiny`'s writer): the tiny preset with
    DeepSeek-V3's hidden size and expert width (7168, 2048) and as many routed experts as it takes."""
    from dsv3cli.config import load_preset
    from dsv3cli.tiny import make_tiny

    cfg = load_preset("tiny")
    per_expert = 3 * 2048 * 7168 * 2
    layers = cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers  # MoE layers
    experts = max(8, -(-round(gb * 1e9 / (per_expert * layers)) // 4) * 4)  # whole groups of 4
    cfg = cfg.replace(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=experts, n_group=experts // 4)
    make_tiny(folder, seed=0, shards=4, config=cfg, cut=True)
    return folder


def _io_baseline(src: Path, out_bytes: int, scratch: Path) -> float:
    """Read every shard of `src`, write (and fsync) `out_bytes` of new files: the floor for a conversion."""
    buf = bytearray(1 << 26)
    os.sync()  # earlier writes still being flushed would slow this one down
    t0 = time.perf_counter()
    for p in sorted(src.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    scratch.mkdir(exist_ok=True)
    left = out_bytes
    with open(scratch / "out.bin", "wb", buffering=0) as f:
        view = memoryview(buf)
        while left > 0:
            k = min(left, len(buf))
            f.write(view[:k])
            left -= k
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    shutil.rmtree(scratch)
    return dt


def _quantize_cli(src: Path, dst: Path, extra: list[str]) -> tuple[float, dict, int]:
    # Peak RSS from VmHWM of the child's own address space (ru_maxrss would inherit the
    # parent's peak across fork + exec).
    cmd = [sys.executable, "-c", "import sys\nfrom dsv3cli.app import main\nsys.argv=['dsv3', *sys.argv[1:]]\n"
           "try:\n    main()\nfinally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
           "    print('MAXRSS', hwm, file=sys.stderr)",
           "quantize", str(src), str(dst), "--json", *extra]
    os.sync()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"dsv3 quantize failed: {p.stderr}")
    rss = int(next(ln.split()[1] for ln in p.stderr.splitlines() if ln.startswith("MAXRSS"))) * 1024
    return wall, json.loads(p.stdout), rss


def bench_checkpoint(gb: float, workers: int | None, tmp: Path) -> dict:
    src = make_checkpoint(tmp / "bf16", gb)
    largest = max(p.stat().st_size for p in src.glob("*.safetensors"))
    extra = ["--device", "cpu"] + (["--workers", str(workers)] if workers else [])
    res = {}
    for label, a, b in (("bf16->fp8", src, tmp / "fp8"), ("fp8->bf16", tmp / "fp8", tmp / "bf16b")):
        in_bytes = sum(p.stat().st_size for p in a.glob("*.safetensors"))
        # Best of two for the conversion and for the baseline alike (the disk and the CPUs are shared).
        base0 = _io_baseline(a, in_bytes // 2 if label == "bf16->fp8" else in_bytes * 2, tmp / "scratch")
        runs = [_quantize_cli(a, b, extra), _quantize_cli(a, b, [*extra, "--force"])]
        wall, out, rss = min(runs, key=lambda r: r[1]["seconds"])
        rss = max(r[2] for r in runs)
        out_bytes = sum(p.stat().st_size for p in b.glob("*.safetensors"))
        base = min(base0, _io_baseline(a, out_bytes, tmp / "scratch"))
        big = max(p.stat().st_size for p in a.glob("*.safetensors"))
        res[label] = {
            "input_bytes": in_bytes,
            "output_bytes": out_bytes,
            "io_baseline_s": base,
            "convert_s": out["seconds"],
            "command_wall_s": wall,
            "convert_vs_io": out["seconds"] / base,
            "command_vs_io": wall / base,
            "peak_rss_bytes": rss,
            "rss_budget_bytes": 2 * big + (1 << 30),
            "rss_vs_budget": rss / (2 * big + (1 << 30)),
        }
    res["largest_input_shard"] = largest
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="GB of BF16 tensors and checkpoint (default 2)")
    ap.add_argument("--workers", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the temporary checkpoint")
    ap.add_argument("--skip-tensors", action="store_true")
    ap.add_argument("--skip-checkpoint", action="store_true")
    args = ap.parse_args()
    print(f"cores {fp8.default_workers()}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    kern = fp8.load_c_kernels()
    print(f"C kernel: {kern.path if kern else 'not available (DSV3_CPU_KERNEL=0, no compiler or a failed build; DSV3_DEBUG=1 says why)'}")
    if not args.skip_checkpoint:  # first, while this process is small
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            r = bench_checkpoint(args.gb, args.workers, Path(d))
        for label in ("bf16->fp8", "fp8->bf16"):
            x = r[label]
            print(f"dsv3 quantize {label}: {x['input_bytes'] / 1e9:.2f} GB -> {x['output_bytes'] / 1e9:.2f} GB")
            print(f"  conversion {x['convert_s']:.2f} s, whole command {x['command_wall_s']:.2f} s, read input + write output {x['io_baseline_s']:.2f} s")
            print(f"  time vs I/O: conversion {x['convert_vs_io']:.2f}x, whole command {x['command_vs_io']:.2f}x  (goal <= 1.5)")
            print(f"  peak RSS {x['peak_rss_bytes'] / 1e9:.2f} GB vs 2 x largest shard + 1 GB = {x['rss_budget_bytes'] / 1e9:.2f} GB: {x['rss_vs_budget']:.2f}x  (goal <= 1)")
    if not args.skip_tensors:
        r = bench_tensors(args.gb, args.workers)
        print(f"tensors: {r['tensors']} x {SHAPE} BF16 = {r['bf16_bytes'] / 1e9:.2f} GB; plain copy {r['copy_GBps']:.2f} GB/s"
              f" (cores used {r['copy_cores_used']:.2f}; naive q.float()*s dequant: {r['naive_dequant_vs_copy']:.3f}x)")
        for path, x in r["paths"].items():
            print(f"  {path} path:")
            print(f"    dequant FP8->BF16 vs copy of the output bytes: {x['dequant_vs_copy']:.3f}x  (goal >= 0.5)")
            print(f"    dequant speed, uniform random codes vs Gaussian: {x['dequant_uniform_vs_gaussian_codes']:.3f}x, "
                  f"by CPU time {x['dequant_uniform_vs_gaussian_codes_cpu']:.3f}x  (goal 0.9-1.1)")
            print(f"    quant BF16->FP8 vs copy of the BF16 bytes:    {x['quant_vs_copy_bf16']:.3f}x  (goal >= 0.25; vs a copy of the FP8 bytes: {x['quant_vs_copy_fp8_bytes']:.3f}x)")
            print("    cores actually used: " + ", ".join(f"{k} {v:.2f}" for k, v in x["cores_used"].items()))
        print("  CPU time per element (all threads): " + ", ".join(f"{k} {v:.2f} ns" for k, v in r["cpu_ns_per_element"].items()))


if __name__ == "__main__":
    main()
