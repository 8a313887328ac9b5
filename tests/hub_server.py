"""A fake Hugging Face hub on 127.0.0.1, for the download and `verify --hub` tests.

It speaks the part of the hub's HTTP API that huggingface_hub 2.x uses to list and fetch a model
repo, with the same headers the real hub sends, and lets a test inject faults:

- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}` (`?blobs=true` adds sizes,
  blob ids and LFS sha256 oids to `siblings`)                              -> HfApi.model_info
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&cursor=` with a `Link: <...>; rel="next"`
  header when a page is full                                              -> HfApi.list_repo_tree
- `POST /api/models/{repo}/paths-info/{rev}` (form: paths=..., expand=)   -> HfApi.get_paths_info
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: small files are served directly (ETag = git blob sha1,
  X-Repo-Commit, Content-Length); LFS files (*.safetensors) answer 302 with X-Linked-Etag (sha256),
  X-Linked-Size and a Location on a second server (another port, so another origin, like the
  hub's CDN: huggingface_hub does not follow it on HEAD and sends no token there; a request that
  carries an Authorization header gets 400, as from S3)
- `GET /blobs/{sha256}` on the "CDN" server, with `Range: bytes=a-[b]` -> 206 + Content-Range.

Errors carry `X-Error-Code` like the hub's (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), which is what huggingface_hub turns into its typed exceptions.

Boundary: a test fixture only; it serves bytes of a local folder and never writes anything.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class HubFile:
    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, len(self.data))

    @property
    def blob_id(self) -> str:
        # In git an LFS file is its pointer; the tree lists the pointer's oid.
        return git_blob_sha1(self.pointer if self.lfs else self.data)


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    commit: str
    refs: dict[str, str]  # branch/tag -> commit
    gated_token: str | None = None  # set: files need `Authorization: Bearer <token>`


@dataclass
class Fault:
    """What the next GET of a file's bytes does instead of serving them cleanly.

    kind: "drop" (send `after` body bytes, then close the connection), "down" (close the
    connection without any response), "corrupt" (flip the byte at offset `at`), "status" (answer
    HTTP `status`). `times`: how many requests it applies to (None: until cleared).
    """

    kind: str
    after: int = 0
    at: int = 0
    status: int = 503
    times: int | None = 1


@dataclass
class FakeHub:
    """Two servers: the hub API (`url`, what HF_ENDPOINT points at) and a CDN for LFS blobs."""

    page_size: int = 1000
    repos: dict[str, HubRepo] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)  # repo file path -> faults, in order
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(self, repo_id: str, folder: str | Path, *, branches: tuple[str, ...] = ("main",),
                 gated_token: str | None = None) -> HubRepo:
        folder = Path(folder)
        files = {}
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder).as_posix()
            if p.is_file() and not rel.startswith(".cache/"):
                files[rel] = HubFile(rel, p.read_bytes(), rel.endswith(LFS_SUFFIXES))
        commit = hashlib.sha1("".join(f"{f.path}:{f.blob_id}\n" for f in files.values()).encode()).hexdigest()
        repo = HubRepo(repo_id, files, commit, {b: commit for b in branches}, gated_token)
        self.repos[repo_id] = repo
        return repo

    def set_fault(self, path: str, *faults: Fault) -> None:
        with self.lock:
            self.faults[path] = list(faults)

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, str | None]]:
        with self.lock:
            return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]

    def _next_fault(self, path: str) -> Fault | None:
        with self.lock:
            queue = self.faults.get(path)
            if not queue:
                return None
            fault = queue[0]
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    queue.pop(0)
            return fault

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "FakeHub":
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=False))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=True))
        for server in (self._hub, self._cdn):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"


def _handler(hub: FakeHub, *, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub, Handler.cdn = hub, cdn
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the hub; every response sets Content-Length
    hub: FakeHub
    cdn: bool

    def log_message(self, format, *args):  # noqa: A002 - the base class's name; keep test output quiet
        pass

    # -- plumbing --------------------------------------------------------------------------

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, *, send_body: bool = True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)

    def _json(self, obj, headers: dict | None = None) -> None:
        self._reply(200, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})},
                    send_body=self.command != "HEAD")

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._reply(status, json.dumps({"error": message}).encode(), headers, send_body=self.command != "HEAD")

    def _authorised(self, repo: HubRepo) -> bool:
        return repo.gated_token is None or self.headers.get("Authorization") == f"Bearer {repo.gated_token}"

    def _repo(self, repo_id: str) -> HubRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            # The hub answers 401 to anonymous callers and 404 to logged-in ones, both RepoNotFound.
            status = 404 if self.headers.get("Authorization") else 401
            self._error(status, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: HubRepo, rev: str) -> str | None:
        commit = repo.refs.get(rev) or (rev if rev == repo.commit else None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def _record(self) -> None:
        with self.hub.lock:
            self.hub.log.append((self.command, self.path, self.headers.get("Range")))

    # -- routes ----------------------------------------------------------------------------

    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def do_POST(self):
        self._route()

    def _route(self) -> None:
        self._record()
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        if self.cdn:
            if self.headers.get("Authorization"):
                # Like S3 behind the hub's signed urls: a client must not forward its hub token here.
                return self._error(400, None, "Only one auth mechanism allowed")
            if len(parts) == 2 and parts[0] == "blobs":
                return self._serve_blob(parts[1])
            return self._error(404, None, "not found")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self._repo(f"{parts[2]}/{parts[3]}")
            if repo is None:
                return
            rest = parts[4:]
            if not rest and self.command == "GET":
                return self._model_info(repo, "main", query)
            if len(rest) == 2 and rest[0] == "revision" and self.command == "GET":
                return self._model_info(repo, rest[1], query)
            if len(rest) >= 2 and rest[0] == "tree" and self.command == "GET":
                return self._tree(repo, rest[1], "/".join(rest[2:]), query)
            if len(rest) == 2 and rest[0] == "paths-info" and self.command == "POST":
                return self._paths_info(repo, rest[1])
            return self._error(404, None, "not found")
        if len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
            repo = self._repo(f"{parts[0]}/{parts[1]}")
            if repo is not None:
                self._resolve(repo, parts[3], "/".join(parts[4:]))
            return
        self._error(404, None, "not found")

    def _entry(self, f: HubFile, *, tree: bool) -> dict:
        if tree:
            e = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": f.path}
            if f.lfs:
                e["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
            return e
        e = {"rfilename": f.path, "size": len(f.data), "blobId": f.blob_id}
        if f.lfs:
            e["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
        return e

    def _model_info(self, repo: HubRepo, rev: str, query: dict) -> None:
        commit = self._commit(repo, rev)
        if commit is None:
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [self._entry(f, tree=False) if blobs else {"rfilename": f.path} for f in repo.files.values()]
        self._json({
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "sha": commit, "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z",
            "private": False, "gated": "manual" if repo.gated_token else False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": ["safetensors", "deepseek_v3"], "library_name": "transformers",
            "siblings": siblings, "usedStorage": sum(len(f.data) for f in repo.files.values()),
        })

    def _tree(self, repo: HubRepo, rev: str, folder: str, query: dict) -> None:
        if self._commit(repo, rev) is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = folder + "/" if folder else ""
        entries, dirs = [], set()
        for f in repo.files.values():
            if not f.path.startswith(prefix):
                continue
            rel = f.path[len(prefix):].split("/")
            for depth in range(1, len(rel)):  # the folders on the way to this file
                if recursive or depth == 1:
                    dirs.add(prefix + "/".join(rel[:depth]))
            if recursive or len(rel) == 1:
                entries.append(self._entry(f, tree=True))
        if folder and not entries and not dirs:
            return self._error(404, "EntryNotFound", f"{folder} does not exist on {rev}")
        entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                    for d in sorted(dirs)]
        entries.sort(key=lambda e: e["path"])
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(entries):
            path = f"/api/models/{repo.repo_id}/tree/{quote(rev, safe='')}" + (f"/{quote(folder, safe='')}" if folder else "")
            nxt = f"{self.hub.url}{path}?recursive={recursive}&cursor={start + self.hub.page_size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(page, headers)

    def _paths_info(self, repo: HubRepo, rev: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        if self._commit(repo, rev) is None:
            return
        out = [self._entry(repo.files[p], tree=True) for p in form.get("paths", []) if p in repo.files]
        self._json(out)

    def _resolve(self, repo: HubRepo, rev: str, path: str) -> None:
        commit = self._commit(repo, rev)
        if commit is None:
            return
        if not self._authorised(repo):
            status = 403 if self.headers.get("Authorization") else 401
            return self._error(status, "GatedRepo", f"Access to model {repo.repo_id} is restricted. "
                               "You must have access to it and be authenticated to access it. Please log in.")
        f = repo.files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        common = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs:
            self._reply(302, b"", {**common, "ETag": f'"{f.blob_id}"', "X-Linked-Etag": f'"{f.sha256}"',
                                   "X-Linked-Size": len(f.data), "Location": f"{self.hub.cdn_url}/blobs/{f.sha256}"})
            return
        self._serve_bytes(f, {**common, "ETag": f'"{f.blob_id}"', "Content-Type": "application/octet-stream"})

    def _serve_blob(self, sha256: str) -> None:
        for repo in self.hub.repos.values():
            for f in repo.files.values():
                if f.lfs and f.sha256 == sha256:
                    return self._serve_bytes(f, {"ETag": f'"{sha256}"', "Content-Type": "binary/octet-stream"})
        self._error(404, None, "no such blob")

    def _serve_bytes(self, f: HubFile, headers: dict) -> None:
        data, total = f.data, len(f.data)
        start, end, status = 0, total - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start, end, status = int(a), (int(b) if b else total - 1), 206
            if start >= total:
                return self._reply(416, b"", {"Content-Range": f"bytes */{total}"})
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{total}"}
        body = data[start:end + 1]
        if self.command == "HEAD":
            return self._head_bytes(status, len(body), headers)
        fault = self.hub._next_fault(f.path)
        if fault is None:
            return self._reply(status, body, headers)
        if fault.kind == "down":
            self.close_connection = True
            return
        if fault.kind == "status":
            return self._error(fault.status, None, "injected failure")
        if fault.kind == "corrupt":
            at = fault.at - start
            if 0 <= at < len(body):
                body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1:]
            return self._reply(status, body, headers)
        if fault.kind == "drop":
            # Promise the whole body, send a part, hang up: the client sees a truncated transfer.
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:fault.after])
            self.wfile.flush()
            self.close_connection = True
            return
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    def _head_bytes(self, status: int, length: int, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(length))
        self.end_headers()
