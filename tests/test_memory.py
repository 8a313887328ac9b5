"""The memory preflight: the limits read from real /proc and cgroup files (v1 and v2 layouts
written under a temporary root), the need of a real checkpoint, and the refusal end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dsv3cli.app import app
from dsv3cli.checkpoint import Checkpoint
from dsv3cli.errors import DsvError
from dsv3cli.memory import Need, cpu_limits, preflight, rank_needs
from dsv3cli.parallel import Dist

GiB = 1 << 30


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_the_cgroup_limit_counts_less_its_reclaimable_cache(tmp_path, layout):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    meminfo = "MemTotal:       67108864 kB\nMemAvailable:   33554432 kB\n"  # 32 GiB
    if layout == "v1":
        _write(proc, {"meminfo": meminfo, "self/cgroup": "5:devices:/\n4:memory:/job/42\n0::/\n"})
        _write(cg / "memory" / "job/42", {"memory.limit_in_bytes": str(8 * GiB), "memory.usage_in_bytes": str(3 * GiB),
                                          "memory.stat": f"cache 9\ntotal_inactive_file {GiB}\n"})
        name = "memory.limit_in_bytes"
    else:
        _write(proc, {"meminfo": meminfo, "self/cgroup": "0::/job/42\n"})
        _write(cg / "job/42", {"memory.max": str(8 * GiB), "memory.current": str(3 * GiB),
                               "memory.stat": f"anon 5\ninactive_file {GiB}\n"})
        name = "memory.max"
    limits = cpu_limits(proc, cg)
    assert (32 * GiB, "MemAvailable") in limits
    bytes_free, source = min(limits)
    assert bytes_free == 6 * GiB and source.endswith(name)  # 8 - (3 - 1 reclaimable)


def test_no_cgroup_limit_and_a_container_root(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    _write(proc, {"meminfo": "MemAvailable:   1024 kB\n", "self/cgroup": "0::/not/mounted/here\n"})
    _write(cg, {"memory.max": "max\n", "memory.current": "5\n"})  # the container's root: no limit
    assert cpu_limits(proc, cg) == [(1024 * 1024, "MemAvailable")]
    _write(cg, {"memory.max": str(GiB)})
    assert min(cpu_limits(proc, cg))[0] == 1024 * 1024
    assert (GiB - 5, f"the cgroup limit {cg / 'memory.max'}") in cpu_limits(proc, cg)


def test_an_address_space_limit_is_one_of_the_limits():
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (64 << 30, resource.RLIM_INFINITY));"
            "from dsv3cli.memory import cpu_limits; print([s for _, s in cpu_limits()])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "the address-space limit (ulimit -v)" in out.stdout, out.stderr


def test_rank_needs_its_share(tiny_bf16, tiny_fp8):
    ck = Checkpoint(tiny_bf16)
    one = rank_needs(ck, Dist(), torch.float32, 1, 64)
    two = rank_needs(ck, Dist(rank=1, world_size=2), torch.float32, 1, 64)
    bf16 = rank_needs(ck, Dist(), torch.bfloat16, 1, 64)
    total = sum(ck.nbytes(n) for n in ck.names())  # BF16 on disk
    assert total < one.weights < 2 * total and bf16.weights < one.weights
    assert two.weights < one.weights and two.kv_cache == one.kv_cache  # the latent cache is not split
    cfg = ck.config
    assert one.kv_cache == (cfg.num_hidden_layers + 1) * 64 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert rank_needs(ck, Dist(), torch.float32, 2, 128).kv_cache == 4 * one.kv_cache
    assert rank_needs(Checkpoint(tiny_fp8), Dist(), torch.bfloat16, 1, 64).weights < bf16.weights


def test_preflight_message():
    need = Need(weights=10 * GiB, kv_cache=2 * GiB, scratch=GiB)
    preflight(need, (14 * GiB, "MemAvailable"))
    preflight(need, None)
    with pytest.raises(DsvError) as e:
        preflight(need, (5 * GiB, "the cgroup limit /sys/fs/cgroup/memory.max"), what="ckpt: ")
    msg = str(e.value)
    for w in ("ckpt: this rank needs 14.0 GB", "5.4 GB is available", "memory.max", "--nproc", "FP8",
              "--max-seq-len", "--force"):
        assert w in msg, msg
    with pytest.raises(DsvError, match="2 ranks on this machine need"):
        preflight(need, (20 * GiB, "MemAvailable"), ranks_here=2)


def test_generate_refuses_before_loading_and_force_skips_the_check(tiny_bf16):
    runner = CliRunner()
    big = ["--prompt-ids", "1,2", "--dtype", "float32", "--max-seq-len", str(10**9)]  # a TB of KV cache
    r = runner.invoke(app, ["generate", str(tiny_bf16), *big])
    assert r.exit_code == 1, r.output
    err = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(err) == 1 and "KV cache" in err[0] and "available" in err[0], r.stderr
    r = runner.invoke(app, ["generate", str(tiny_bf16), "--prompt-ids", "1,2", "--dtype", "float32", "--max-seq-len",
                            "64", "-n", "2", "--force", "--json"])
    assert r.exit_code == 0, r.output
    # --force past the check: the allocation that fails is still one line (not "internal error")
    r = runner.invoke(app, ["generate", str(tiny_bf16), *big, "--force"])
    assert r.exit_code == 1, r.output
    err = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(err) == 1 and "out of memory while allocating" in err[0] and "--max-seq-len" in err[0], r.stderr
