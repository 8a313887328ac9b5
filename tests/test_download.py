"""`dsv3 download` and `dsv3 verify --hub` against a fake hub on 127.0.0.1 (tests/hub_server.py).

The fake hub serves the tiny FP8 checkpoint (`tiny_fp8`, made by `dsv3cli.tiny.make_tiny`) under
deepseek-ai/DeepSeek-V3 and a gated copy; HF_ENDPOINT points at it. The CLI runs in-process
(hub.py reads HF_ENDPOINT at call time) except one subprocess run that checks the variable is
honoured from a fresh interpreter.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsv3cli import hub
from dsv3cli.app import app
from dsv3cli.errors import UsageError

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub, Fault  # noqa: E402

REPO = "deepseek-ai/DeepSeek-V3"
GATED = "org/gated-v3"
TOKEN = "hf_test_token_with_access"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]

runner = CliRunner()


@pytest.fixture(scope="session")
def fake_hub(tiny_fp8):
    with FakeHub(page_size=3) as h:  # small pages: the tree listing is paginated
        h.add_repo(REPO, tiny_fp8)
        h.add_repo(GATED, tiny_fp8, gated_token=TOKEN)
        yield h


@pytest.fixture
def env(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    fake_hub.clear_faults()
    with fake_hub.lock:
        fake_hub.log.clear()
    yield fake_hub
    fake_hub.clear_faults()


def dsv3(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def files_of(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and ".cache" not in p.relative_to(folder).parts)


def assert_identical(src: Path, dst: Path, names: list[str] | None = None) -> None:
    names = names if names is not None else files_of(src)
    assert files_of(dst) == sorted(names)
    for n in names:
        assert filecmp.cmp(src / n, dst / n, shallow=False), n


def one_line_error(r, *needles: str) -> str:
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_aliases_and_repo_ids():
    assert hub.resolve_repo(None) == REPO
    assert hub.resolve_repo("r1-0528") == "deepseek-ai/DeepSeek-R1-0528"
    assert hub.resolve_repo("kimi-k2") == "moonshotai/Kimi-K2-Instruct"
    assert hub.resolve_repo("someone/thing") == "someone/thing"
    with pytest.raises(UsageError):
        hub.resolve_repo("not-a-repo")


def test_fake_hub_speaks_the_hub_api(env, tiny_fp8, tmp_path):
    """The fixture itself: huggingface_hub's own snapshot_download gets a byte-identical copy."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    snapshot_download(REPO, local_dir=tmp_path / "s", endpoint=env.url)
    assert_identical(tiny_fp8, tmp_path / "s")
    api = HfApi(endpoint=env.url)
    tree = [f.path for f in api.list_repo_tree(REPO, recursive=True)]
    assert sorted(tree) == files_of(tiny_fp8)
    assert len(env.requests("GET", "/tree/")) >= 3  # paginated
    info = {f.path: f for f in api.get_paths_info(REPO, ["config.json", SHARDS[0]])}
    assert info[SHARDS[0]].lfs.sha256 == hashlib.sha256((tiny_fp8 / SHARDS[0]).read_bytes()).hexdigest()
    assert info["config.json"].lfs is None and info["config.json"].size == (tiny_fp8 / "config.json").stat().st_size
    path = hf_hub_download(GATED, SHARDS[1], token=TOKEN, cache_dir=tmp_path / "cache", endpoint=env.url)
    assert filecmp.cmp(path, tiny_fp8 / SHARDS[1], shallow=False)


def test_full_download_is_byte_identical_then_rerun_skips(env, tiny_fp8, tmp_path):
    out = tmp_path / "v3"
    # A fresh interpreter: HF_ENDPOINT must be honoured from the environment alone.
    r = subprocess.run([sys.executable, "-m", "dsv3cli.app", "download", "v3", "--local-dir", str(out), "--json"],
                       capture_output=True, text=True, env={**os.environ, "HF_ENDPOINT": env.url}, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["repo"] == REPO and sorted(summary["fetched"]) == files_of(tiny_fp8)
    assert summary["downloaded_bytes"] == sum((tiny_fp8 / n).stat().st_size for n in files_of(tiny_fp8))
    assert_identical(tiny_fp8, out)

    with env.lock:
        env.log.clear()
    r = dsv3("download", "--local-dir", out, "--json")
    assert r.exit_code == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["fetched"] == [] and sorted(again["skipped"]) == files_of(tiny_fp8)
    assert env.requests("GET", "/blobs/") == [] and env.requests("HEAD", "/resolve/") == []

    # Changed since verified: same size, other bytes (a later mtime), and a truncated one. The
    # rerun names each file it fetches again and why.
    same_size = out / SHARDS[0]
    data = bytearray(same_size.read_bytes())
    data[-1] ^= 1
    same_size.write_bytes(bytes(data))
    os.utime(same_size, ns=(same_size.stat().st_atime_ns, same_size.stat().st_mtime_ns + 10**9))
    shorter = out / SHARDS[1]
    shorter.write_bytes(shorter.read_bytes()[:-7])
    r = dsv3("download", "--local-dir", out)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"fetched again: {SHARDS[0]}: modified since it was verified: its content differs from the hub's" in lines
    size = (tiny_fp8 / SHARDS[1]).stat().st_size
    assert f"fetched again: {SHARDS[1]}: {size - 7} bytes on disk, the hub's has {size}" in lines
    assert_identical(tiny_fp8, out)


def test_dry_run_lists_sizes_marks_complete_and_writes_nothing(env, tiny_fp8, tmp_path):
    out = tmp_path / "v3"
    r = dsv3("download", "--local-dir", out, "--only", "config", "--include", "config.json")
    assert r.exit_code == 0, r.stderr
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))

    r = dsv3("download", "--local-dir", out, "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    lines = {ln.split("│")[1].strip(): ln for ln in r.stdout.splitlines() if ln.count("│") >= 3}
    assert set(lines) >= set(files_of(tiny_fp8))
    assert "complete" in lines["config.json"] and "complete" not in lines[SHARDS[0]]
    assert "free at" in r.stdout and "to fetch" in r.stdout

    r = dsv3("download", "--local-dir", out, "--dry-run", "--json")
    plan = json.loads(r.stdout)
    pinned = dsv3("download", "--local-dir", out, "--dry-run", "--json", "--revision", plan["commit"])
    assert json.loads(pinned.stdout)["commit"] == plan["commit"] == env.repos[REPO].commit
    sizes = {n: (tiny_fp8 / n).stat().st_size for n in files_of(tiny_fp8)}
    assert {f["path"]: f["size"] for f in plan["files"]} == sizes
    assert plan["total_bytes"] == sum(sizes.values())
    assert plan["remaining_bytes"] == sum(sizes.values()) - sizes["config.json"]
    assert [f["status"] for f in plan["files"] if f["path"] == "config.json"] == ["complete"]
    assert plan["free_bytes"] > 0

    missing = tmp_path / "nowhere"
    assert dsv3("download", "--local-dir", missing, "--dry-run").exit_code == 0
    assert not missing.exists()


def test_include_exclude(env, tiny_fp8, tmp_path):
    out = tmp_path / "json"
    r = dsv3("download", "--local-dir", out, "--include", "*.json", "--exclude", "tokenizer*",
             "--exclude", "generation_config.json")
    assert r.exit_code == 0, r.stderr
    assert_identical(tiny_fp8, out, ["config.json", "model.safetensors.index.json"])


def test_only_mtp_fetches_exactly_the_shards_of_the_mtp_layer(env, tiny_fp8, tmp_path):
    cfg = json.loads((tiny_fp8 / "config.json").read_text())
    weight_map = json.loads((tiny_fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    want = {s for n, s in weight_map.items() if n.startswith(mtp)}
    assert want and want != set(SHARDS)  # the test means something only if some shard is left out
    out = tmp_path / "mtp"
    r = dsv3("download", "--local-dir", out, "--only", "mtp")
    assert r.exit_code == 0, r.stderr
    assert_identical(tiny_fp8, out, ["config.json", "model.safetensors.index.json", *sorted(want)])


def test_dropped_connection_then_rerun_resumes(env, tiny_fp8, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # http_get writes whole 10 MB chunks; the tiny shards are ~3 MB, so read in 64 kB chunks
    # to leave a partial file behind when the connection drops.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    shard = SHARDS[1]
    size = (tiny_fp8 / shard).stat().st_size
    # The connection drops after 1 MB; the retry then meets a failing hub and the run gives up.
    env.set_fault(shard, Fault("drop", after=1_000_000), Fault("status", status=503, times=None))
    out = tmp_path / "v3"
    r = dsv3("download", "--local-dir", out, "--max-workers", "2")
    one_line_error(r, "503", "stays", "rerun")
    assert not (out / shard).exists()
    partial = hub.partial_path(out, next(f for f in hub.open_snapshot(REPO).files if f.path == shard))
    have = partial.stat().st_size
    assert 0 < have < size

    env.clear_faults()
    with env.lock:
        env.log.clear()
    r = dsv3("download", "--local-dir", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert shard in json.loads(r.stdout)["fetched"]
    assert_identical(tiny_fp8, out)
    assert not partial.exists()
    ranges = [rng for _, path, rng in env.requests("GET", "/blobs/")]
    assert f"bytes={have}-" in ranges  # continued where it stopped, not from byte 0


def test_corrupt_bytes_from_the_hub_are_caught_while_downloading(env, tiny_fp8, tmp_path):
    shard = SHARDS[0]
    env.set_fault(shard, Fault("corrupt", at=12345))  # once: the second attempt is clean
    r = dsv3("download", "--local-dir", tmp_path / "a", "--include", shard)
    assert r.exit_code == 0, r.stderr
    assert_identical(tiny_fp8, tmp_path / "a", [shard])

    env.set_fault(shard, Fault("corrupt", at=12345, times=None))
    r = dsv3("download", "--local-dir", tmp_path / "b", "--include", shard)
    one_line_error(r, shard, "does not match")
    assert not (tmp_path / "b" / shard).exists()


def test_verify_hub_names_a_corrupt_file_and_download_verify_repairs_it(env, tiny_fp8, tmp_path):
    out = tmp_path / "v3"
    assert dsv3("download", "--local-dir", out).exit_code == 0
    shard = out / SHARDS[2]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # bit rot that keeps size and mtime: the cheap check cannot see it
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))

    report = hub.verify_against_hub(out, "v3")
    assert report.bad == [SHARDS[2]] and len(report.checked) == len(files_of(tiny_fp8))
    r = dsv3("verify", out, "--hub", "v3")
    assert r.exit_code == 1
    problems = [ln for ln in r.stdout.splitlines() if ln.startswith("problem:")]
    assert len(problems) == 1 and SHARDS[2] in problems[0] and "sha256" in problems[0], r.stdout

    r = dsv3("download", "--local-dir", out, "--json")  # a plain rerun trusts its records
    assert r.exit_code == 0 and json.loads(r.stdout)["fetched"] == []

    r = dsv3("download", "--local-dir", out, "--verify", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["fetched"] == [SHARDS[2]] and len(res["repaired"]) == 1 and SHARDS[2] in res["repaired"][0]
    assert res["verify"]["ok"] and res["format_problems"] == []
    assert_identical(tiny_fp8, out)
    r = dsv3("verify", out, "--hub", "v3", "--json")
    assert r.exit_code == 0, r.stdout
    assert json.loads(r.stdout)["summary"]["hub"]["checked"] == len(files_of(tiny_fp8))


def test_errors_are_one_clear_line(env, tmp_path, monkeypatch):
    out = tmp_path / "x"
    one_line_error(dsv3("download", "org/nope", "--local-dir", out), "org/nope", "not found")
    one_line_error(dsv3("download", "--local-dir", out, "--revision", "v9"), "revision 'v9' not found")
    one_line_error(dsv3("download", GATED, "--local-dir", out), "gated", "HF_TOKEN", "--token")
    one_line_error(dsv3("download", GATED, "--local-dir", out, "--token", "hf_wrong"), "HF_TOKEN")
    assert not out.exists()
    r = dsv3("download", GATED, "--local-dir", out, "--token", TOKEN, "--only", "mtp")
    assert r.exit_code == 0, r.stderr
    assert (out / "config.json").is_file() and (out / SHARDS[2]).is_file()
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token from the environment works as well
    r = dsv3("download", GATED, "--local-dir", tmp_path / "y", "--only", "mtp", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["gated"] and not (tmp_path / "y").exists()


def test_unreachable_hub(env, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    one_line_error(dsv3("download", "--local-dir", tmp_path / "x"), "cannot reach the hub", "HF_ENDPOINT", "stays")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_preflight_refuses_when_the_disk_is_too_small(env, tiny_fp8, tmp_path):
    """The real plan against the local hub, with a disk of 999 free bytes (the free-space function
    is the plan's parameter)."""
    out = tmp_path / "v3"
    small = lambda path: 999  # noqa: E731
    plan = hub.plan_download(REPO, out, free_space=small)
    with pytest.raises(hub.DsvError) as e:
        plan.preflight(force=False)
    total = sum((tiny_fp8 / n).stat().st_size for n in files_of(tiny_fp8))
    for w in ("not enough free disk", "999 B free", "--force", hub.human(total)):
        assert w in str(e.value)
    assert not out.exists() and not plan.as_dict()["fits"]
    # Only what remains to fetch counts: a 135-byte file fits in 999 bytes.
    hub.plan_download(REPO, out, include=["generation_config.json"], free_space=small).preflight(force=False)
    with pytest.raises(hub.DsvError):
        hub.plan_download(REPO, out, include=["*.json"], free_space=small).preflight(force=False)
    hub.download(hub.plan_download(REPO, out, include=["*.json"], free_space=small), force=True)
    assert_identical(tiny_fp8, out, [n for n in files_of(tiny_fp8) if n.endswith(".json")])


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_disk_full_during_the_download(env, tmp_path):
    # The partial file of one shard is /dev/full: every write to it fails with ENOSPC, as on a full disk.
    out = tmp_path / "v3"
    f = next(f for f in hub.open_snapshot(REPO).files if f.path == SHARDS[0])
    partial = hub.partial_path(out, f)
    partial.parent.mkdir(parents=True)
    partial.symlink_to("/dev/full")
    one_line_error(dsv3("download", "--local-dir", out, "--workers", "1"), "disk full", SHARDS[0], "rerun")
