"""A sweep of bad inputs and faults across every command: how many are handled well.

Handled means: the exit code expected (1 for bad input and faults, 2 for usage errors), one
`Error:` line on stderr naming the culprit (verify: a `problem:` line on stdout), no traceback,
and no new file at a final path (only hidden temporary or resume state). Faults (a killed or
stopped rank, stdout closed) run as real processes; the rest in-process through Typer's runner.

    python tests/sweep_bad_input.py            # prints one line per case and the total
    python tests/sweep_bad_input.py --fast     # in-process cases only

tests/test_bad_input.py runs the same cases (the in-process ones each as a test).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

INDEX = "model.safetensors.index.json"
SHARD1 = "model-00001-of-00003.safetensors"
GEN = ["--dtype", "float32", "--max-new-tokens", "4", "--max-seq-len", "64"]


@dataclass
class Case:
    name: str
    make: Callable[["Work"], list[str]]  # builds its inputs, returns the argv after `dsv3`
    code: int
    words: tuple[str, ...]  # what the line must name
    where: str = "stderr"  # or "problems" (verify's report on stdout)
    env: dict[str, str] = field(default_factory=dict)
    process: Callable[["Work", list[str]], subprocess.CompletedProcess] | None = None  # a real process


class Work:
    """A scratch folder with the tiny checkpoints and variants made on demand."""

    def __init__(self, root: Path):
        from dsv3cli.tiny import make_tiny

        self.root = root
        self.bf16 = make_tiny(root / "bf16", seed=0, shards=3)
        self.fp8 = make_tiny(root / "fp8", seed=0, fp8=True, shards=3)
        self.n = 0

    def path(self, name: str) -> Path:
        self.n += 1
        return self.root / f"{self.n:03d}-{name}"

    def file(self, name: str, data: bytes | str) -> Path:
        p = self.path(name)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    def variant(self, name: str, src: Path | None = None, *, config: dict | None = None, drop: str | None = None,
                tensor: tuple[str, Callable] | None = None, unlist: str | None = None,
                shard: Callable[[Path], None] | None = None) -> Path:
        """A copy of a checkpoint with config.json keys changed, a file dropped, one tensor changed,
        a tensor left out of the index, or a shard rewritten."""
        from safetensors.torch import load_file, save_file

        dst = self.path(name)
        shutil.copytree(src or self.bf16, dst)
        if config is not None:
            cfg = json.loads((dst / "config.json").read_text())
            cfg.update(config)
            (dst / "config.json").write_text(json.dumps(cfg))
        if drop:
            (dst / drop).unlink()
        index = json.loads((dst / INDEX).read_text())
        if tensor:
            tname, change = tensor
            path = dst / index["weight_map"][tname]
            ts = load_file(path)
            ts[tname] = change(ts[tname].clone())
            save_file(ts, path, metadata={"format": "pt"})
        if unlist:
            del index["weight_map"][unlist]
            (dst / INDEX).write_text(json.dumps(index))
        if shard:
            shard(dst / SHARD1)
        return dst


def _nan(t):
    t.view(-1)[0] = float("nan")
    return t


def _nan_code(t):
    import torch

    t.view(torch.uint8).view(-1)[5] = 0x7F
    return t


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-100])


def _lfs(p: Path) -> None:
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")


def _as_dir(p: Path) -> None:
    p.unlink()
    p.mkdir()


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the child of `launcher` that runs as RANK=rank (read from /proc)."""
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (d / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(d.name)
    return None


def signal_rank(argv: list[str], rank: int, sig: int, timeout_s: int = 600) -> subprocess.CompletedProcess:
    """Run `dsv3 ARGV` (a long generate --nproc 2); once rank 0 printed its first result (every rank
    is generating), send `sig` to the real process of `rank`. The run must end within the
    collective timeout + 30 s of that (else TimeoutExpired)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DSV3_COLLECTIVE_TIMEOUT_S=str(timeout_s))
    p = subprocess.Popen([sys.executable, "-m", "dsv3cli.app", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = p.stdout.readline()
        pid = rank_pid(p.pid, rank)
        if first and pid is not None:
            os.kill(pid, sig)
        out, err = p.communicate(timeout=timeout_s + 30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, first + out, err)


def _signal_rank(rank: int, sig: int, timeout_s: int = 600):
    return lambda w, argv: signal_rank(argv, rank, sig, timeout_s)


def closed_stdout(w: Work, argv: list[str]) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "dsv3cli.app", *argv], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(1))
    return subprocess.CompletedProcess(p.args, p.returncode, "", p.stderr)


def _manifest_of_other_settings(w: Work) -> list[str]:
    dst = w.path("resume-other")
    dst.mkdir()
    (dst / ".dsv3-quantize.json").write_text(json.dumps({"job": {"version": 2, "src": "/elsewhere", "to": "fp8",
                                                                  "scale_fmt": "e4m3"}, "shards": {}}))
    return ["quantize", str(w.bf16), str(dst), "--resume"]


def _ids(n: int) -> list[str]:
    return [a for _ in range(n) for a in ("--prompt-ids", "1,2,3")]


def cases() -> list[Case]:
    T = lambda w: str(w.bf16)  # noqa: E731
    O1 = "model.layers.1.self_attn.o_proj.weight"
    G1 = "model.layers.1.mlp.gate.weight"
    c = [
        # ---- generate: options and prompts
        Case("generate: ids not numbers", lambda w: ["generate", T(w), "--prompt-ids", "1,x"], 2, ("--prompt-ids",)),
        Case("generate: id outside the vocabulary", lambda w: ["generate", T(w), "--prompt-ids", "0,99999"], 2, ("99999", "vocabulary")),
        Case("generate: prompt longer than --max-seq-len", lambda w: ["generate", T(w), "--prompt-ids", "1,2,3,4", "--max-seq-len", "4"], 2, ("--max-seq-len",)),
        Case("generate: --prompt-ids empty", lambda w: ["generate", T(w), "--prompt-ids", ","], 2, ("--prompt-ids", "empty")),
        Case("generate: --top-p 0", lambda w: ["generate", T(w), "--prompt-ids", "1", "--top-p", "0"], 2, ("--top-p",)),
        Case("generate: --mtp on a checkpoint without MTP", lambda w: ["generate", str(w.variant("nomtp", config={"num_nextn_predict_layers": 0})), "--prompt-ids", "1", "--mtp", "1", *GEN], 2, ("MTP",)),
        Case("generate: --nproc not dividing the heads", lambda w: ["generate", T(w), "--prompt-ids", "1", "--nproc", "3"], 1, ("world size 3",)),
        Case("generate: no prompt, stdin not a terminal", lambda w: ["generate", T(w)], 2, ("no prompt",)),
        Case("generate: --prompts binary", lambda w: ["generate", T(w), "--prompts", str(w.file("bin.txt", b"\x80\xff\xfe\n"))], 1, ("bin.txt", "UTF-8")),
        Case("generate: --prompts a folder", lambda w: ["generate", T(w), "--prompts", str(w.root)], 1, ("--prompts", "folder")),
        Case("generate: --prompts missing", lambda w: ["generate", T(w), "--prompts", str(w.root / "none.txt")], 1, ("none.txt", "no such file")),
        Case("generate: --prompts bad JSONL line", lambda w: ["generate", T(w), "--prompts", str(w.file("p.jsonl", '{"prompt": "a"}\n{"x": 1}\n'))], 1, ("p.jsonl:2",)),
        Case("generate: --prompts bad JSON", lambda w: ["generate", T(w), "--prompts", str(w.file("q.jsonl", '{"prompt": \n'))], 1, ("q.jsonl:1", "JSON")),
        Case("generate: --prompts empty", lambda w: ["generate", T(w), "--prompts", str(w.file("e.txt", "\n\n"))], 1, ("e.txt", "no prompts")),
        Case("generate: --prompt without tokenizer.json", lambda w: ["generate", str(w.variant("notok", drop="tokenizer.json")), "--prompt", "hi"], 1, ("tokenizer.json",)),
        # ---- generate: the checkpoint
        Case("generate: checkpoint missing", lambda w: ["generate", str(w.root / "nowhere"), "--prompt-ids", "1"], 1, ("nowhere",)),
        Case("generate: checkpoint is a file", lambda w: ["generate", str(w.file("afile", "x")), "--prompt-ids", "1"], 1, ("afile",)),
        Case("generate: config.json not JSON", lambda w: ["generate", str(w.variant("badjson", shard=lambda p: (p.parent / "config.json").write_text("{"))), "--prompt-ids", "1"], 1, ("config.json", "JSON")),
        Case("generate: config of another model", lambda w: ["generate", str(w.variant("llama", config={"model_type": "llama", "architectures": ["LlamaForCausalLM"]})), "--prompt-ids", "1"], 1, ("llama",)),
        Case("generate: a tensor missing", lambda w: ["generate", str(w.variant("missing", unlist=G1)), "--prompt-ids", "1", *GEN], 1, (G1,)),
        Case("generate: shard truncated", lambda w: ["generate", str(w.variant("trunc", shard=_truncate)), "--prompt-ids", "1", *GEN], 1, (SHARD1,)),
        Case("generate: shard is a Git LFS pointer", lambda w: ["generate", str(w.variant("lfs", shard=_lfs)), "--prompt-ids", "1", *GEN], 1, (SHARD1, "LFS")),
        Case("generate: config with fewer layers", lambda w: ["generate", str(w.variant("short", config={"num_hidden_layers": 1})), "--prompt-ids", "1", *GEN], 1, ("num_hidden_layers",)),
        Case("generate: hidden_size disagrees", lambda w: ["generate", str(w.variant("wide", config={"hidden_size": 128})), "--prompt-ids", "1", *GEN], 1, ("shape",)),
        Case("generate: NaN weight (logits)", lambda w: ["generate", str(w.variant("nan", tensor=("model.norm.weight", _nan))), "--prompt-ids", "1", "--mtp", "0", *GEN], 1, ("step 1", "NaN")),
        Case("generate: FP8 NaN code", lambda w: ["generate", str(w.variant("nan8", w.fp8, tensor=(O1, _nan_code))), "--prompt-ids", "1", *GEN], 1, (O1, "0x7F")),
        Case("generate: not enough memory", lambda w: ["generate", T(w), "--prompt-ids", "1", "--dtype", "float32", "--max-seq-len", str(10**9)], 1, ("KV cache", "available", "--force")),
        Case("generate: bad DSV3_COLLECTIVE_TIMEOUT_S", lambda w: ["generate", T(w), "--prompt-ids", "1", "--nproc", "2", *GEN], 1, ("DSV3_COLLECTIVE_TIMEOUT_S",), env={"DSV3_COLLECTIVE_TIMEOUT_S": "soon"}),
        # ---- quantize
        Case("quantize: SRC missing", lambda w: ["quantize", str(w.root / "nosrc"), str(w.path("d"))], 1, ("nosrc", "no such folder")),
        Case("quantize: SRC is a file", lambda w: ["quantize", str(w.file("srcfile", "x")), str(w.path("d"))], 1, ("srcfile", "not a folder")),
        Case("quantize: DST inside SRC", lambda w: ["quantize", T(w), str(w.bf16 / "out")], 2, ("inside SRC",)),
        Case("quantize: DST is SRC", lambda w: ["quantize", T(w), T(w)], 2, ("SRC itself",)),
        Case("quantize: --resume and --force", lambda w: ["quantize", T(w), str(w.path("d")), "--resume", "--force"], 2, ("--resume", "--force")),
        Case("quantize: DST not empty", lambda w: ["quantize", T(w), str(w.file("x", "").parent)], 1, ("not empty",)),
        Case("quantize: DST is a file", lambda w: ["quantize", T(w), str(w.file("dstfile", "x"))], 1, ("dstfile", "not a folder")),
        Case("quantize: already FP8 with --to fp8", lambda w: ["quantize", str(w.fp8), str(w.path("d")), "--to", "fp8"], 2, ("already fp8",)),
        Case("quantize: --scale-fmt with --to bf16", lambda w: ["quantize", str(w.fp8), str(w.path("d")), "--scale-fmt", "ue8m0"], 2, ("--scale-fmt",)),
        Case("quantize: a tensor not in the index", lambda w: ["quantize", str(w.variant("unlisted", unlist=G1)), str(w.path("d"))], 1, (G1,)),
        Case("quantize: hidden_size disagrees", lambda w: ["quantize", str(w.variant("wideq", config={"hidden_size": 128})), str(w.path("d"))], 1, ("shape", "config.json")),
        Case("quantize: FP8 config over BF16", lambda w: ["quantize", str(w.variant("says8", config={"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}})), str(w.path("d"))], 1, ("quantization_config",)),
        Case("quantize: shard truncated", lambda w: ["quantize", str(w.variant("truncq", shard=_truncate)), str(w.path("d"))], 1, (SHARD1,)),
        Case("quantize: --resume of other settings", _manifest_of_other_settings, 1, ("/elsewhere to fp8", "--force")),
        Case("quantize: config of another model", lambda w: ["quantize", str(w.variant("llamaq", config={"model_type": "llama", "architectures": ["LlamaForCausalLM"]})), str(w.path("d"))], 1, ("llama",)),
        # ---- verify
        Case("verify: folder missing", lambda w: ["verify", str(w.root / "novf")], 1, ("novf", "no such folder")),
        Case("verify: shard is a folder", lambda w: ["verify", str(w.variant("dirshard", shard=_as_dir))], 1, (SHARD1, "a folder"), where="problems"),
        Case("verify: shard truncated", lambda w: ["verify", str(w.variant("truncv", shard=_truncate))], 1, (SHARD1,), where="problems"),
        Case("verify: tensor not in the index", lambda w: ["verify", str(w.variant("unlistv", unlist=G1))], 1, (G1,), where="problems"),
        Case("verify: NaN with --check-values", lambda w: ["verify", str(w.variant("nanv", tensor=("model.norm.weight", _nan))), "--check-values"], 1, ("model.norm.weight",), where="problems"),
        # ---- profile-experts
        Case("profile-experts: --prompts a folder", lambda w: ["profile-experts", T(w), "--prompts", str(w.root)], 1, ("--prompts", "folder")),
        Case("profile-experts: --prompts missing", lambda w: ["profile-experts", T(w), "--prompts", str(w.root / "np.txt")], 1, ("np.txt",)),
        Case("profile-experts: --prompts binary", lambda w: ["profile-experts", T(w), "--prompts", str(w.file("pb.txt", b"\xff\xfe\x00"))], 1, ("pb.txt", "UTF-8")),
        Case("profile-experts: id outside the vocabulary", lambda w: ["profile-experts", T(w), "--prompt-ids", "1,99999"], 2, ("99999", "vocabulary")),
        Case("profile-experts: ids not numbers", lambda w: ["profile-experts", T(w), "--prompt-ids", "1,y"], 2, ("--prompt-ids",)),
        Case("profile-experts: --out is a file", lambda w: ["profile-experts", T(w), "--prompt-ids", "1,2", "--out", str(w.file("outfile", "x"))], 1, ("outfile", "not a folder")),
        Case("profile-experts: checkpoint missing", lambda w: ["profile-experts", str(w.root / "nope"), "--prompt-ids", "1"], 1, ("nope",)),
        Case("profile-experts: not enough memory", lambda w: ["profile-experts", T(w), "--prompt-ids", "1,2", "--generate", str(10**9)], 1, ("KV cache", "available")),
        # ---- estimate-cost
        Case("estimate-cost: --mfu abc", lambda w: ["estimate-cost", "--mfu", "abc"], 2, ("--mfu", "0.35")),
        Case("estimate-cost: --mfu 2", lambda w: ["estimate-cost", "--mfu", "2"], 2, ("--mfu",)),
        Case("estimate-cost: --tokens lots", lambda w: ["estimate-cost", "--tokens", "lots"], 2, ("--tokens",)),
        Case("estimate-cost: --gpus 0", lambda w: ["estimate-cost", "--gpus", "0"], 2, ("--gpus",)),
        Case("estimate-cost: unknown preset", lambda w: ["estimate-cost", "--preset", "gpt5"], 2, ("gpt5",)),
        Case("estimate-cost: heads 0", lambda w: ["estimate-cost", "--config", str(w.variant("heads0", config={"num_attention_heads": 0}) / "config.json")], 1, ("num_attention_heads",)),
        Case("estimate-cost: hidden_size 'big'", lambda w: ["estimate-cost", "--config", str(w.variant("big", config={"hidden_size": "big"}) / "config.json")], 1, ("hidden_size", '"big"')),
        Case("estimate-cost: config missing", lambda w: ["estimate-cost", "--config", str(w.root / "c.json")], 1, ("c.json",)),
        Case("estimate-cost: config not JSON", lambda w: ["estimate-cost", "--config", str(w.file("c.json", "{,"))], 1, ("c.json", "JSON")),
        # ---- download (no hub reachable) and tiny
        Case("download: --local-dir is a file", lambda w: ["download", "--local-dir", str(w.file("ldfile", "x"))], 1, ("ldfile", "not a folder")),
        Case("download: hub unreachable", lambda w: ["download", "--local-dir", str(w.path("dl"))], 1, ("hub",), env={"HF_ENDPOINT": "http://127.0.0.1:9"}),
        Case("tiny: OUT is a file", lambda w: ["tiny", str(w.file("tinyfile", "x"))], 1, ("tinyfile",)),
        Case("tiny: OUT not empty", lambda w: ["tiny", str(w.file("y", "").parent)], 1, ("--force",)),
        # ---- faults, in real processes
        Case("generate: stdout closed", lambda w: ["generate", T(w), "--prompt-ids", "1", *GEN], 1, ("stdout",), process=closed_stdout),
        Case("generate --nproc 2: rank 1 SIGKILLed", lambda w: ["generate", T(w), *_ids(200), "--batch-size", "1", "--nproc", "2", "--mtp", "0", *GEN], 1, ("rank 1 of 2", "SIGKILL"), process=_signal_rank(1, signal.SIGKILL)),
        Case("generate --nproc 2: rank 0 SIGTERMed", lambda w: ["generate", T(w), *_ids(200), "--batch-size", "1", "--nproc", "2", "--mtp", "0", *GEN], 1, ("rank 0 of 2", "SIGTERM"), process=_signal_rank(0, signal.SIGTERM)),
        Case("generate --nproc 2: rank 1 stopped", lambda w: ["generate", T(w), *_ids(200), "--batch-size", "1", "--nproc", "2", "--mtp", "0", *GEN], 1, ("rank 1 of 2", "no progress"), process=_signal_rank(1, signal.SIGSTOP, timeout_s=5)),
    ]
    return c


def _visible_files(root: Path) -> set[Path]:
    """Files at final-looking paths: not hidden, not inside a hidden folder."""
    return {p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def run_case(case: Case, w: Work) -> tuple[bool, str]:
    """(handled, the line shown or why not)."""
    argv = case.make(w)
    before = _visible_files(w.root)
    if case.process is not None:
        r = case.process(w, argv)
        code, out, err = r.returncode, r.stdout, r.stderr
    else:
        from typer.testing import CliRunner

        from dsv3cli.app import app

        old = {k: os.environ.get(k) for k in case.env}
        os.environ.update(case.env)  # the launcher's children read it too
        try:
            res = CliRunner().invoke(app, argv)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        code, out, err = res.exit_code, res.stdout, res.stderr
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            return False, f"raised {type(res.exception).__name__}: {res.exception}"
    created = sorted(str(p.relative_to(w.root)) for p in _visible_files(w.root) - before)
    errors = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    if case.where == "problems":
        lines = [ln for ln in out.splitlines() if ln.startswith("problem:")]
        line = next((ln for ln in lines if all(x in ln for x in case.words)), lines[0] if lines else "")
        one = bool(lines) and not errors
    else:
        line = errors[0] if errors else ""
        one = len(errors) == 1 and line.startswith("Error: ")
    why = []
    if code != case.code:
        why.append(f"exit {code}, expected {case.code}")
    if not one:
        why.append(f"not one line: {errors[:3]}")
    if "Traceback" in out + err:
        why.append("a traceback")
    if not all(x in line for x in case.words):
        why.append(f"does not name {case.words}")
    if created:
        why.append(f"left {created[:3]}")
    return not why, line if not why else "; ".join(why) + f" [{line}]"


def main(argv: list[str]) -> int:
    fast = "--fast" in argv
    todo = [c for c in cases() if not (fast and c.process)]
    with tempfile.TemporaryDirectory(prefix="dsv3-sweep-") as tmp:
        w = Work(Path(tmp))
        handled = 0
        t0 = time.monotonic()
        for c in todo:
            ok, line = run_case(c, w)
            handled += ok
            print(f"{'ok  ' if ok else 'FAIL'} {c.name}: {line}"[:200], flush=True)
    print(f"handled {handled}/{len(todo)} ({100 * handled / len(todo):.0f}%) in {time.monotonic() - t0:.0f} s")
    return 0 if handled == len(todo) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
