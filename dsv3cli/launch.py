"""`--nproc N` on one machine through torch's own launcher (torchelastic's agent, as torchrun uses).

Boundary: processes and the agent's failure report only; no model. `launch` runs N copies of
`python -m dsv3cli.launch TARGET JOB` under `elastic_launch`; each calls `TARGET(job)` (a
"module:function" and a JSON-able dict). The agent tracks every child: when one exits badly it
stops the rest, so nothing survives and nothing hangs. Rank 0 keeps the terminal (its stdout,
stderr and stdin are the user's); the other ranks' output goes to log files, read back when one of
them is the rank that failed. What is ours is turning the agent's report into one line.

A rank that stalls (alive, no progress) is found by the collective timeout of the process group
(`parallel.init_distributed`): the ranks waiting for it fail with `PEER_EXIT`, and the ranks still
running then are the ones that made no progress. Under torchrun (WORLD_SIZE already set) callers
run the target directly instead.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

from .errors import DsvError, PeerFailure

# A rank's exit code when a collective failed because another rank died (PEER_EXIT) or made no
# progress within the timeout (PEER_STALL): a consequence, the launcher names the cause.
PEER_EXIT, PEER_STALL = 75, 76


def under_launcher() -> bool:
    """True inside a process started by torchrun or by `launch` (the environment is set)."""
    return "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, target: str, job: dict[str, Any], *, stop_after_s: int = 5) -> int:
    """Run `target(job)` in `nproc` local processes; return the exit code for the whole run.

    0 when every rank succeeded; rank 0's code when it met bad input (it printed its own error);
    otherwise 1 after one line naming the rank that died or stalled. `stop_after_s`: when the
    launcher itself gets a signal, how long the agent waits for the ranks to exit on it before
    SIGKILL.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .parallel import collective_timeout_s

    timeout_s = collective_timeout_s()  # a bad DSV3_COLLECTIVE_TIMEOUT_S is named once, here

    # The agent logs every step and every failure with a traceback; the one line below says it.
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="dsv3-run-") as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        logs = Path(tmp) / "logs"
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex, role="dsv3",
            rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
            monitor_interval=0.1, local_addr="127.0.0.1", shutdown_timeout=stop_after_s,
            logs_specs=DefaultLogsSpecs(
                log_dir=str(logs), redirects={r: Std.NONE if r == 0 else Std.ALL for r in range(nproc)}
            ),
        )
        waker = _WakeStopped()
        waker.start()
        # The agent installs its own handlers for these and leaves them; this process may go on.
        handled = [getattr(signal, name) for name in config.signals_to_handle.split(",")]
        handlers = {sig: signal.getsignal(sig) for sig in handled}
        try:
            elastic_launch(config, sys.executable)("-m", "dsv3cli.launch", target, str(job_path))
        except SignalException as e:
            if e.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise DsvError(f"the launcher got {signal.Signals(e.sigval).name}; stopped all {nproc} ranks") from None
        except ChildFailedError as e:
            codes = {rank: f.exitcode for rank, f in e.failures.items()}
            tails = {rank: _last_error(logs, rank) for rank in codes}
            return _report(codes, tails, nproc, timeout_s)
        finally:
            waker.done.set()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    return 0


class _WakeStopped(threading.Thread):
    """Continue a stopped child that has a SIGTERM pending, so that the SIGTERM lands.

    When a rank fails, torch's agent sends the others SIGTERM and waits 30 s (fixed there) before
    SIGKILL; a rank stopped by SIGSTOP or a debugger would hold the whole run for those 30 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for children in glob.glob("/proc/self/task/*/children"):  # this process's children (Linux)
                for pid in _read(children).split():
                    fields = dict(ln.split(":\t", 1) for ln in _read(f"/proc/{pid}/status").splitlines() if ":\t" in ln)
                    if fields.get("State", "").startswith("T") and \
                            int(fields.get("ShdPnd", "0"), 16) & (1 << (signal.SIGTERM - 1)):
                        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                            os.kill(int(pid), signal.SIGCONT)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:  # the process is gone meanwhile: nothing to do
        return ""


def _last_error(logs: Path, local_rank: int) -> str:
    """The last line a rank wrote to stderr (rank 0's went to the terminal: none)."""
    for path in glob.glob(str(logs / "**" / str(local_rank) / "stderr.log"), recursive=True):
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1].removeprefix("Error: ") if lines else ""
    return ""


def _report(codes: dict[int, int], tails: dict[int, str], nproc: int, timeout_s: float) -> int:
    """Print the one line for a failed run from each failed rank's exit code and last words.

    `codes` is in the agent's order: the ranks that failed on their own first, then those it
    stopped (SIGTERM, or SIGKILL after `stop_after_s`)."""
    if codes.get(0) in (1, 2):  # bad input: rank 0 printed it (every rank met the same)
        return codes[0]
    others = [r for r, c in codes.items() if c not in (PEER_EXIT, PEER_STALL)]
    if others and PEER_STALL not in codes.values():
        rank = others[0]
        code = codes[rank]
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
        last = tails.get(rank, "")
        print(f"Error: rank {rank} of {nproc} {how}{': ' + last if last else ''}; stopped the other ranks", file=sys.stderr)
        return 1
    stalled = others or [r for r in range(nproc) if r not in codes]
    who = f"rank {stalled[0]}" if len(stalled) == 1 else f"ranks {', '.join(map(str, stalled))}"
    print(
        f"Error: {who} of {nproc} made no progress for {timeout_s:g} s (the collective timeout, "
        "DSV3_COLLECTIVE_TIMEOUT_S): stuck, or stopped by a signal or a debugger; stopped every rank",
        file=sys.stderr,
    )
    return 1


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def run_target(target: str, job: dict[str, Any]) -> int:
    """Call `target(job)` as one rank: bad input becomes one `Error:` line and an exit code; a
    failed collective becomes PEER_EXIT, silently (the launcher names the rank that caused it)."""
    mod, _, fn = target.partition(":")
    try:
        getattr(importlib.import_module(mod), fn)(job)
    except PeerFailure as e:
        return PEER_STALL if e.stalled else PEER_EXIT
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
    return run_target(target, job)  # the rank's thread share: ops.rank_threads


if __name__ == "__main__":
    code = _main(sys.argv[1:])
    # Leave without the interpreter's teardown: after a failed or timed-out collective, gloo's
    # threads may still be joinable, and destroying them aborts the process ("terminate called
    # without an active exception", SIGABRT), which the launcher would report instead of the
    # rank that caused it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
