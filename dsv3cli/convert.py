"""Whole-checkpoint conversion between BF16 and FP8, the core of `dsv3 quantize`: streaming,
shard by shard and one tensor at a time, resumable, never a partial file at a final path.

Boundary: files and bytes. The format (scales, rounding, codes) is `dsv3cli.fp8`'s. On the CPU
the tensors go through the fused C kernels of `dsv3_kernels.cpu` on plain byte buffers, so a
conversion does not import torch (about 1.5 s of start-up, as long as a small checkpoint takes
to convert). Torch is imported only where it is needed: on CUDA (Triton kernels), for F16
weights, and when the C kernels cannot be had (no compiler, DSV3_CPU_KERNEL=0), where the
torch functions of `dsv3cli.fp8` do the work. Checkpoints are read and written through
`dsv3cli.checkpoint`.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from dsv3_kernels.cpu import default as load_c_kernels  # None when off (DSV3_CPU_KERNEL=0) or unbuildable

from .checkpoint import free_bytes, human, not_a_folder
from .fp8_format import BLOCK, F8, SCALE_FMTS, SCALE_SUFFIX, cdiv


def _resolve_device(device: str) -> str:
    """--device auto|cpu|cuda -> the device. `auto` on a Linux machine without a GPU driver is
    the CPU without asking torch (whose import alone costs seconds)."""
    if device == "cpu":
        return device
    if device == "auto" and sys.platform == "linux" and not any(
        Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd")
    ):
        return "cpu"
    from .parallel import resolve_device

    return resolve_device(device)


MANIFEST_NAME = ".dsv3-quantize.json"  # progress of an unfinished conversion; removed at the end
_MANIFEST_VERSION = 2
_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, F8: 1}  # the dtypes this module computes with
_SHARD_METADATA = {"format": "pt"}


class _Entry:
    """One output tensor: where it comes from and what it becomes."""

    __slots__ = ("name", "src", "kind", "dtype", "shape", "nbytes", "in_bytes")

    def __init__(self, name, src, kind, dtype, shape, in_bytes):
        self.name, self.src, self.kind, self.dtype, self.shape = name, src, kind, dtype, tuple(shape)
        self.nbytes = math.prod(self.shape) * _ITEMSIZE.get(dtype, 0)
        self.in_bytes = in_bytes


def _shard_header(entries: list[_Entry]) -> bytes:
    """safetensors header for `entries` in order: compact JSON, padded with spaces so the data
    starts 8-byte aligned, as safetensors writes it."""
    import json
    import struct

    head: dict = {"__metadata__": _SHARD_METADATA}
    pos = 0
    for e in entries:
        head[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _plan(ckpt, to: str, scale_fmt: str):
    """Check the whole input (headers, index, scales) and lay out every output shard:
    {shard: [entries sorted by name]}. Raises DsvError before anything is written."""
    from .checkpoint import is_fp8_weight, scale_name
    from .errors import DsvError

    plan: dict[str, list[_Entry]] = {s: [] for s in ckpt.shards}
    for name in sorted(ckpt.names()):
        info = ckpt.info(name)  # reads the shard's header: missing / truncated / LFS / corrupt / absent tensor
        shard = ckpt.weight_map[name]
        if name.endswith(SCALE_SUFFIX):
            continue  # handled with its weight
        if info.dtype == F8:
            sname = scale_name(name)
            if not ckpt.has(sname):
                raise DsvError(f"{shard}: FP8 weight {name} has no {sname}; the checkpoint is incomplete, download it again")
            want = (cdiv(info.shape[0], BLOCK), cdiv(info.shape[1], BLOCK)) if len(info.shape) == 2 else None
            sinfo = ckpt.info(sname)
            if want is None or tuple(sinfo.shape) != want or sinfo.dtype != "F32":
                raise DsvError(
                    f"{ckpt.weight_map[sname]}: {sname} is {sinfo.dtype}{list(sinfo.shape)}, expected F32{list(want or ())} "
                    f"for {name} {list(info.shape)}; the checkpoint is corrupt"
                )
            if to == "fp8":
                raise DsvError(f"{shard}: {name} is already FP8; the source mixes formats, convert it to bf16 first")
            plan[shard].append(_Entry(name, name, "dequant", "BF16", info.shape, info.nbytes + sinfo.nbytes))
        elif to == "fp8" and is_fp8_weight(name):
            if info.dtype not in ("BF16", "F16", "F32") or len(info.shape) != 2:
                raise DsvError(f"{shard}: {name} is {info.dtype}{list(info.shape)}; expected a 2-D BF16/F16/F32 weight to quantize")
            plan[shard].append(_Entry(name, name, "quant", F8, info.shape, info.nbytes))
            plan[shard].append(_Entry(scale_name(name), name, "scale", "F32", (cdiv(info.shape[0], BLOCK), cdiv(info.shape[1], BLOCK)), 0))
        else:
            if info.dtype not in _ITEMSIZE and info.dtype not in ("I64", "I32", "I8", "U8", "BOOL", "F64", "I16"):
                raise DsvError(f"{shard}: {name} has dtype {info.dtype}, which dsv3 quantize does not handle")
            e = _Entry(name, name, "copy", info.dtype, info.shape, info.nbytes)
            e.nbytes = info.nbytes
            plan[shard].append(e)
    for name in ckpt.names():  # a scale whose weight is not FP8 (or missing) would be dropped silently
        if name.endswith(SCALE_SUFFIX):
            w = name[: -len(SCALE_SUFFIX)]
            if not ckpt.has(w):
                raise DsvError(f"{ckpt.weight_map[name]}: {name} has no weight {w}; the checkpoint is corrupt")
            if to == "fp8" and ckpt.info(w).dtype != F8:
                raise DsvError(f"{ckpt.weight_map[name]}: {name} belongs to a {ckpt.info(w).dtype} weight; the checkpoint mixes formats")
    for entries in plan.values():
        entries.sort(key=lambda e: e.name)
    return plan


def _source_format(ckpt) -> str:
    if ckpt.config.is_fp8 or any(n.endswith(SCALE_SUFFIX) for n in ckpt.names()):
        return "fp8"
    return "bf16"


def _fingerprint(path) -> dict:
    """A cheap first check of an input shard for --resume: size, mtime and a hash of its header
    (`cp -p`, `rsync -a` and `touch -r` keep all three while changing the data: the CRC32 of each
    source shard, recorded in the manifest as `in_crc32`, decides)."""
    import hashlib
    import struct

    st = path.stat()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = f.read(min(n, 1 << 26))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": hashlib.sha256(head).hexdigest()}


def _crc32_file(path) -> str:
    import zlib

    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _describe(job) -> str:
    """A conversion's settings for people: 'SRC to fp8 (e4m3 scales)'."""
    if not isinstance(job, dict):
        return "unreadable record"
    fmt = f" ({job['scale_fmt']} scales)" if job.get("scale_fmt") else ""
    return f"{job.get('src', '?')} to {job.get('to', '?')}{fmt}"


def _sources(ckpt, shard: str, entries: list[_Entry]) -> list[str]:
    """The input shards an output shard is made from: its own, and those holding the scales of
    its FP8 weights."""
    from .checkpoint import scale_name

    return sorted({shard} | {ckpt.shard_of(scale_name(e.src)) for e in entries if e.kind == "dequant"})


class _Source:
    """Reads one input shard's tensors straight into a reusable buffer (plain reads, no mmap:
    the page cache is not charged to this process and no fresh pages fault in per tensor)."""

    def __init__(self, ckpt, shard: str):
        import struct

        self.ckpt, self.shard = ckpt, shard
        self.f = open(ckpt.path / shard, "rb", buffering=0)
        (n,) = struct.unpack("<Q", self.f.read(8))
        self.base = 8 + n
        self.header = ckpt.header(shard)

    def read(self, name: str, buf: bytearray) -> int:
        """Read the tensor `name` of this shard into buf[:n]; returns n."""
        from .errors import DsvError

        info = self.header[name]
        n = info.end - info.start
        view = memoryview(buf)[:n]
        self.f.seek(self.base + info.start)
        got = 0
        while got < n:  # one read returns at most 2 GB on Linux
            k = self.f.readinto(view[got:])
            if not k:
                break
            got += k
        if got != n:
            raise DsvError(f"{self.shard}: truncated while reading {name}; download it again")
        return n

    def dtype(self, name: str) -> str:
        return self.header[name].dtype

    def close(self) -> None:
        self.f.close()


def _addr(buf: bytearray) -> int:
    """The address of buf[0], for the C kernels (buf must not be resized while in use)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _tensor(buf: bytearray, dtype: str, shape):
    """buf's first bytes as a torch tensor (sharing the memory): the torch paths' view."""
    import torch

    dt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, F8: torch.float8_e4m3fn}[dtype]
    n = math.prod(shape) * _ITEMSIZE[dtype]
    return torch.frombuffer(buf, dtype=torch.uint8, count=n).view(dt).view(shape) if n else torch.empty(shape, dtype=dt)


def _quant_torch(w, out, device: str, scale_fmt: str, workers: int | None) -> tuple[bytes, bool]:
    """Quantize tensor `w` into `out` with torch (CUDA: Triton): (scale bytes, all finite)."""
    import torch

    if device == "cuda":
        from dsv3_kernels.fp8 import weight_quant

        wc = w.cuda()
        q, s = weight_quant(wc, scale_fmt)
        out.copy_(q)
        # Triton's max may skip NaN (maxnum), so the scale alone does not reveal one here.
        s = s.cpu() if bool(torch.isfinite(wc).all()) else torch.full_like(s.cpu(), math.nan)
    else:
        from .fp8 import quantize_weight

        _, s = quantize_weight(w, scale_fmt, workers=workers, out=out)
    return s.contiguous().numpy().tobytes(), bool(torch.isfinite(s).all())


def _dequant_torch(q, s, out, device: str, workers: int | None) -> None:
    import torch

    if device == "cuda":
        from dsv3_kernels.fp8 import weight_dequant

        out.copy_(weight_dequant(q.cuda(), s.cuda(), torch.bfloat16))
    else:
        from .fp8 import dequantize_weight

        dequantize_weight(q, s, torch.bfloat16, out=out, workers=workers)


def _read_scale(ckpt, src: _Source, name: str) -> bytearray:
    """The bytes of the scale tensor `name`, from `src` or from the other shard holding it."""
    shard = ckpt.shard_of(name)  # through the index: a scale may sit in another shard
    ckpt.info(name)  # a good message when the shard lacks it
    buf = bytearray(max(ckpt.header(shard)[name].nbytes, 1))
    if shard == src.shard:
        src.read(name, buf)
    else:
        other = _Source(ckpt, shard)
        try:
            other.read(name, buf)
        finally:
            other.close()
    return buf


def _produce(ckpt, src: _Source, e: _Entry, buf: bytearray, in_buf: bytearray, device: str, kern,
             scale_fmt: str, workers: int | None, pending: dict) -> int:
    """Write entry `e`'s output bytes into `buf`; returns how many. Quantizing a weight leaves
    its scale's bytes in `pending` for the entry that follows it. `kern`: the C kernels, or
    None for the torch paths."""
    from .errors import DsvError

    if e.kind == "copy":
        return src.read(e.name, buf)
    if e.kind == "scale":
        s = pending.pop(e.name)
        memoryview(buf)[: len(s)] = s
        return e.nbytes
    src.read(e.src, in_buf)
    in_dtype = src.dtype(e.src)
    rows, cols = e.shape
    if e.kind == "quant":
        if kern is not None and in_dtype in ("BF16", "F32"):
            s_buf = bytearray(max(cdiv(rows, BLOCK) * cdiv(cols, BLOCK) * 4, 1))
            bad = kern.quantize(_addr(in_buf), _addr(buf), _addr(s_buf), rows, cols, in_f32=in_dtype == "F32",
                                ue8m0=scale_fmt == "ue8m0", workers=workers)
            s, finite = bytes(s_buf[: cdiv(rows, BLOCK) * cdiv(cols, BLOCK) * 4]), bad == 0
        else:
            w = _tensor(in_buf, in_dtype, e.shape)
            s, finite = _quant_torch(w, _tensor(buf, e.dtype, e.shape), device, scale_fmt, workers)
        if not finite:  # NaN/Inf anywhere in a block makes its scale non-finite
            raise DsvError(f"{src.shard}: {e.src} contains NaN or Inf; fix the source weights before quantizing")
        pending[e.name + SCALE_SUFFIX] = s
        return e.nbytes
    s_buf = _read_scale(ckpt, src, e.src + SCALE_SUFFIX)
    if kern is not None:
        kern.dequantize(_addr(in_buf), _addr(s_buf), _addr(buf), rows, cols, workers=workers)
    else:
        s = _tensor(s_buf, "F32", (cdiv(rows, BLOCK), cdiv(cols, BLOCK)))
        _dequant_torch(_tensor(in_buf, F8, e.shape), s, _tensor(buf, e.dtype, e.shape), device, workers)
    return e.nbytes


_SYNC_EVERY = 1 << 26  # flush written data every 64 MB, in the writer thread, so the final fsync is short


def _write_shard(path, header: bytes, entries, produce, on_bytes, bufs: list) -> str:
    """Stream one shard to `path` (atomically): header, then each tensor as it is produced
    into one of `bufs` (reused). A writer thread writes and flushes while the next tensor is
    computed and checksummed. Returns the file's CRC-32 (hex): it catches a shard damaged
    after it was finished, at a third of sha256's cost on the critical path."""
    import queue
    import zlib
    import threading

    from .checkpoint import atomic_output

    free: queue.Queue = queue.Queue()
    for b in bufs:
        free.put(b)
    work: queue.Queue = queue.Queue()
    crc = zlib.crc32(header)
    failure: list[BaseException] = []

    with atomic_output(path) as tmp:
        with open(tmp, "wb", buffering=0) as f:
            f.write(header)

            def writer() -> None:
                unsynced = 0
                try:
                    while (item := work.get()) is not None:
                        buf, n = item
                        mv = memoryview(buf)[:n]
                        while mv:
                            k = f.write(mv)
                            mv = mv[k:]
                        free.put(buf)
                        unsynced += n
                        if unsynced >= _SYNC_EVERY:
                            os.fdatasync(f.fileno())
                            unsynced = 0
                except BaseException as exc:  # noqa: BLE001 - handed to the producer below
                    failure.append(exc)
                    free.put(item[0] if item else bufs[0])
                    while (item := work.get()) is not None:  # keep the producer from blocking
                        free.put(item[0])

            t = threading.Thread(target=writer, daemon=True)
            t.start()
            try:
                for e in entries:
                    if failure:
                        break
                    buf = free.get()
                    try:
                        n = produce(e, buf)
                    except BaseException:
                        free.put(buf)
                        raise
                    # Hash here, not in the writer: the writer waits on the disk, this thread's
                    # hashing (GIL released) overlaps with that wait.
                    crc = zlib.crc32(memoryview(buf)[:n], crc)
                    work.put((buf, n))
                    on_bytes(e.in_bytes)
            finally:
                work.put(None)
                t.join()
            if failure:
                raise failure[0]
    return f"{crc:08x}"


def convert_checkpoint(
    src,
    dst,
    *,
    to: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    scale_fmt: str | None = None,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    free_space: Callable[[Path], int] = free_bytes,
) -> dict:
    """Convert the checkpoint folder `src` (BF16/F32 or FP8) to `dst` in the other format
    (`to` = "fp8" or "bf16"), shard by shard, one tensor at a time.

    The output keeps the shard names, carries the hub's set of FP8 weights with their
    `weight_scale_inv` in the same shard (or none of them), an index with the right
    total_size (written last), `quantization_config` added to or removed from config.json,
    and a copy of every other file. `resume` skips shards finished and verified by an earlier
    run (a manifest records them) and ends byte-identical to an uninterrupted run.
    `progress(done_bytes, total_bytes)` is called as input bytes are processed;
    `free_space(dst)` says how many bytes DST's file system has free.
    Returns a summary dict."""
    import json
    import re
    import shutil
    import time
    from pathlib import Path

    from .checkpoint import INDEX_NAME, Checkpoint, atomic_output, validate, write_index, write_json
    from .errors import DsvError, UsageError

    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DsvError(f"{src}: {not_a_folder(src)}; pass a checkpoint folder as SRC")
    s_abs, d_abs = src.resolve(), dst.resolve()
    if d_abs == s_abs or s_abs in d_abs.parents:
        raise UsageError(f"{dst}: DST is {'SRC itself' if d_abs == s_abs else 'inside SRC'}; choose a folder outside {src}")
    if resume and force:
        raise UsageError("--resume and --force: pass one of them")
    if to not in (None, "fp8", "bf16"):
        raise UsageError(f"--to {to}: must be fp8 or bf16")
    if scale_fmt not in (None, *SCALE_FMTS):
        raise UsageError(f"--scale-fmt {scale_fmt}: must be e4m3 or ue8m0")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device}: must be auto, cpu or cuda")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    device = _resolve_device(device)

    ckpt = Checkpoint(src)
    ckpt.config  # DsvError for a config.json of another architecture
    cfg_path = src / "config.json"
    src_fmt = _source_format(ckpt)
    to = to or ("bf16" if src_fmt == "fp8" else "fp8")
    if to == src_fmt:
        raise UsageError(f"{src}: already {src_fmt}; --to {to} has nothing to do (the other format is {'bf16' if to == 'fp8' else 'fp8'})")
    if to == "bf16" and scale_fmt is not None:
        raise UsageError("--scale-fmt applies only with --to fp8")
    scale_fmt = scale_fmt or "e4m3"
    plan = _plan(ckpt, to, scale_fmt)
    # verify's checks before anything is written: a tensor the index does not list would be
    # dropped, a config.json that disagrees with the tensors would be carried into DST.
    report = validate(src)
    if not report.ok:
        more = f" (and {len(report.problems) - 1} more: dsv3 verify {src} lists them)" if len(report.problems) > 1 else ""
        raise DsvError(f"{src}: {report.problems[0]}{more}; fix the source checkpoint first")

    # DST: must be creatable and writable, and empty unless --resume/--force.
    if dst.exists() and not dst.is_dir():
        raise DsvError(f"{dst}: exists and is not a folder; choose another DST")
    try:
        dst.mkdir(parents=True, exist_ok=True)
        probe = dst / f".dsv3-write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DsvError(f"{dst}: not writable ({exc.strerror or exc}); choose a folder you can write to") from None
    manifest_path = dst / MANIFEST_NAME
    existing = [p for p in dst.iterdir() if p.name != MANIFEST_NAME]
    job = {"version": _MANIFEST_VERSION, "src": str(s_abs), "to": to, "scale_fmt": scale_fmt if to == "fp8" else None}
    manifest: dict = {}
    if resume and manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            manifest = {}
        if manifest.get("job") != job:
            raise DsvError(f"{dst}: holds an unfinished conversion of other settings ({_describe(manifest.get('job'))}; "
                           f"this run: {_describe(job)}); pass --force to start over, or another DST")
    elif resume and existing:
        raise DsvError(f"{dst}: not empty and has no record of an unfinished dsv3 quantize to resume; pass --force to overwrite")
    elif existing and not force:
        raise DsvError(f"{dst}: not empty; pass --resume to continue an interrupted run or --force to overwrite")
    # Nothing at DST may look complete until the end; leftovers of a killed run go.
    (dst / INDEX_NAME).unlink(missing_ok=True)
    tmp_re = re.compile(r"^\..+\.tmp\d+$")
    for p in dst.iterdir():
        if tmp_re.match(p.name) and p.is_file():
            p.unlink()
    if force:
        manifest_path.unlink(missing_ok=True)
        for p in dst.glob("model*.safetensors"):
            if p.name not in plan:
                p.unlink()
    done: dict = manifest.get("shards", {}) if manifest else {}

    # Which shards are finished and verified, and what the rest needs on disk.
    headers = {shard: _shard_header(entries) for shard, entries in plan.items()}
    sizes = {shard: len(headers[shard]) + sum(e.nbytes for e in entries) for shard, entries in plan.items()}
    skip = set()
    src_crc = functools.cache(lambda shard: _crc32_file(src / shard))  # each input read once
    for shard, rec in done.items():
        out = dst / shard
        if (
            shard in plan
            and out.is_file()
            and out.stat().st_size == sizes[shard] == rec.get("out_size")
            and rec.get("in") == _fingerprint(src / shard)
            and rec.get("in_crc32") == {s: src_crc(s) for s in _sources(ckpt, shard, plan[shard])}
            and _crc32_file(out) == rec.get("out_crc32")
        ):
            skip.add(shard)
    done = {k: v for k, v in done.items() if k in skip}
    other_files = [
        p
        for p in sorted(src.rglob("*"))
        if p.is_file()
        and p.name not in plan
        and p.name != INDEX_NAME
        and not any(part in (".git", ".cache") for part in p.relative_to(src).parts)
    ]
    need = sum(sizes[s] for s in plan if s not in skip) + sum(p.stat().st_size for p in other_files) + (1 << 20)
    free = free_space(dst)
    if need > free:
        raise DsvError(f"{dst}: not enough free disk: needs {human(need)} ({need} bytes), {human(free)} ({free} bytes) free; free some space or choose another DST")

    # Other files first (config.json rewritten), then the shards, the index last.
    for p in other_files:
        rel = p.relative_to(src)
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(out) as tmp:
            if rel == Path("config.json"):
                d = json.loads(cfg_path.read_text(encoding="utf-8"))
                if to == "fp8":
                    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}
                    if scale_fmt == "ue8m0":
                        qc["scale_fmt"] = "ue8m0"
                    d["quantization_config"] = qc
                else:
                    d.pop("quantization_config", None)
                    d["torch_dtype"] = "bfloat16"
                tmp.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            else:
                shutil.copyfile(p, tmp)

    total_in = sum(e.in_bytes for entries in plan.values() for e in entries)
    done_bytes = sum(e.in_bytes for s in skip for e in plan[s])
    if progress:
        progress(done_bytes, total_in)

    def on_bytes(n: int) -> None:
        nonlocal done_bytes
        done_bytes += n
        if progress:
            progress(done_bytes, total_in)

    # Reused buffers: two for output tensors (one being written while the next is computed),
    # one for the input tensor being converted. Memory stays ~3 x the largest tensor.
    todo = [s for s in plan if s not in skip]
    out_cap = max([e.nbytes for s in todo for e in plan[s]] or [0])
    in_cap = max([ckpt.header(s)[e.src].nbytes for s in todo for e in plan[s] if e.kind in ("quant", "dequant")] or [0])
    bufs = [bytearray(max(out_cap, 1)) for _ in range(2)]
    in_buf = bytearray(max(in_cap, 1))
    kern = load_c_kernels() if device == "cpu" else None
    # The inputs' checksums, for a resume to redo a shard whose source data changed whatever its
    # size and mtime: computed on a thread beside the conversion (zlib releases the GIL), so the
    # second read of each input costs little time (and no disk reads once the page cache has it).
    with ThreadPoolExecutor(max_workers=1) as crc_thread:
        for shard in todo:
            entries = plan[shard]
            in_crc = {s: crc_thread.submit(_crc32_file, src / s) for s in _sources(ckpt, shard, entries)}
            pending: dict = {}
            source = _Source(ckpt, shard)
            try:
                crc = _write_shard(
                    dst / shard,
                    headers[shard],
                    entries,
                    lambda e, buf: _produce(ckpt, source, e, buf, in_buf, device, kern, scale_fmt, workers, pending),
                    on_bytes,
                    bufs,
                )
            finally:
                source.close()
            done[shard] = {"in": _fingerprint(src / shard), "in_crc32": {s: f.result() for s, f in in_crc.items()},
                           "out_size": sizes[shard], "out_crc32": crc}
            write_json(manifest_path, {"job": job, "shards": dict(sorted(done.items()))})

    weight_map = {e.name: shard for shard, entries in plan.items() for e in entries}
    total_size = sum(e.nbytes for entries in plan.values() for e in entries)
    if (src / INDEX_NAME).is_file():
        write_index(dst, weight_map, total_size)
    manifest_path.unlink(missing_ok=True)
    return {
        "src": str(src),
        "dst": str(dst),
        "to": to,
        "scale_fmt": scale_fmt if to == "fp8" else None,
        "device": device,
        "shards": len(plan),
        "shards_skipped": len(skip),
        "tensors": len(weight_map),
        "fp8_weights": sum(1 for entries in plan.values() for e in entries if e.dtype == F8),
        "input_bytes": total_in,
        "total_size": total_size,
        "seconds": round(time.perf_counter() - t0, 3),
    }
