"""A small local launcher for `--nproc N`: N processes with torchrun's environment on one machine.

Boundary: processes, pipes and exit codes only; no torch, no model. `launch` starts N copies of
`python -m dsv3cli.launch TARGET JOB` with MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK,
WORLD_SIZE, LOCAL_RANK; each child calls `TARGET(job)` (a "module:function" and a JSON-able dict).
Only rank 0's stdout and stderr reach the user (relayed live); the other ranks' stderr is kept
and shown when one of them fails. When a rank dies, the others get `grace_s` seconds to exit
(they usually fail at once in a collective) and are then terminated, so nothing hangs.
Under torchrun (WORLD_SIZE already set) callers run the target directly instead.
"""

from __future__ import annotations

import codecs
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import IO, Any

from .errors import DsvError

GRACE_ENV = "DSV3_RANK_GRACE_S"  # seconds the other ranks get after one dies (default 10)


def under_launcher() -> bool:
    """True inside a process started by torchrun or by `launch` (the environment is set)."""
    return "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relay(src: IO[bytes], dst: IO[str] | None, keep: deque | None, held: list[str] | None = None) -> None:
    """Copy a child's pipe to `dst` as it arrives (partial UTF-8 held back), keeping the last lines.

    With `held`, the stream is handled by whole lines and `Error:` lines are put there instead of
    written: the launcher decides at the end whose error the user sees.
    """
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while True:
        chunk = os.read(src.fileno(), 65536)
        text = dec.decode(chunk, final=not chunk)
        if held is not None:
            *lines, pending = (pending + text).split("\n")
            lines = [ln + "\n" for ln in lines]
            if not chunk and pending:
                lines.append(pending)
            held.extend(ln.rstrip("\n") for ln in lines if ln.startswith("Error:"))
            text = "".join(ln for ln in lines if not ln.startswith("Error:"))
        if text:
            if dst is not None:
                dst.write(text)
                dst.flush()
            if keep is not None:
                keep.extend(line for line in text.splitlines() if line.strip())
        if not chunk:
            break
    src.close()


def launch(nproc: int, target: str, job: dict[str, Any], *, grace_s: float | None = None) -> int:
    """Run `target(job)` in `nproc` local processes; return the exit code for the whole run.

    0 when every rank succeeded; rank 0's code when it failed first (it printed its own error);
    otherwise 1 after one line naming the rank that failed first and its last message.
    """
    if grace_s is None:
        grace_s = float(os.environ.get(GRACE_ENV, "10"))
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="dsv3-job-", delete=False) as f:
        json.dump(job, f)
        job_path = f.name
    port = free_port()
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    tails: list[deque] = []
    held: list[str] = []  # rank 0's error lines
    try:
        for r in range(nproc):
            env = dict(
                os.environ,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                RANK=str(r),
                WORLD_SIZE=str(nproc),
                LOCAL_RANK=str(r),
                LOCAL_WORLD_SIZE=str(nproc),
            )
            # Share the cores: N ranks each using every core thrash (torchrun sets 1 likewise).
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
            p = subprocess.Popen(
                [sys.executable, "-m", "dsv3cli.launch", target, job_path],
                stdin=None if r == 0 else subprocess.DEVNULL,  # rank 0 reads the chat
                stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
            )
            procs.append(p)
            tail: deque = deque(maxlen=20)
            tails.append(tail)
            if r == 0:
                threads.append(threading.Thread(target=_relay, args=(p.stdout, sys.stdout, None), daemon=True))
            threads.append(threading.Thread(
                target=_relay, args=(p.stderr, sys.stderr if r == 0 else None, tail, held if r == 0 else None), daemon=True
            ))
        for t in threads:
            t.start()
        first_fail = _watch(procs, grace_s)
        for t in threads:
            t.join(timeout=5)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        _stop(procs)
        os.unlink(job_path)

    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        return 0
    rank, code = first_fail if first_fail is not None else next((r, c) for r, c in enumerate(codes) if c)
    last = tails[rank][-1] if tails[rank] else ""
    if rank == 0 or (held and held[-1] == last):  # rank 0 failed, or every rank met the same bad input
        for line in held:
            print(line, file=sys.stderr)
        return codes[0] or code or 1
    # Rank 0's own error is a consequence (a collective with the dead rank failed): not shown.
    last = last.removeprefix("Error: ")
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    print(
        f"Error: rank {rank} of {nproc} {how}{': ' + last if last else ''}; stopped the other ranks",
        file=sys.stderr,
    )
    return 1


def _watch(procs: list[subprocess.Popen], grace_s: float) -> tuple[int, int] | None:
    """Wait for every child; after the first failure give the rest `grace_s` seconds, then stop
    them. Returns (rank, code) of the first failure, or None."""
    first: tuple[int, int] | None = None
    failed_at = 0.0
    while True:
        codes = [p.poll() for p in procs]
        if first is None:
            for r, c in enumerate(codes):
                if c not in (None, 0):
                    first, failed_at = (r, c), time.monotonic()
                    break
        if all(c is not None for c in codes):
            return first
        if first is not None and time.monotonic() - failed_at > grace_s:
            _stop(procs)
            return first
        time.sleep(0.02)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in procs:
        if p.poll() is None:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_target(target: str, job: dict[str, Any]) -> int:
    """Call `target(job)` as one rank: bad input becomes one `Error:` line and an exit code."""
    mod, _, fn = target.partition(":")
    try:
        getattr(importlib.import_module(mod), fn)(job)
    except DsvError as e:
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # noqa: BLE001 - one rank's error boundary, like app.py's
        if os.environ.get("DSV3_DEBUG") == "1":
            raise
        print(f"Error: internal error: {type(e).__name__}: {e} (set DSV3_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    return 0


def _main(argv: list[str]) -> int:
    target, job_path = argv
    with open(job_path) as f:
        job = json.load(f)
    # SIGTERM from the launcher ends this rank quietly (the launcher reports why).
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    sys.stdout.flush()
    return run_target(target, job)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
