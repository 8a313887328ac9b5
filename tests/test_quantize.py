"""dsv3 quantize: whole-checkpoint conversion on real safetensors files.

Values against the float64 references, the output layout (hub's FP8 set, scales beside their
weights, index, config, copied files, MTP), --resume after a real SIGKILL, determinism, every
bad input, and a checkpoint saved by transformers quantized by dsv3 and loaded back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dsv3cli import convert, fp8
from dsv3cli.app import app
from dsv3cli.checkpoint import Checkpoint, is_fp8_weight, scale_name, validate
from dsv3cli.errors import DsvError

runner = CliRunner()
INDEX = "model.safetensors.index.json"


def _run(*args, env=None):
    r = runner.invoke(app, ["quantize", *map(str, args)], env=env)
    return r


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(d)
    return {n: ck.get(n) for n in ck.names()}


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _checked_by_ref(names) -> set[str]:
    """The float64 references are slow: use them on a sample (every ragged kv_a_proj_with_mqa,
    the MTP layer's, every 8th other); the rest are checked against the fast paths, which
    test_fp8.py holds bit-exact to the references."""
    names = sorted(names)
    return {n for i, n in enumerate(names) if "kv_a_proj" in n or ".layers.3." in n or i % 8 == 0}


@pytest.fixture(scope="module")
def to_fp8(tiny_bf16, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "fp8"
    r = _run(tiny_bf16, out, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


@pytest.fixture(scope="module")
def to_bf16(to_fp8, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "bf16"
    r = _run(to_fp8[0], out, "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_bf16_to_fp8_layout_and_values(tiny_bf16, to_fp8):
    out, res = to_fp8
    assert res["to"] == "fp8" and res["scale_fmt"] == "e4m3" and res["device"] == "cpu"
    src, dst = Checkpoint(tiny_bf16), Checkpoint(out)
    rep = validate(out)
    assert rep.ok, rep.problems
    assert dst.shards == src.shards and dst.has_mtp
    want_fp8 = {n for n in src.names() if is_fp8_weight(n)}
    assert {n for n in dst.names() if dst.dtype(n) == "F8_E4M3"} == want_fp8 and len(want_fp8) == res["fp8_weights"]
    assert set(dst.names()) == set(src.names()) | {scale_name(n) for n in want_fp8}
    by_ref = _checked_by_ref(want_fp8)
    for n in src.names():
        w = src.get(n)
        if n in want_fp8:
            q, s = (fp8.quantize_weight_ref if n in by_ref else fp8.quantize_weight)(w)
            assert dst.weight_map[scale_name(n)] == dst.weight_map[n] == src.weight_map[n]
            assert torch.equal(_bits(dst.get(n)), _bits(q)) and torch.equal(dst.get(scale_name(n)), s), n
        else:
            assert dst.weight_map[n] == src.weight_map[n] and dst.dtype(n) == src.dtype(n)
            assert torch.equal(_bits(dst.get(n)), _bits(w)), n
    idx = json.loads((out / INDEX).read_text())
    assert idx["metadata"]["total_size"] == sum(dst.nbytes(n) for n in dst.names()) == res["total_size"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]
    }
    src_cfg = json.loads((tiny_bf16 / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == src_cfg
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (tiny_bf16 / f).read_bytes()
    assert not (out / convert.MANIFEST_NAME).exists() and not list(out.glob(".*"))
    for shard in dst.shards:  # loadable by safetensors itself
        with safe_open(str(out / shard), framework="pt") as f:
            assert set(f.keys()) == set(dst.tensors_in(shard))


def test_same_values_as_tiny_fp8(tiny_fp8, to_fp8):
    """make_tiny --fp8 quantizes the same seed's weights: every tensor equal, wherever stored."""
    a, b = _tensors(tiny_fp8), _tensors(to_fp8[0])
    assert set(a) == set(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(_bits(a[n]), _bits(b[n])), n


def test_fp8_to_bf16_values(tiny_fp8, to_fp8, to_bf16, tmp_path):
    out, res = to_bf16
    assert res["to"] == "bf16" and res["fp8_weights"] == 0
    assert validate(out).ok
    src, dst = Checkpoint(to_fp8[0]), Checkpoint(out)
    assert not any(n.endswith("_scale_inv") for n in dst.names())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    by_ref = _checked_by_ref(n for n in src.names() if src.dtype(n) == "F8_E4M3")
    for n in dst.names():
        if src.dtype(n) == "F8_E4M3":
            assert dst.dtype(n) == "BF16"
            deq = fp8.dequantize_weight_ref if n in by_ref else fp8.dequantize_weight
            want = deq(src.get(n), src.get(scale_name(n)), torch.bfloat16)
            assert torch.equal(_bits(dst.get(n)), _bits(want)), n
        else:
            assert torch.equal(_bits(dst.get(n)), _bits(src.get(n)))
    # tiny_fp8 keeps some scales in another shard than their weight: go through the index.
    ck = Checkpoint(tiny_fp8)
    assert any(ck.weight_map[scale_name(n)] != ck.weight_map[n] for n in ck.names() if ck.dtype(n) == "F8_E4M3")
    r = _run(tiny_fp8, tmp_path / "b")
    assert r.exit_code == 0, r.output
    a, b = _tensors(tmp_path / "b"), _tensors(out)  # same values (stored in other shards)
    assert set(a) == set(b) and all(torch.equal(_bits(a[n]), _bits(b[n])) for n in a)


def test_round_trip_fp8_bf16_fp8(to_bf16, tmp_path):
    """The second FP8 checkpoint is the exact quantization of the BF16 one, and its values
    stay within E4M3's half step of the first."""
    r = _run(to_bf16[0], tmp_path / "fp8b", "--to", "fp8")
    assert r.exit_code == 0, r.output
    mid, again = Checkpoint(to_bf16[0]), Checkpoint(tmp_path / "fp8b")
    by_ref = _checked_by_ref(n for n in mid.names() if is_fp8_weight(n))
    for n in mid.names():
        if is_fp8_weight(n):
            q, s = (fp8.quantize_weight_ref if n in by_ref else fp8.quantize_weight)(mid.get(n))
            assert torch.equal(_bits(again.get(n)), _bits(q)) and torch.equal(again.get(scale_name(n)), s)
            back = fp8.dequantize_weight(q, s, torch.float32)
            assert (back - mid.get(n).float()).abs().max() <= mid.get(n).float().abs().max() * 2.0**-4


def test_ue8m0_and_determinism(tiny_bf16, tmp_path):
    outs = []
    for k in range(2):
        r = _run(tiny_bf16, tmp_path / f"u{k}", "--scale-fmt", "ue8m0", "--threads", str(k + 1))
        assert r.exit_code == 0, r.output
        outs.append(_files(tmp_path / f"u{k}"))
    assert outs[0] == outs[1]  # deterministic, whatever the thread count
    cfg = json.loads((tmp_path / "u0" / "config.json").read_text())
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    ck = Checkpoint(tmp_path / "u0")
    for n in ck.names():
        if n.endswith("_scale_inv"):
            s = ck.get(n)
            assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two
    n = next(n for n in ck.names() if ck.dtype(n) == "F8_E4M3")
    q, s = fp8.quantize_weight_ref(Checkpoint(tiny_bf16).get(n), "ue8m0")
    assert torch.equal(_bits(ck.get(n)), _bits(q)) and torch.equal(ck.get(scale_name(n)), s)


def test_c_kernel_and_torch_paths_give_the_same_bytes_and_no_torch_import(tiny_bf16, tmp_path):
    """F16 and F32 weights beside BF16 ones (F16 goes through torch even with the C kernels);
    the C kernel path and the torch path (DSV3_CPU_KERNEL=0) write byte-identical checkpoints
    both ways; and on the CPU with the C kernels the command never imports torch."""
    from dsv3_kernels.cpu import load

    ck = Checkpoint(tiny_bf16)
    shard = ck.shards[0]
    src = _copy(tiny_bf16, tmp_path / "src", real=(shard,))
    t = load_file(src / shard)
    fp8_names = sorted(n for n in t if is_fp8_weight(n))
    assert len(fp8_names) >= 2
    t[fp8_names[0]] = t[fp8_names[0]].to(torch.float16)
    t[fp8_names[1]] = t[fp8_names[1]].float() * 1e3  # another magnitude, F32
    save_file(t, src / shard, metadata={"format": "pt"})
    outs = {}
    for path, env in (("c", None), ("torch", {"DSV3_CPU_KERNEL": "0"})):
        for direction, a in (("fp8", src), ("bf16", tmp_path / f"{path}-fp8")):
            r = _run(a, tmp_path / f"{path}-{direction}", "--device", "cpu", env=env)
            assert r.exit_code == 0, r.output
            outs[path, direction] = _files(tmp_path / f"{path}-{direction}")
    assert outs["c", "fp8"] == outs["torch", "fp8"] and outs["c", "bf16"] == outs["torch", "bf16"]
    dst = Checkpoint(tmp_path / "c-fp8")
    for n in fp8_names[:2]:
        q, s = fp8.quantize_weight_ref(t[n])
        assert torch.equal(_bits(dst.get(n)), _bits(q)) and torch.equal(dst.get(scale_name(n)), s), n
    if load() is None:
        pytest.skip("no C kernels here (no compiler?): the CPU path imports torch")
    code = ("import sys\nfrom dsv3cli.app import main\nsys.argv = ['dsv3', 'quantize', *sys.argv[1:]]\n"
            "try:\n    main()\nfinally:\n    print('TORCH' if 'torch' in sys.modules else 'NO TORCH', file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k != "DSV3_CPU_KERNEL"}
    for a, b in ((tiny_bf16, tmp_path / "p-fp8"), (tmp_path / "p-fp8", tmp_path / "p-bf16")):  # no F16 here
        p = subprocess.run([sys.executable, "-c", code, str(a), str(b), "--device", "auto"], capture_output=True,
                           text=True, env=env, timeout=300)
        assert p.returncode == 0 and p.stderr.strip().endswith("NO TORCH"), p.stderr


def _killed_halfway(src: Path, dst: Path) -> list[str]:
    """Convert src to FP8 in a process that gets a real SIGKILL mid-shard (its own progress
    callback sends it once half the input is done); returns the shards it finished."""
    code = ("import os, signal, sys\nfrom dsv3cli.convert import convert_checkpoint\n"
            "def progress(done, total):\n    if done >= total // 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            "convert_checkpoint(sys.argv[1], sys.argv[2], device='cpu', progress=progress)\n")
    p = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr
    assert not (dst / INDEX).exists()  # nothing looks complete
    assert list(dst.glob(".*.tmp*"))  # the killed shard's temporary file is still there
    done = sorted(json.loads((dst / convert.MANIFEST_NAME).read_text())["shards"])
    assert 1 <= len(done) < 3  # some shards finished, some not
    return done


def test_resume_after_sigkill_is_byte_identical(tiny_bf16, to_fp8, tmp_path):
    dst = tmp_path / "killed"
    done = _killed_halfway(tiny_bf16, dst)
    damaged = tmp_path / "damaged"
    shutil.copytree(dst, damaged)
    r = _run(tiny_bf16, dst)
    assert r.exit_code == 1 and "--resume" in r.output  # not empty: refuses without --resume
    r = _run(tiny_bf16, dst, "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["shards_skipped"] == len(done)
    assert _files(dst) == _files(to_fp8[0])
    # A finished shard damaged since is not trusted: resume redoes it.
    data = bytearray((damaged / done[0]).read_bytes())
    data[-1] ^= 1
    (damaged / done[0]).write_bytes(bytes(data))
    r = _run(tiny_bf16, damaged, "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["shards_skipped"] == len(done) - 1
    assert _files(damaged) == _files(to_fp8[0])


def test_resume_redoes_a_shard_whose_source_data_changed(tiny_bf16, tmp_path):
    """`cp -p` / `rsync -a` / `touch -r`: same size, header and mtime, other data. Resume checks the
    checksum recorded when the shard was converted, so the result is a conversion of the new data."""
    src = _copy(tiny_bf16, tmp_path / "src", real=[p.name for p in tiny_bf16.glob("*.safetensors")])
    dst = tmp_path / "dst"
    done = _killed_halfway(src, dst)
    shard = src / done[0]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01  # the lowest mantissa bit of the last BF16 value
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = _run(src, dst, "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["shards_skipped"] == len(done) - 1
    assert _run(src, tmp_path / "fresh").exit_code == 0
    assert _files(dst) == _files(tmp_path / "fresh")


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs CUDA")
def test_cuda_gives_the_same_bytes_as_cpu(tiny_bf16, to_fp8, tmp_path):
    """Through the Triton kernels: the same bytes as the CPU path, both directions."""
    assert _run(tiny_bf16, tmp_path / "g8", "--device", "cuda").exit_code == 0
    assert _files(tmp_path / "g8") == _files(to_fp8[0])
    assert _run(to_fp8[0], tmp_path / "gb", "--device", "cuda").exit_code == 0
    assert _run(to_fp8[0], tmp_path / "cb", "--device", "cpu").exit_code == 0
    assert _files(tmp_path / "gb") == _files(tmp_path / "cb")


# ---- bad input ---------------------------------------------------------------------------------


def _copy(src: Path, dst: Path, *, real=()) -> Path:
    """A copy of a checkpoint: symlinks to the shards, real copies of `real` and small files."""
    dst.mkdir()
    for p in src.iterdir():
        if p.suffix == ".safetensors" and p.name not in real:
            (dst / p.name).symlink_to(p)
        else:
            shutil.copyfile(p, dst / p.name)
    return dst


def _index(d):
    return json.loads((d / INDEX).read_text())


def _fail(args, code=1, env=None):
    r = _run(*args, env=env)
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in r.output, r.output
    return lines[0]


def _nothing_complete(dst: Path):
    assert not (dst / INDEX).exists()


def test_bad_shards(tiny_bf16, tmp_path):
    shard = "model-00002-of-00003.safetensors"
    cases = {
        "truncated": lambda p: p.write_bytes(p.read_bytes()[:-100]),
        "corrupt header": lambda p: p.write_bytes(p.read_bytes()[:8] + b"{not json" + p.read_bytes()[17:]),
        "Git LFS": lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123\n"),
        "missing": lambda p: p.unlink(),
    }
    for k, (what, damage) in enumerate(cases.items()):
        src = _copy(tiny_bf16, tmp_path / f"s{k}", real=(shard,))
        damage(src / shard)
        line = _fail([src, tmp_path / f"d{k}"])
        assert shard in line, (what, line)
        _nothing_complete(tmp_path / f"d{k}")


def test_index_names_a_tensor_not_in_its_shard(tiny_bf16, tmp_path):
    src = _copy(tiny_bf16, tmp_path / "s")
    idx = _index(src)
    idx["weight_map"]["model.layers.0.self_attn.ghost.weight"] = "model-00001-of-00003.safetensors"
    (src / INDEX).write_text(json.dumps(idx))
    assert "model.layers.0.self_attn.ghost.weight" in _fail([src, tmp_path / "d"])


def test_fp8_weight_without_scale_and_scale_of_wrong_shape(tiny_fp8, tmp_path):
    ck = Checkpoint(tiny_fp8)
    w = next(n for n in sorted(ck.names()) if ck.dtype(n) == "F8_E4M3")
    src = _copy(tiny_fp8, tmp_path / "s1")
    idx = _index(src)
    del idx["weight_map"][scale_name(w)]
    (src / INDEX).write_text(json.dumps(idx))
    line = _fail([src, tmp_path / "d1"])
    assert w in line and "scale" in line
    shard = ck.weight_map[scale_name(w)]
    src = _copy(tiny_fp8, tmp_path / "s2", real=(shard,))
    t = load_file(src / shard)
    t[scale_name(w)] = torch.ones(t[scale_name(w)].shape[0] + 1, 1)
    save_file(t, src / shard, metadata={"format": "pt"})
    line = _fail([src, tmp_path / "d2"])
    assert scale_name(w) in line and "expected" in line
    _nothing_complete(tmp_path / "d2")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight_is_named(tiny_bf16, tmp_path, bad):
    ck = Checkpoint(tiny_bf16)
    w = "model.layers.1.self_attn.o_proj.weight"
    shard = ck.weight_map[w]
    src = _copy(tiny_bf16, tmp_path / "s", real=(shard,))
    t = load_file(src / shard)
    t[w][3, 5] = bad
    save_file(t, src / shard, metadata={"format": "pt"})
    for fmt in ("e4m3", "ue8m0"):  # ue8m0 once rounded a NaN/Inf scale to 1.0 and went on
        line = _fail([src, tmp_path / fmt, "--scale-fmt", fmt])
        assert w in line and "NaN or Inf" in line
        _nothing_complete(tmp_path / fmt)


def test_dst_problems(tiny_bf16, tmp_path):
    assert "SRC itself" in _fail([tiny_bf16, tiny_bf16], code=2)
    assert "inside SRC" in _fail([tiny_bf16, tiny_bf16 / "sub" / "out"], code=2)
    assert not (tiny_bf16 / "sub").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    assert "not empty" in _fail([tiny_bf16, full])
    assert (full / "keep.txt").read_text() == "x"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _fail([tiny_bf16, blocker / "out"])
    assert "not writable" in line and str(blocker / "out") in line
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "not writable" in _fail([tiny_bf16, ro / "out"])
    assert "--resume and --force" in _fail([tiny_bf16, tmp_path / "x", "--resume", "--force"], code=2)


def test_not_enough_disk(tiny_bf16, tmp_path):
    """A disk with 1000 free bytes (the free-space function is the conversion's parameter)."""
    with pytest.raises(DsvError) as e:
        convert.convert_checkpoint(tiny_bf16, tmp_path / "d", free_space=lambda path: 1000)
    line = str(e.value)
    assert "needs" in line and "free" in line and "1000 bytes" in line and str(tmp_path / "d") in line
    assert not any((tmp_path / "d").iterdir())  # checked before writing anything


def test_free_bytes_of_a_folder_not_made_yet(tmp_path):
    assert convert.free_bytes(tmp_path / "not" / "yet") > 0  # the nearest existing parent's file system


def test_other_architecture(tiny_bf16, tmp_path):
    src = _copy(tiny_bf16, tmp_path / "s")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert "llama" in _fail([src, tmp_path / "d"])


def test_same_format_and_option_misuse(tiny_bf16, tiny_fp8, tmp_path):
    assert "already bf16" in _fail([tiny_bf16, tmp_path / "a", "--to", "bf16"], code=2)
    assert "already fp8" in _fail([tiny_fp8, tmp_path / "b", "--to", "fp8"], code=2)
    assert "--scale-fmt" in _fail([tiny_fp8, tmp_path / "c", "--scale-fmt", "ue8m0"], code=2)
    r = _run(tiny_bf16, tmp_path / "d", "--to", "int4")
    assert r.exit_code == 2


def test_help_has_examples():
    r = runner.invoke(app, ["quantize", "--help"])
    assert r.exit_code == 0 and "Examples" in r.output and "--resume" in r.output


# ---- transformers as an independent loader --------------------------------------------------


def test_transformers_checkpoint_quantized_by_dsv3_loads_back(tmp_path):
    """A checkpoint saved by transformers' DeepseekV3ForCausalLM, quantized to FP8 by dsv3, read
    back by transformers. transformers 5.x loads `quant_method: fp8` through
    FineGrainedFP8HfQuantizer, which needs the accelerate package and, without a GPU, only
    dequantizes to bf16 anyway (`dequantize=True`); accelerate is not a dependency here, so the
    FP8 weights are dequantized with transformers' own `_dequantize_fp8_weight` (its FP8 Linear
    code path) and the result loaded with `from_pretrained`. Measured relative error (L2) of the
    logits against the original model: 6.1e-2, asserted < 0.1 (E4M3 keeps 3 mantissa bits: ~3%
    per weight, compounded over about ten projections in series). Every expert is routed to:
    with top-2 of 8 a few tokens change experts and the error rises to ~0.16, which measures
    routing flips rather than the format."""
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=320, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=4,
        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=256, rope_interleave=True,
    )
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    orig = tmp_path / "orig"
    model.save_pretrained(orig)
    r = _run(orig, tmp_path / "fp8", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["fp8_weights"] > 0
    out = tmp_path / "fp8"
    ck = Checkpoint(out)
    deq = tmp_path / "deq"
    deq.mkdir()
    orig_t = {}
    for f in sorted(orig.glob("*.safetensors")):
        orig_t.update(load_file(f))
    tensors = {}
    for n in ck.names():
        if n.endswith("_scale_inv"):
            continue
        t = ck.get(n)
        if t.dtype == torch.float8_e4m3fn:
            s = ck.get(scale_name(n))
            t = _dequantize_fp8_weight(t, s, [128, 128], torch.float32)
            assert torch.equal(t, fp8.dequantize_weight(ck.get(n), s, torch.float32))  # both read the format alike
            w = orig_t[n].float()
            s_full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
            assert ((t - w).abs() <= torch.maximum(w.abs() * 2.0**-4, s_full * 2.0**-10) * 1.0001).all(), n
        tensors[n] = t.contiguous()
    save_file(tensors, deq / "model.safetensors", metadata={"format": "pt"})
    c = json.loads((out / "config.json").read_text())
    assert c["quantization_config"]["quant_method"] == "fp8"
    del c["quantization_config"]
    (deq / "config.json").write_text(json.dumps(c))
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        a = model(ids).logits
        b = back(ids).logits
    rel = ((a - b).norm() / a.norm()).item()
    print(f"transformers logits relative error after dsv3 FP8: {rel:.3e}")
    assert 0 < rel < 0.1


def test_inconsistent_sources_are_refused_before_writing(tiny_bf16, tmp_path):
    """A tensor the index does not list (it would be dropped), a config.json whose hidden_size
    disagrees with the tensors, an FP8 quantization_config over BF16 tensors: verify's checks run
    first, and DST stays empty."""
    index = json.loads((tiny_bf16 / INDEX).read_text())
    name = "model.layers.1.mlp.gate.weight"
    unlisted = _copy(tiny_bf16, tmp_path / "unlisted")
    del index["weight_map"][name]
    (unlisted / INDEX).write_text(json.dumps(index))
    cfg = json.loads((tiny_bf16 / "config.json").read_text())
    wide = _copy(tiny_bf16, tmp_path / "wide")
    (wide / "config.json").write_text(json.dumps(dict(cfg, hidden_size=cfg["hidden_size"] * 2)))
    says_fp8 = _copy(tiny_bf16, tmp_path / "says_fp8")
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (says_fp8 / "config.json").write_text(json.dumps(dict(cfg, quantization_config=qc)))
    for src, words in ((unlisted, [name, "not in"]), (wide, ["shape", "config.json"]),
                       (says_fp8, ["quantization_config", "F8_E4M3"])):
        dst = tmp_path / f"{src.name}-out"
        line = _fail([src, dst])
        assert all(w in line for w in words), line
        assert not dst.exists() or not any(dst.iterdir()), list(dst.iterdir())


def test_known_buffers_are_carried_and_verified(tiny_bf16, tmp_path):
    """Kimi-K2 stores self_attn.rotary_emb.inv_freq per layer: verify warns, quantize carries it,
    generate loads the model without it."""
    src = _copy(tiny_bf16, tmp_path / "kimi", real=["model-00001-of-00003.safetensors"])
    shard = src / "model-00001-of-00003.safetensors"
    ts = load_file(shard)
    buf = "model.layers.0.self_attn.rotary_emb.inv_freq"
    ts[buf] = torch.arange(4, dtype=torch.float32)
    save_file(ts, shard, metadata={"format": "pt"})
    index = json.loads((src / INDEX).read_text())
    index["weight_map"][buf] = shard.name
    (src / INDEX).write_text(json.dumps(index))
    rep = validate(src)
    assert rep.ok, rep.problems
    assert any("inv_freq" in w for w in rep.warnings)
    assert _run(src, tmp_path / "q").exit_code == 0
    assert Checkpoint(tmp_path / "q").has(buf)
    r = runner.invoke(app, ["generate", str(src), "--prompt-ids", "1,2", "--dtype", "float32", "-n", "2", "--max-seq-len", "16"])
    assert r.exit_code == 0, r.output
