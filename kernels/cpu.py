"""Builds, loads and runs the C kernels for the CPU: `cpu_fp8.c` (FP8 dequantize / quantize),
`cpu_gemm.c` (the products) and `cpu_ops.c` (the model operations built on them: attention,
router, experts, RMSNorm, the MTP entry), with `cpu_vec.h` shared.

Boundary: compiling, caching and loading the shared library, and running its functions over
whole tensors given as raw addresses, rows split across threads (`run_split`, on a pool kept
for the process). No torch and no numpy here, so the checkpoint conversion can use the
kernels without importing either. `load()` returns a `CpuKernels`, or None when there is no C
compiler or the build fails (the reason is printed only under DSV3_DEBUG=1); callers then use
their torch path. Whether to use the kernels at all is the caller's choice (`dsv3cli.ops.Runtime`;
`enabled()` reads the user's DSV3_CPU_KERNEL=0 switch once for the commands). `dsv3cli.fp8` owns the
format, its references and the shape checks; `dsv3cli.ops` calls the model's kernels on tensors.

Variants: the sources are built once per instruction set (`VARIANTS`: generic, avx2, avx512,
avx512bf16), each with fixed compiler flags rather than -march=native, so a build is the same
for every CPU of its kind and a machine can run (and test) every variant its CPU can execute.
`load()` picks the best one the CPU's flags allow; `load(variant)` a given one. Each is
compiled with `$CC` (default `cc`) into `$DSV3_CACHE/kernels` (default `~/.cache/dsv3/kernels`)
under a name that carries a hash of the sources, the compiler command and the flags. Two
processes may build at once: each compiles under its own temporary name and renames the result
into place (atomic), so a reader sees either no library or a whole one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Callable

SOURCES = ("cpu_vec.h", "cpu_fp8.c", "cpu_gemm.c", "cpu_ops.c")
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-Wno-psabi")
# name: (compiler flags, /proc/cpuinfo flags the CPU needs), worst to best; x86-64 only but
# "generic", which is the plain build elsewhere. avx512bf16 is the top: its AMX prefill product
# (cpu_gemm.c) is compiled for the tiles by a function attribute and runs only where
# dsv3_amx_init says the CPU and the kernel give this process the tiles.
_V4 = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
VARIANTS = {
    "generic": ((), ()),
    "avx2": (("-march=x86-64-v3",), ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe")),
    "avx512": (("-march=x86-64-v4",), ("avx2", "fma", "f16c", "bmi2", *_V4)),
    "avx512bf16": (("-march=x86-64-v4", "-mavx512bf16"), ("avx2", "fma", "f16c", "bmi2", *_V4, "avx512_bf16")),
}
ABI = 7  # must equal dsv3_cpu_abi() in cpu_fp8.c
# Elements per job: large enough that the per-call cost (a few microseconds) is noise, small
# enough that threads pulling jobs end together.
CHUNK = 1 << 20
PARALLEL_MIN = 1 << 21  # below this many elements one thread beats starting a pool

_p, _i64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {  # name: (restype, argtypes)
    # q, s, out, cols, r0, r1
    "dsv3_dequant_bf16": (None, (_p, _p, _p, _i64, _i64, _i64)),
    "dsv3_dequant_f32": (None, (_p, _p, _p, _i64, _i64, _i64)),
    # w, q, s, rows, cols, br, ue8m0, r0, r1 -> how many non-finite scales
    "dsv3_quant_bf16": (_i64, (_p, _p, _p, _i64, _i64, _i64, ctypes.c_int, _i64, _i64)),
    "dsv3_quant_f32": (_i64, (_p, _p, _p, _i64, _i64, _i64, ctypes.c_int, _i64, _i64)),
    # x, q, n
    "dsv3_f32_to_e4m3": (None, (_p, _p, _i64)),
    # bf16, nn, x, w, y, B, H, M, N, K, sxb, sxh, sxm, swb, swh, sw, syb, syh, sym -> 0, or -1 without memory
    "dsv3_gemm": (_i64, (ctypes.c_int, ctypes.c_int, _p, _p, _p) + (_i64,) * 14),
    # bf16, x, idx, wt, w13, w2, y, N, K, D, I, lo, hi, sg, su, sd, Is, out_f32, prefill -> 0, or -1 without memory
    "dsv3_moe": (_i64, (ctypes.c_int, _p, _p, _p, _p, _p, _p) + (_i64,) * 6 + (_p, _p, _p, _i64, ctypes.c_int, ctypes.c_int)),
    # bf16, x, idx, wt, ptr, sp, y, N, K, D, I, lo, hi, Is, out_f32, prefill -> 0, or -1 without memory
    "dsv3_moe_fp8": (_i64, (ctypes.c_int, _p, _p, _p, _p, _p, _p) + (_i64,) * 7 + (ctypes.c_int, ctypes.c_int)),
    # parts, P, n, y, bf16
    "dsv3_sum_f32": (None, (_p, _i64, _i64, _p, ctypes.c_int)),
    # bf16, x, wg, bias, N, D, E, G, TG, K, norm, scale, idx, wt -> 0, or -1 without memory
    "dsv3_route": (_i64, (ctypes.c_int, _p, _p, _p) + (_i64,) * 6 + (ctypes.c_int, ctypes.c_float, _p, _p)),
    # bf16, q, kva, normw, eps, cos, ssin, pos, cache, maxS, wkv, scale, out, B, T, H, nope, R, C, vdim, mode -> 0 / -1
    "dsv3_mla": (_i64, (ctypes.c_int, _p, _p, _p, ctypes.c_float, _p, _p, _p, _p, _i64, _p, ctypes.c_float, _p) + (_i64,) * 8),
    # bf16, x, ldx, w, y, rows, D, eps
    "dsv3_rmsnorm": (None, (ctypes.c_int, _p, _i64, _p, _p, _i64, _i64, ctypes.c_float)),
    # tok, embed, V, h, enw, eeps, hnw, heps, w, y, rows, D -> 0, -1 without memory, -2 for a bad id
    "dsv3_mtp_entry": (_i64, (_p, _p, _i64, _p, _p, ctypes.c_float, _p, ctypes.c_float, _p, _p, _i64, _i64)),
    # bf16, x, ldx, q, s, y, ldy, M, K, n0, n1 -> 0, or -1 without memory
    "dsv3_fp8_gemm": (_i64, (ctypes.c_int, _p, _i64, _p, _p, _p, _i64) + (_i64,) * 4),
    # bf16, wtype (0 float32, 1 bfloat16, 2 FP8), x, ldx, w, ldw, s, y, ldy, M, K, n0, n1 -> 0, or -1 without memory
    "dsv3_gemm_prefill": (_i64, (ctypes.c_int, ctypes.c_int, _p, _i64, _p, _i64, _p, _p) + (_i64,) * 5),
    # bf16, x, ldx, q, s, y, ldy, M, K, n0, n1 -> 0, -1 without memory, -2 without AMX
    "dsv3_fp8_gemm_amx": (_i64, (ctypes.c_int, _p, _i64, _p, _p, _p, _i64) + (_i64,) * 4),
    "dsv3_amx_init": (ctypes.c_int, ()),
    # x, y, n (float32): the vectorised e^x the softmax, SwiGLU and router use, for its tests
    "dsv3_exp": (None, (_p, _p, _i64)),
    # -> 1 when built for bfloat16 dot products in hardware (AVX512-BF16)
    "dsv3_native_bf16": (ctypes.c_int, ()),
}


def _debug(msg: str) -> None:
    if os.environ.get("DSV3_DEBUG") == "1":
        print(f"dsv3_kernels.cpu: {msg}", file=sys.stderr)


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads(n: int, workers: int | None) -> int:
    """Threads for a tensor of n elements: `workers` (default: every core), one when small."""
    if n < PARALLEL_MIN:
        return 1
    return default_workers() if workers is None else max(1, workers)


@functools.lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    """`threads` threads kept for the life of the process: a model forward splits a few dozen
    products, and starting threads for each would cost more than some of them."""
    return ThreadPoolExecutor(threads, thread_name_prefix="dsv3-cpu")


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads
    os.register_at_fork(after_in_child=_pool.cache_clear)


def _run(njobs: int, call: Callable[[int, int], int | None], workers: int) -> int:
    """`call(j0, j1)` over the jobs [0, njobs), summing what it returns. Threads pull one job at
    a time (ctypes releases the GIL during each call), so a thread whose core another process
    took does less of the work instead of holding everyone up, as a fixed split would."""
    if njobs == 0:
        return 0
    workers = max(1, min(workers, njobs))
    if workers == 1:
        return call(0, njobs) or 0
    counter = itertools.count()  # next() on it is atomic under the GIL

    def loop() -> int:
        total = 0
        while (j := next(counter)) < njobs:
            total += call(j, j + 1) or 0
        return total

    futures = [_pool(workers - 1).submit(loop) for _ in range(workers - 1)]
    total = loop()  # this thread works too
    return total + sum(f.result() for f in futures)


def run_split(n: int, call: Callable[[int, int], int | None], workers: int, align: int = 1, per_worker: int = 4) -> int:
    """`call(lo, hi)` over [0, n) cut into ranges (each a multiple of `align` long but the
    last), `per_worker` per worker, on `workers` threads; returns the sum of what the calls
    return."""
    per = max(align, -(-n // (per_worker * max(workers, 1)) // align * align) if workers > 1 else n)
    return _run(-(-n // per), lambda j0, j1: call(j0 * per, min(n, j1 * per)), workers)


class CpuKernels:
    """The loaded kernels. Each method runs over a whole row-major tensor given by the
    addresses of its buffers (which must stay alive and unmoved during the call), on
    `workers` threads (default: every core; one for a small tensor)."""

    def __init__(self, lib: ctypes.CDLL, path: Path, variant: str):
        self.lib, self.path, self.variant = lib, path, variant
        # With bfloat16 dot products in hardware, torch's oneDNN products are fast too, and
        # beat ours above a few rows; without, torch's bfloat16 products run at a fraction of
        # its float32 speed (measured on Zen 3: 4.6 vs 33 G multiply-adds/s) and ours win at
        # every size.
        self.native_bf16 = bool(lib.dsv3_native_bf16())
        # cpu_gemm.c's packed prefill products beat the row kernels from ~16 rows on AVX2 (Zen 3:
        # 37-40 against 21-25 G multiply-adds/s at 128 rows); other builds pack their panels with
        # scalar code and are unmeasured, so they keep the row kernels (the tests still run both).
        self.packed_prefill = variant == "avx2"
        # AMX tiles, which torch's oneDNN products use for bfloat16 (dsv3cli.ops.AMX_ROWS) and this
        # build's FP8 prefill products (dsv3_fp8_gemm_amx) where it has them
        self.amx = {"amx_tile", "amx_bf16"} <= _cpu_flags()
        self.amx_fp8 = self.amx and bool(lib.dsv3_amx_init())

    def dequantize(self, q: int, s: int, out: int, rows: int, cols: int, *, out_f32: bool = False,
                   workers: int | None = None) -> None:
        """q uint8 [rows, cols] (E4M3 codes), s float32 [ceil(rows/128), ceil(cols/128)] ->
        out bfloat16 (or float32) [rows, cols]: round(float32(q) * s)."""
        fn = self.lib.dsv3_dequant_f32 if out_f32 else self.lib.dsv3_dequant_bf16
        per = max(1, CHUNK // max(cols, 1))  # rows per job
        _run(-(-rows // per), lambda j0, j1: fn(q, s, out, cols, j0 * per, min(rows, j1 * per)), threads(rows * cols, workers))

    def quantize(self, w: int, q: int, s: int, rows: int, cols: int, *, br: int = 128, in_f32: bool = False,
                 ue8m0: bool = False, workers: int | None = None) -> int:
        """w bfloat16 (or float32) [rows, cols] -> q uint8 (E4M3 codes) [rows, cols] and s float32
        [ceil(rows/br), ceil(cols/128)], blocks of br rows (128: weights, 1: activations) x 128
        columns. Returns how many scales are NaN or Inf (the block held a NaN or Inf)."""
        fn = self.lib.dsv3_quant_f32 if in_f32 else self.lib.dsv3_quant_bf16
        per = br * max(1, CHUNK // max(br * cols, 1))  # rows per job: whole blocks
        return _run(-(-rows // per), lambda j0, j1: fn(w, q, s, rows, cols, br, int(ue8m0), j0 * per, min(rows, j1 * per)),
                    threads(rows * cols, workers))

    def f32_to_e4m3(self, x: int, q: int, n: int) -> None:
        """The float32 -> E4M3 cast alone (nearest even, saturating, NaN kept), n elements."""
        self.lib.dsv3_f32_to_e4m3(x, q, n)


def cache_dir() -> Path:
    root = os.environ.get("DSV3_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dsv3") / "kernels"


def _cpu_flags() -> set[str]:
    """The CPU's feature flags, from /proc/cpuinfo's first processor (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features", "isa"):  # x86, ARM, RISC-V
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_variants() -> list[str]:
    """The variants this CPU can execute, worst to best ("generic" always)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["generic"]
    flags = _cpu_flags()
    return [name for name, (_, need) in VARIANTS.items() if set(need) <= flags]


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def _flags(variant: str) -> list[str]:
    return [*FLAGS, *VARIANTS[variant][0]]


def library_path(sources: dict[str, bytes], variant: str) -> Path:
    key = "\0".join([" ".join(_compiler()), " ".join(_flags(variant)), platform.machine()])
    h = hashlib.sha256()
    for name, text in sources.items():
        h.update(name.encode() + b"\0" + text + b"\0")
    h.update(key.encode())
    return cache_dir() / f"cpu-{variant}-{h.hexdigest()[:20]}.so"


def _build(sources: dict[str, bytes], target: Path, variant: str) -> None:
    """Compile `sources` to `target` through temporary names in the same folder, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        for name, text in sources.items():
            (Path(tmp) / name).write_bytes(text)
        out = Path(tmp) / target.name
        cmd = [*_compiler(), *_flags(variant), *(str(Path(tmp) / n) for n in sources if n.endswith(".c")), "-o", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        os.replace(out, target)


def _open(path: Path, variant: str) -> CpuKernels:
    lib = ctypes.CDLL(str(path))  # CDLL (not PyDLL) releases the GIL during each call
    lib.dsv3_cpu_abi.restype = ctypes.c_int
    if lib.dsv3_cpu_abi() != ABI:
        raise RuntimeError(f"{path}: ABI {lib.dsv3_cpu_abi()}, expected {ABI}")
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return CpuKernels(lib, path, variant)


@functools.lru_cache(maxsize=None)
def load(variant: str | None = None) -> CpuKernels | None:
    """The kernels built for `variant` (default: the best this CPU can execute), built on first
    use; None when there is no C compiler or the build fails. A variant the CPU cannot execute
    is a ValueError: loading it would crash the process on its first instruction."""
    supported = supported_variants()
    variant = variant or supported[-1]
    if variant not in supported:
        raise ValueError(f"kernel variant {variant!r}: this CPU runs {', '.join(supported)}")
    try:
        sources = {name: resources.files("dsv3_kernels").joinpath(name).read_bytes() for name in SOURCES}
        path = library_path(sources, variant)
        if path.is_file():
            try:
                kern = _open(path, variant)
                _debug(f"C kernels: variant {variant} ({path})")
                return kern
            except OSError as exc:  # damaged by something else: build it again
                _debug(f"{path}: cannot be loaded ({exc}); rebuilding")
        _build(sources, path, variant)
        _debug(f"C kernels: variant {variant} ({path})")
        return _open(path, variant)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
        _debug(f"C kernels unavailable, using the torch path: {exc}")
        return None


def enabled() -> bool:
    """The user's switch: DSV3_CPU_KERNEL=0 turns the C kernels off (read by the commands once,
    when they build their Runtime, and by the checkpoint conversion)."""
    return os.environ.get("DSV3_CPU_KERNEL", "1") != "0"


def default() -> CpuKernels | None:
    """The best kernels unless the user switched them off: for code that runs outside a model
    Runtime (the checkpoint conversion, the FP8 functions' defaults)."""
    return load() if enabled() else None
