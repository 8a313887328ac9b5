"""Fetching checkpoints from the Hugging Face hub, and checking a local copy against it.

Everything goes through huggingface_hub (`HfApi.model_info` for the file list with sizes and
oids, `hf_hub_url` + `get_hf_file_metadata` for each file's location, `http_get` for the bytes);
there is no hand-written HTTP here. What we add on top of it:

- a plan: which files, what is already complete on disk, what remains, the free disk (preflight);
- resume of partial files across runs (huggingface_hub discards a partial file when a download
  fails): bytes go to `DIR/.cache/dsv3/<file>.<oid>.partial` and a rerun continues with a Range
  request; a file lands at its final path only once complete and hashed (fsync + rename);
- a record per verified file (`DIR/.cache/dsv3/<file>.json`: oid, size, mtime) so a rerun skips
  complete files without hashing hundreds of GB again;
- sha256 (LFS) / git-blob sha1 (small files) checks against the hub's oids, in parallel;
- one-line errors (DsvError) for every way the hub can say no.

Boundary: knows repositories, files, sizes and hashes; tensor-level format checks are
`checkpoint.validate`'s. The endpoint is read from HF_ENDPOINT at call time (huggingface_hub
reads it once, at import) and passed explicitly to every call.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

from .checkpoint import free_bytes, human  # noqa: F401  (human: also for commands/download.py)
from .errors import DsvError, UsageError

DEFAULT_REPO = "deepseek-ai/DeepSeek-V3"

# Short names for the checkpoints of this architecture people fetch most.
ALIASES: dict[str, str] = {
    "v3": "deepseek-ai/DeepSeek-V3",
    "v3-0324": "deepseek-ai/DeepSeek-V3-0324",
    "v3.1": "deepseek-ai/DeepSeek-V3.1",
    "v3-base": "deepseek-ai/DeepSeek-V3-Base",
    "r1": "deepseek-ai/DeepSeek-R1",
    "r1-0528": "deepseek-ai/DeepSeek-R1-0528",
    "kimi-k2": "moonshotai/Kimi-K2-Instruct",
    "moonlight": "moonshotai/Moonlight-16B-A3B-Instruct",
    "v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
}

INDEX = "model.safetensors.index.json"
# `--only` groups given as globs; `mtp` is computed from the index (see `_mtp_files`).
ONLY_GLOBS: dict[str, list[str]] = {
    "config": ["config.json", "generation_config.json", INDEX, "*.py"],
    "tokenizer": ["tokenizer*", "special_tokens_map.json", "chat_template*", "*.tiktoken", "tiktoken.model",
                  "vocab.*", "merges.txt"],
}
ONLY_CHOICES = ("config", "tokenizer", "mtp")
STATE_DIR = ".cache/dsv3"
_CHUNK = 8 << 20


# -- small helpers ----------------------------------------------------------------------------

def resolve_repo(name: str | None) -> str:
    """An alias (`v3`, `r1`, ...) or any `owner/name` repo id."""
    if not name:
        return DEFAULT_REPO
    if name.lower() in ALIASES:
        return ALIASES[name.lower()]
    if name.count("/") != 1 or name.startswith("/") or name.endswith("/"):
        raise UsageError(f"REPO {name!r}: not a repo id (owner/name) nor an alias ({', '.join(ALIASES)})")
    return name


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hash_file(path: Path, lfs: bool, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of the content for LFS files, git's blob sha1 for the others (what the hub lists)."""
    h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)  # hashlib drops the GIL on large buffers: threads hash in parallel
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


def progress_bar():
    """A byte progress bar with rate and ETA on stderr (silent when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, disable=not console.is_terminal, transient=False)


# -- what the hub has -------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    oid: str  # sha256 for LFS files, git blob sha1 for the others
    lfs: bool


@dataclass
class Snapshot:
    repo_id: str
    revision: str
    commit: str
    endpoint: str
    token: str | None
    gated: bool
    files: list[RemoteFile]

    def file(self, path: str) -> RemoteFile | None:
        return next((f for f in self.files if f.path == path), None)


def _hub_error(e: BaseException, repo_id: str, revision: str, endpoint: str,
               local_dir: Path | None = None) -> DsvError | None:
    """One line for each way the hub (or the network) can refuse; None for anything else."""
    try:
        import httpx2 as httpx  # huggingface_hub 2.x
    except ImportError:
        import httpx  # huggingface_hub 1.x
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    stays = f"; what is already in {local_dir} stays and a rerun resumes" if local_dir else ""
    if isinstance(e, GatedRepoError):
        return DsvError(f"{repo_id}: gated repository, access refused; accept its terms at {endpoint}/{repo_id} "
                        "and pass a token that has access with --token or HF_TOKEN")
    if isinstance(e, RevisionNotFoundError):
        return DsvError(f"{repo_id}: revision {revision!r} not found; give an existing branch, tag or commit "
                        "with --revision")
    if isinstance(e, RepositoryNotFoundError):
        return DsvError(f"{repo_id}: repository not found on {endpoint}; check the name (aliases: "
                        f"{', '.join(ALIASES)}); a private repo needs a token (--token or HF_TOKEN)")
    if isinstance(e, RemoteEntryNotFoundError):
        url = e.response.url if e.response is not None else "?"
        return DsvError(f"{repo_id}@{revision}: a listed file is missing on the hub ({url}); rerun later{stays}")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return DsvError(f"{repo_id}: not authorised (HTTP {status}); pass a valid token with --token or "
                            "HF_TOKEN")
        return DsvError(f"{endpoint}: the hub answered HTTP {status} for {repo_id}; try again later{stays}")
    if isinstance(e, OfflineModeIsEnabled):
        return DsvError(f"{repo_id}: HF_HUB_OFFLINE is set, the hub cannot be reached; unset it to download{stays}")
    if isinstance(e, (httpx.TransportError, ConnectionError, TimeoutError)) or "Consistency check failed" in str(e):
        reason = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return DsvError(f"cannot reach the hub at {endpoint} ({reason}); check the network or HF_ENDPOINT{stays}")
    return None


@contextmanager
def _translated(repo_id: str, revision: str, endpoint: str, local_dir: Path | None = None):
    """Turn huggingface_hub's and the network's exceptions into one-line DsvErrors."""
    try:
        yield
    except (DsvError, _Stopped):
        raise
    except Exception as e:  # noqa: BLE001 - known ones become one line; the rest propagate unchanged
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # disk full: the caller knows which file and folder
        err = _hub_error(e, repo_id, revision, endpoint, local_dir)
        if err is None:
            raise
        raise err from None


def open_snapshot(repo: str | None, revision: str | None = None, token: str | None = None,
                  local_dir: Path | None = None) -> Snapshot:
    """The repo's files at one commit (sizes and oids), from `HfApi.model_info(files_metadata=True)`."""
    from huggingface_hub import HfApi

    repo_id, endpoint = resolve_repo(repo), hub_endpoint()
    rev = revision or "main"
    with _translated(repo_id, rev, endpoint, local_dir):
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
    files = []
    for s in info.siblings or []:
        if s.lfs is not None:
            files.append(RemoteFile(s.rfilename, s.lfs.size, s.lfs.sha256, True))
        else:
            files.append(RemoteFile(s.rfilename, s.size or 0, s.blob_id or "", False))
    return Snapshot(repo_id, rev, info.sha or rev, endpoint, token, bool(info.gated), sorted(files, key=lambda f: f.path))


# -- local state ------------------------------------------------------------------------------

def _record_path(local_dir: Path, f: RemoteFile) -> Path:
    return local_dir / STATE_DIR / f"{f.path}.json"


def partial_path(local_dir: Path, f: RemoteFile) -> Path:
    # The oid in the name: a partial file of another revision is never continued.
    return local_dir / STATE_DIR / f"{f.path}.{f.oid[:16]}.partial"


def _write_record(local_dir: Path, f: RemoteFile) -> None:
    st = (local_dir / f.path).stat()
    rec = _record_path(local_dir, f)
    rec.parent.mkdir(parents=True, exist_ok=True)
    tmp = rec.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"oid": f.oid, "size": f.size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, rec)


def _forget(local_dir: Path, f: RemoteFile) -> None:
    _record_path(local_dir, f).unlink(missing_ok=True)


@dataclass
class LocalFile:
    remote: RemoteFile
    status: str  # complete | unverified | partial | differs | missing
    have: int  # bytes on disk that count towards this file
    changed: str = ""  # how a file we verified earlier differs now (it is hashed or fetched again)

    @property
    def remaining(self) -> int:
        # An unverified file of the right size is most likely complete (e.g. from `hf download`);
        # it is hashed before being trusted, and refetched only if the hash differs.
        return 0 if self.status in ("complete", "unverified") else self.remote.size - self.have


def local_state(local_dir: Path, f: RemoteFile) -> LocalFile:
    dest = local_dir / f.path
    if dest.is_file():
        st = dest.stat()
        if st.st_size == f.size:
            try:
                rec = json.loads(_record_path(local_dir, f).read_text())
            except (OSError, ValueError):
                rec = None
            if rec == {"oid": f.oid, "size": f.size, "mtime_ns": st.st_mtime_ns}:
                return LocalFile(f, "complete", f.size)
            verified = isinstance(rec, dict) and rec.get("oid") == f.oid
            changed = "modified since it was verified" if verified else ""
            return LocalFile(f, "unverified", f.size, changed)
    part = partial_path(local_dir, f)
    if part.is_file() and 0 < part.stat().st_size <= f.size:
        return LocalFile(f, "partial", part.stat().st_size)
    if not dest.exists():
        return LocalFile(f, "missing", 0)
    size = dest.stat().st_size if dest.is_file() else None
    return LocalFile(f, "differs", 0, "not a file" if size is None else f"{size} bytes on disk, the hub's has {f.size}")


# -- choosing files ---------------------------------------------------------------------------

def _fetch_bytes(snap: Snapshot, f: RemoteFile, local_dir: Path) -> bytes:
    """A small file's content: the verified local copy if there is one, else from the hub (nothing written)."""
    if local_state(local_dir, f).status == "complete":
        return (local_dir / f.path).read_bytes()
    buf = io.BytesIO()
    _transfer(snap, f, buf, resume=0, local_dir=local_dir)
    return buf.getvalue()


def _mtp_files(snap: Snapshot, local_dir: Path) -> list[str]:
    """config + index + exactly the shards holding a tensor of layer `num_hidden_layers` (the MTP module)."""
    cfg_file = snap.file("config.json")
    if cfg_file is None:
        raise DsvError(f"{snap.repo_id}: no config.json on the hub; --only mtp needs it to find the MTP layer")
    layer = json.loads(_fetch_bytes(snap, cfg_file, local_dir))["num_hidden_layers"]
    index_file = snap.file(INDEX)
    if index_file is None:
        single = snap.file("model.safetensors")
        if single is None:
            raise DsvError(f"{snap.repo_id}: neither {INDEX} nor model.safetensors on the hub")
        return ["config.json", single.path]
    weight_map = json.loads(_fetch_bytes(snap, index_file, local_dir))["weight_map"]
    prefix = f"model.layers.{layer}."
    shards = sorted({shard for name, shard in weight_map.items() if name.startswith(prefix)})
    if not shards:
        raise DsvError(f"{snap.repo_id}: no tensor of layer {layer} (the MTP module) in {INDEX}; this checkpoint "
                       "has no MTP layer")
    return ["config.json", INDEX, *shards]


def select_files(snap: Snapshot, local_dir: Path, *, include: Iterable[str] = (), exclude: Iterable[str] = (),
                 only: Iterable[str] = ()) -> list[RemoteFile]:
    from huggingface_hub.utils import filter_repo_objects

    include, exclude, only = list(include), list(exclude), list(only)
    for group in only:
        if group not in ONLY_CHOICES:
            raise UsageError(f"--only {group!r}: choose from {', '.join(ONLY_CHOICES)}")
    paths = [f.path for f in snap.files]
    if only:
        chosen: set[str] = set()
        for group in only:
            if group == "mtp":
                chosen |= set(_mtp_files(snap, local_dir))
            else:
                chosen |= set(filter_repo_objects(paths, allow_patterns=ONLY_GLOBS[group]))
        paths = [p for p in paths if p in chosen]
    if include:
        paths = list(filter_repo_objects(paths, allow_patterns=include))
    if exclude:
        paths = list(filter_repo_objects(paths, ignore_patterns=exclude))
    if not paths:
        raise UsageError(f"{snap.repo_id}: no file matches the filters (--include/--exclude/--only); "
                         f"the repo has {len(snap.files)} files, e.g. {', '.join(f.path for f in snap.files[:5])}")
    keep = set(paths)
    return [f for f in snap.files if f.path in keep]


# -- the plan (what --dry-run shows and the preflight checks) ------------------------------------

@dataclass
class Plan:
    snapshot: Snapshot
    local_dir: Path
    files: list[LocalFile]
    free: int

    @property
    def total(self) -> int:
        return sum(lf.remote.size for lf in self.files)

    @property
    def remaining(self) -> int:
        return sum(lf.remaining for lf in self.files)

    def preflight(self, force: bool) -> None:
        if self.remaining > self.free and not force:
            todo = sum(1 for lf in self.files if lf.remaining)
            raise DsvError(f"{self.local_dir}: not enough free disk: {human(self.remaining)} needed for {todo} "
                           f"file(s), {human(self.free)} free; free some space, narrow the selection "
                           "(--include/--exclude/--only), or pass --force")

    def as_dict(self) -> dict:
        s = self.snapshot
        return {
            "repo": s.repo_id, "revision": s.revision, "commit": s.commit, "local_dir": str(self.local_dir),
            "files": [{"path": lf.remote.path, "size": lf.remote.size, "status": lf.status, "have": lf.have}
                      for lf in self.files],
            "total_bytes": self.total, "remaining_bytes": self.remaining, "free_bytes": self.free,
            "fits": self.remaining <= self.free, "gated": s.gated,
        }


def plan_download(repo: str | None, local_dir: str | Path, *, revision: str | None = None, token: str | None = None,
                  include: Iterable[str] = (), exclude: Iterable[str] = (), only: Iterable[str] = (),
                  free_space: Callable[[Path], int] = free_bytes) -> Plan:
    """What to fetch into `local_dir`; `free_space(local_dir)` says how many bytes its disk has free."""
    local_dir = Path(local_dir)
    if local_dir.exists() and not local_dir.is_dir():
        raise DsvError(f"--local-dir {local_dir}: exists and is not a folder; choose a folder")
    snap = open_snapshot(repo, revision, token, local_dir)
    files = select_files(snap, local_dir, include=include, exclude=exclude, only=only)
    return Plan(snap, local_dir, [local_state(local_dir, f) for f in files], free_space(local_dir))


# -- fetching ---------------------------------------------------------------------------------

class _Stopped(Exception):
    """Raised inside a transfer when another file failed or the user interrupted."""


class _Sink:
    """The file object http_get writes to: stops the transfer early when asked to."""

    def __init__(self, fh, stop: threading.Event):
        self._fh, self._stop = fh, stop

    def write(self, b: bytes) -> int:
        if self._stop.is_set():
            raise _Stopped()
        return self._fh.write(b)

    def __getattr__(self, name):  # seek / tell / truncate: http_get rewinds when a server ignores Range
        return getattr(self._fh, name)


def _bar_class(on_bytes: Callable[[int], None] | None):
    """A tqdm stand-in for http_get that feeds our rich progress bar."""

    class _Bar:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n: int = 1) -> None:
            if on_bytes:
                on_bytes(n)

        def close(self) -> None:
            pass

    return _Bar


def _transfer(snap: Snapshot, f: RemoteFile, fh, *, resume: int, local_dir: Path | None,
              on_bytes: Callable[[int], None] | None = None, stop: threading.Event | None = None) -> None:
    """Bytes `resume:` of `f` at the snapshot's commit, appended to `fh`."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(snap.repo_id, f.path, revision=snap.commit, endpoint=snap.endpoint)
    with _translated(snap.repo_id, snap.revision, snap.endpoint, local_dir):
        meta = get_hf_file_metadata(url, token=snap.token, endpoint=snap.endpoint)
        headers = build_hf_headers(token=snap.token)
        if urlsplit(meta.location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # a signed CDN url: the token must not leave the hub
        http_get(meta.location, _Sink(fh, stop or threading.Event()), resume_size=resume, headers=headers,
                 expected_size=f.size, displayed_filename=f.path, tqdm_class=_bar_class(on_bytes))


def _check_access(snap: Snapshot, f: RemoteFile) -> None:
    """One HEAD before anything is written: a gated repo refuses here, not after mkdir."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    with _translated(snap.repo_id, snap.revision, snap.endpoint):
        get_hf_file_metadata(hf_hub_url(snap.repo_id, f.path, revision=snap.commit, endpoint=snap.endpoint),
                             token=snap.token, endpoint=snap.endpoint)


def _fetch_file(snap: Snapshot, f: RemoteFile, local_dir: Path, on_bytes, stop: threading.Event) -> None:
    """Fetch (or continue) one file into its partial file; hash it; move it to its final path."""
    part = partial_path(local_dir, f)
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if have > f.size:
        part.unlink()
        have = 0
    if have < f.size or f.size == 0:
        with open(part, "ab") as fh:
            _transfer(snap, f, fh, resume=have, local_dir=local_dir, on_bytes=on_bytes, stop=stop)
            fh.flush()
            os.fsync(fh.fileno())
    digest = hash_file(part, f.lfs)
    if digest != f.oid:
        part.unlink()  # a corrupt partial must not be continued
        raise _Mismatch(f.path, digest, f.oid)
    dest = local_dir / f.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    _forget(local_dir, f)
    os.replace(part, dest)
    _write_record(local_dir, f)


class _Mismatch(Exception):
    def __init__(self, path: str, got: str, want: str):
        super().__init__(f"content hash {got[:12]}… does not match the hub's {want[:12]}…")
        self.path = path


@dataclass
class FetchStats:
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # complete and verified already
    bytes: int = 0
    refetched: dict[str, str] = field(default_factory=dict)  # a local file replaced: path -> why


def _run_parallel(jobs: list, fn: Callable, workers: int, stop: threading.Event) -> None:
    """Run `fn(job)` on a thread pool; on the first error stop the others (partials stay) and raise it."""
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        futures = [pool.submit(fn, j) for j in jobs]
        try:
            for fut in as_completed(futures):
                fut.result()
        except BaseException:
            stop.set()
            for fut in futures:
                fut.cancel()
            raise


def fetch(plan: Plan, *, workers: int = 8) -> FetchStats:
    """Fetch every file of the plan that is not complete; hash what is on disk but never verified."""
    snap, local_dir = plan.snapshot, plan.local_dir
    stats = FetchStats()
    lock, stop = threading.Lock(), threading.Event()
    todo = []
    for lf in plan.files:
        if lf.status == "complete":
            stats.skipped.append(lf.remote.path)
        else:
            todo.append(lf)
    todo.sort(key=lambda lf: -lf.remote.size)  # big files first: the pool drains evenly
    total = sum(lf.remote.size if lf.status == "unverified" else lf.remaining for lf in todo)

    with progress_bar() as progress:
        task = progress.add_task(f"{snap.repo_id}", total=total)

        def grow(n: int) -> None:  # more bytes than planned: a file on disk or a first attempt was bad
            nonlocal total
            with lock:
                total += n
                progress.update(task, total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)
            with lock:
                stats.bytes += n

        def one(lf: LocalFile) -> None:
            if stop.is_set():
                raise _Stopped()
            f = lf.remote
            if lf.status == "unverified":
                # Already on disk (an earlier run or another tool) but never checked by us: hash it.
                if hash_file(local_dir / f.path, f.lfs, lambda n: progress.advance(task, n)) == f.oid:
                    _write_record(local_dir, f)
                    with lock:
                        stats.skipped.append(f.path)
                    return
                grow(f.size)
                with lock:
                    stats.refetched[f.path] = f"{lf.changed + ': ' if lf.changed else ''}its content differs from the hub's"
            elif lf.status == "differs":
                with lock:
                    stats.refetched[f.path] = lf.changed
            try:
                try:
                    _fetch_file(snap, f, local_dir, advance, stop)
                except _Mismatch:
                    grow(f.size)
                    _fetch_file(snap, f, local_dir, advance, stop)  # one fresh attempt from byte 0
            except _Mismatch as e:
                raise DsvError(f"{local_dir / f.path}: {e} after downloading it twice; the hub or a proxy serves "
                               "corrupt data, try again later") from None
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DsvError(f"{local_dir}: disk full while writing {f.path} ({human(free_bytes(local_dir))} "
                                   "free); complete files and the partial one stay: free some space and rerun to "
                                   "resume") from None
                raise
            with lock:
                stats.fetched.append(f.path)

        _run_parallel(todo, one, workers, stop)
    return stats


# -- verification against the hub --------------------------------------------------------------

@dataclass
class HubVerifyReport:
    repo: str
    commit: str
    checked: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # on the hub, not on disk (not an error by itself)
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad

    def as_dict(self) -> dict:
        return {"repo": self.repo, "commit": self.commit, "checked": len(self.checked), "bad": self.bad,
                "problems": self.problems, "missing": self.missing, "bytes": self.bytes, "ok": self.ok}


def check_files(local_dir: Path, files: list[RemoteFile], snap: Snapshot, *, workers: int = 8,
                record: bool = False) -> HubVerifyReport:
    """Size and hash of each local file in `files` against the hub's; names every one that differs."""
    report = HubVerifyReport(snap.repo_id, snap.commit)
    present = [f for f in files if (local_dir / f.path).is_file()]
    report.missing = [f.path for f in files if not (local_dir / f.path).is_file()]
    lock, stop = threading.Lock(), threading.Event()

    with progress_bar() as progress:
        task = progress.add_task("sha256", total=sum((local_dir / f.path).stat().st_size for f in present))

        def one(f: RemoteFile) -> None:
            path = local_dir / f.path
            size = path.stat().st_size
            problem = None
            if size != f.size:
                problem = f"{f.path}: {size} bytes on disk, the hub has {f.size}"
                progress.advance(task, size)
            else:
                digest = hash_file(path, f.lfs, lambda n: progress.advance(task, n))
                if digest != f.oid:
                    kind = "sha256" if f.lfs else "git blob sha1"
                    problem = f"{f.path}: {kind} {digest[:12]}… does not match the hub's {f.oid[:12]}…"
                elif record:
                    _write_record(local_dir, f)
            with lock:
                report.checked.append(f.path)
                report.bytes += size
                if problem:
                    report.bad.append(f.path)
                    report.problems.append(problem)

        _run_parallel(sorted(present, key=lambda f: -f.size), one, workers, stop)
    report.bad.sort()
    report.problems.sort()
    report.checked.sort()
    return report


def verify_against_hub(path: str | Path, repo: str | None, *, revision: str | None = None, token: str | None = None,
                       workers: int = 8) -> HubVerifyReport:
    """`dsv3 verify DIR --hub REPO`: every file of the repo that is on disk, checked against the hub."""
    local_dir = Path(path)
    if not local_dir.is_dir():
        raise DsvError(f"{local_dir}: not a folder")
    snap = open_snapshot(repo, revision, token)
    return check_files(local_dir, snap.files, snap, workers=workers)


# -- the whole download ------------------------------------------------------------------------

@dataclass
class DownloadResult:
    plan: Plan
    stats: FetchStats
    seconds: float
    verify: HubVerifyReport | None = None
    repaired: list[str] = field(default_factory=list)  # what the first check found (then fetched again)
    format_problems: list[str] | None = None  # None: format check not run (partial checkpoint)

    @property
    def ok(self) -> bool:
        return (self.verify is None or self.verify.ok) and not self.format_problems

    def as_dict(self) -> dict:
        d = self.plan.as_dict()
        d.update({"fetched": self.stats.fetched, "skipped": self.stats.skipped, "downloaded_bytes": self.stats.bytes,
                  "refetched": self.stats.refetched,
                  "seconds": round(self.seconds, 3), "repaired": self.repaired, "ok": self.ok,
                  "verify": self.verify.as_dict() if self.verify else None,
                  "format_problems": self.format_problems})
        return d


def _format_check(local_dir: Path) -> list[str] | None:
    """checkpoint.validate when the folder holds a whole checkpoint (config + every shard the index names)."""
    if not (local_dir / "config.json").is_file():
        return None
    index = local_dir / INDEX
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        if not all((local_dir / s).is_file() for s in shards):
            return None
    elif not (local_dir / "model.safetensors").is_file():
        return None
    from .checkpoint import validate

    return list(validate(local_dir).problems)


def download(plan: Plan, *, workers: int = 8, force: bool = False, verify: bool = False) -> DownloadResult:
    """Preflight, fetch what remains, and with `verify` hash everything, refetch what fails, check again."""
    plan.preflight(force)
    if plan.snapshot.gated and plan.remaining:
        _check_access(plan.snapshot, min((lf.remote for lf in plan.files), key=lambda f: f.size))
    plan.local_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stats = fetch(plan, workers=workers)
    result = DownloadResult(plan, stats, 0.0)
    if verify:
        snap, local_dir = plan.snapshot, plan.local_dir
        report = check_files(local_dir, [lf.remote for lf in plan.files], snap, workers=workers, record=True)
        if report.bad:
            # Name what failed, fetch those again from byte 0, and check them once more.
            result.repaired = list(report.problems)
            bad = [snap.file(p) for p in report.bad]
            for f in bad:
                _forget(local_dir, f)
                partial_path(local_dir, f).unlink(missing_ok=True)
            again = fetch(Plan(snap, local_dir, [LocalFile(f, "missing", 0) for f in bad], plan.free), workers=workers)
            stats.fetched += again.fetched
            stats.bytes += again.bytes
            recheck = check_files(local_dir, bad, snap, workers=workers, record=True)
            report.bad, report.problems = recheck.bad, recheck.problems
        result.verify = report
        result.format_problems = _format_check(local_dir)
    result.seconds = time.perf_counter() - t0
    return result
