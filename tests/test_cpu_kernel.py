"""The fused C kernels (dsv3_kernels.cpu) bit for bit against the float64 references in
dsv3cli.fp8 and against the torch paths they replace, on fresh random inputs (the seed is in
every failure message), for each variant this CPU can execute; and the build: cache key,
concurrent builds, no compiler, the user's switch. Skipped, with the reason, where the kernels
cannot be built."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3cli import fp8

cpu = pytest.importorskip("dsv3_kernels.cpu", reason="dsv3_kernels is not importable (package not installed)")

E4M3 = torch.float8_e4m3fn
SEED = int.from_bytes(os.urandom(4), "little")
SHAPES = [(300, 200), (128, 576), (1, 7), (257, 130), (0, 5), (5, 0)]
NO_BUILD = "the C kernels could not be built here (no C compiler?); DSV3_DEBUG=1 says why"


@pytest.fixture(scope="module")
def built():
    if cpu.load() is None:
        pytest.skip(NO_BUILD)


@pytest.fixture(params=cpu.supported_variants())
def kern(request, monkeypatch):
    """Each variant's kernels, which dsv3cli.fp8's fast paths then run (their default is the
    best variant)."""
    k = cpu.load(request.param)
    if k is None:
        pytest.skip(NO_BUILD)
    assert k.variant == request.param
    monkeypatch.setattr(fp8, "load_c_kernels", lambda: k)
    return k


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _weight(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes: scales, subnormal codes and saturation all occur.
    mag = torch.exp2(torch.randint(-24, 14, (shape[0], 1), generator=g).float())
    return (torch.randn(shape, generator=g) * mag).to(dtype)


def _torch_path(monkeypatch, fn, *args, **kwargs):
    """fn as the user's switch DSV3_CPU_KERNEL=0 runs it (fp8's default kernels: cpu.default)."""
    with monkeypatch.context() as m:
        m.setattr(fp8, "load_c_kernels", cpu.default)
        m.setenv("DSV3_CPU_KERNEL", "0")
        assert fp8.load_c_kernels() is None
        return fn(*args, **kwargs)


@pytest.mark.parametrize("fmt", ["e4m3", "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_matches_reference_and_torch_path(kern, monkeypatch, dtype, fmt):
    for k, shape in enumerate(SHAPES):
        w = _weight(shape, SEED + k, dtype)
        msg = f"seed {SEED + k}, shape {shape}"
        q, s = fp8.quantize_weight(w, fmt)
        qr, sr = fp8.quantize_weight_ref(w, fmt)
        qt, st = _torch_path(monkeypatch, fp8.quantize_weight, w, fmt)
        assert _same(q, qr) and _same(s, sr), msg
        assert _same(q, qt) and _same(s, st), msg
        out = torch.empty(shape, dtype=E4M3)
        q2, _ = fp8.quantize_weight(w, fmt, out=out)
        assert q2 is out and _same(out, qr), msg
        # activations: 1x128 tiles, leading dimensions kept
        x = w.reshape(1, *shape)
        a, sa = fp8.act_quant(x, fmt)
        ar, sar = fp8.act_quant_ref(x, fmt)
        at, sat = _torch_path(monkeypatch, fp8.act_quant, x, fmt)
        assert _same(a, ar) and _same(sa, sar) and _same(a, at) and _same(sa, sat), msg


def _codes(shape, seed, nan):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 256, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    if not nan:
        c[(c & 0x7F) == 0x7F] = 0x7E
    return c.view(E4M3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_matches_reference_and_torch_path(kern, monkeypatch, dtype):
    for k, shape in enumerate(SHAPES):
        msg = f"seed {SEED + k}, shape {shape}"
        g = torch.Generator().manual_seed(SEED + k)
        nr, nc = -(-shape[0] // 128), -(-shape[1] // 128)
        # every code (subnormals included) and scales from tiny (products that are float32
        # subnormals) through ordinary to huge (>= 2**7, past the one-multiply shortcut)
        s = torch.exp2(torch.randint(-140, 100, (nr, nc), generator=g).float()) * (1 + torch.rand(nr, nc, generator=g))
        q = _codes(shape, SEED + k, nan=False)
        got = fp8.dequantize_weight(q, s, dtype)
        assert _same(got, fp8.dequantize_weight_ref(q, s, dtype)), msg
        assert _same(got, _torch_path(monkeypatch, fp8.dequantize_weight, q, s, dtype)), msg
        out = torch.full(shape, 7.0, dtype=dtype)
        assert fp8.dequantize_weight(q, s, dtype, out=out) is out and _same(out, got), msg
        strided = torch.empty(shape[1], shape[0], dtype=dtype).T  # a non-contiguous out
        assert fp8.dequantize_weight(q, s, dtype, out=strided) is strided and _same(strided.contiguous(), got), msg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_nan_codes_and_odd_scales(kern, dtype):
    q = _codes((500, 500), SEED, nan=True)
    inf, nan = float("inf"), float("nan")
    s = torch.tensor([
        [1e-3, 2.0**7, 3e30, 200.0],
        [inf, nan, -0.5, 0.0],
        [2.0**-149, 1.0, -1e38, 0.25],
        [100.0, 200.0, 256.0, 300.0],  # around 2**8, where s * 2**120 (one multiply) stops being finite
    ])
    got, want = fp8.dequantize_weight(q, s, dtype), fp8.dequantize_weight_ref(q, s, dtype)
    assert torch.equal(got.isnan(), want.isnan()), f"seed {SEED}"
    assert _same(got.nan_to_num(), want.nan_to_num()), f"seed {SEED}"


def test_quantize_nan_and_inf_give_non_finite_scales(kern, monkeypatch):
    for fmt in ("e4m3", "ue8m0"):
        for bad in (float("nan"), float("inf"), -float("inf")):
            w = _weight((260, 300), SEED, torch.bfloat16)
            w[130, 5] = bad  # block (1, 0)
            q, s = fp8.quantize_weight(w, fmt)
            qr, sr = fp8.quantize_weight_ref(w, fmt)
            qt, st = _torch_path(monkeypatch, fp8.quantize_weight, w, fmt)
            assert _same(q, qr) and _same(s, sr) and _same(q, qt) and _same(s, st), (fmt, bad)
            assert not torch.isfinite(s[1, 0]) and torch.isfinite(s).sum() == s.numel() - 1, (fmt, bad)
            assert kern.quantize(w.data_ptr(), q.data_ptr(), s.data_ptr(), 260, 300, workers=2) == 1


def test_large_tensors_on_several_threads(kern, monkeypatch):
    w = _weight((1100, 2100), SEED, torch.bfloat16)  # > 2M elements: split across threads
    w[0:128, 0:128] *= 2.0**40  # scales >= 2**7
    for workers in (None, 3):
        q, s = fp8.quantize_weight(w, workers=workers)
        qt, st = _torch_path(monkeypatch, fp8.quantize_weight, w, workers=workers)
        assert _same(q, qt) and _same(s, st), f"seed {SEED}"
        d = fp8.dequantize_weight(q, s, workers=workers)
        assert _same(d, _torch_path(monkeypatch, fp8.dequantize_weight, q, s, workers=workers)), f"seed {SEED}"
    qr, sr = fp8.quantize_weight_ref(w)
    assert _same(q, qr) and _same(s, sr), f"seed {SEED}"
    assert _same(fp8.dequantize_weight(q, s), fp8.dequantize_weight_ref(q, s)), f"seed {SEED}"
    x = _weight((4096, 640), SEED + 1, torch.float32)  # act_quant's threaded path
    a, sa = fp8.act_quant(x)
    ar, sar = fp8.act_quant_ref(x)
    assert _same(a, ar) and _same(sa, sar), f"seed {SEED + 1}"


def test_cast_matches_torch_on_every_bf16_and_random_float32(kern):
    every_bf16 = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    g = torch.Generator().manual_seed(SEED)
    rand = torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    near = torch.linspace(-500, 500, 100_001)  # ties, carries, saturation and the 464 boundary
    x = torch.cat([every_bf16, rand, near, torch.tensor([464.0, -464.0, 463.99, 480.0, 0.0, -0.0])]).contiguous()
    got = torch.empty(x.numel(), dtype=torch.uint8)
    kern.f32_to_e4m3(x.data_ptr(), got.data_ptr(), x.numel())
    want = x.to(E4M3).view(torch.uint8)
    bad = (got != want).nonzero()[:5, 0]
    assert bad.numel() == 0, f"seed {SEED}: {x[bad].tolist()} -> {got[bad].tolist()}, torch {want[bad].tolist()}"


def test_float_environment_is_set_and_restored(kern):
    """Under flush-to-zero / denormals-are-zero (torch.set_flush_denormal) the kernel still
    computes subnormal products exactly, and leaves the caller's setting as it was."""
    # made before flushing starts (they are subnormal); compared as bits, since reading a
    # subnormal under denormals-are-zero gives 0
    q = torch.tensor([[0x01, 0x08, 0x81, 0x7E]], dtype=torch.uint8).view(E4M3)
    s = torch.tensor([[2.0**-130]])
    want = torch.tensor([[2.0**-139, 2.0**-136, -(2.0**-139), 448 * 2.0**-130]])
    tiny = torch.tensor([2.0**-140])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        got = fp8.dequantize_weight(q, s, torch.float32)  # small: runs on this thread
        still_flushing = tiny.mul(1.0)
    finally:
        torch.set_flush_denormal(False)
    assert _same(got, want)
    assert _bits(still_flushing).item() == 0  # the caller's mode was back after the call


# ---------------------------------------------------------------- the build


_LOAD = "import dsv3_kernels.cpu as c; k = c.load(); print(k.path if k else 'NONE')"


def _env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DSV3_CPU_KERNEL", "DSV3_DEBUG", "CC")}
    # the child imports dsv3_kernels the way this process did
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "DSV3_CACHE": str(tmp / "cache"), **extra}


def test_concurrent_builds_and_cache_key(built, tmp_path, monkeypatch):
    """Three processes building the best variant at once: one whole library, named for its
    variant and hash, no temporaries left; a damaged one is rebuilt."""
    env = _env(tmp_path, DSV3_DEBUG="1")
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=tmp_path) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1 and "NONE" not in paths, outs
    built = Path(paths.pop())
    assert built.parent == tmp_path / "cache" / "kernels" and built.is_file()
    assert re.fullmatch(rf"cpu-{cpu.supported_variants()[-1]}-[0-9a-f]{{20}}\.so", built.name), built.name
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporaries left behind
    built.write_bytes(b"not a library")  # damaged: rebuilt, not given up on
    p = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.stdout.strip() == str(built) and "rebuilding" in p.stderr and built.read_bytes() != b"not a library", p.stderr
    # the name changes with the source, the variant and the compiler command, not with the
    # CPU it is built on (each variant has fixed flags)
    plain = cpu.library_path({"a.c": b"int x;"}, "generic")
    assert plain.name.startswith("cpu-generic-")
    assert plain != cpu.library_path({"a.c": b"int y;"}, "generic")
    assert cpu.library_path({"a.c": b"int x;"}, "avx2").name.startswith("cpu-avx2-")
    assert cpu.library_path({"a.c": b"int x;"}, "avx2").name[-23:] != plain.name[-23:]
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert cpu.library_path({"a.c": b"int x;"}, "generic") == plain
    monkeypatch.setenv("CC", "cc -DSOMETHING")
    assert cpu.library_path({"a.c": b"int x;"}, "generic") != plain


def test_no_compiler_or_switched_off_means_torch_path(tmp_path, monkeypatch):
    missing = str(tmp_path / "no-such-cc")
    p = subprocess.run([sys.executable, "-c", _LOAD], env=_env(tmp_path, CC=missing, DSV3_DEBUG="1"),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.stdout.strip() == "NONE" and "no-such-cc" in p.stderr, (p.stdout, p.stderr)
    p = subprocess.run([sys.executable, "-c", _LOAD], env=_env(tmp_path, CC=missing),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.stdout.strip() == "NONE" and p.stderr == "", p.stderr  # quiet unless asked
    # the user's switch: read by cpu.enabled() and cpu.default() (fp8's kernels), not by load()
    monkeypatch.delenv("DSV3_CPU_KERNEL", raising=False)
    best = cpu.load()
    assert fp8.load_c_kernels is cpu.default and cpu.enabled() and cpu.default() is best
    monkeypatch.setenv("DSV3_CPU_KERNEL", "0")
    assert not cpu.enabled() and cpu.default() is None and fp8.load_c_kernels() is None
    fresh = cpu.load.__wrapped__()  # not the cached result: load() itself ignores the switch
    assert (fresh is None) == (best is None) and (best is None or fresh.variant == best.variant)
    w = _weight((130, 140), SEED, torch.bfloat16)
    q, s = fp8.quantize_weight(w)  # the torch path still gives the format
    qr, sr = fp8.quantize_weight_ref(w)
    assert _same(q, qr) and _same(s, sr)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_every_code_bit_exact(kern, dtype):
    """All 256 codes (subnormals, both zeros, NaN codes) in every column of a block, under
    scales from float32-subnormal products through ordinary to overflowing, Inf and NaN."""
    q = ((torch.arange(256)[:, None] + torch.arange(256)[None, :]) % 256).to(torch.uint8).view(E4M3)
    inf, nan = float("inf"), float("nan")
    for scales in (torch.tensor([[2.0**-140, 1.0], [3e-3, 2.0**100]]), torch.tensor([[-1.5, inf], [nan, 1e38]])):
        got, want = fp8.dequantize_weight(q, scales, dtype), fp8.dequantize_weight_ref(q, scales, dtype)
        assert torch.equal(got.isnan(), want.isnan()), scales
        assert _same(got.nan_to_num(), want.nan_to_num()), scales
