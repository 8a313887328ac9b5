"""`dsv3cli.launch` on torch's elastic agent with real processes: the one line for each way a
rank fails, and the launcher process left as it was."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dsv3cli.errors import DsvError
from dsv3cli.launch import launch


def fail_on(job: dict) -> None:
    """A target: the rank job["rank"] fails as job["how"] says; the others return at once."""
    if int(os.environ["RANK"]) != job["rank"]:
        return
    if job["how"] == "bad input":
        raise DsvError("model-00002.safetensors: truncated; download it again")
    os._exit(3)


@pytest.fixture
def targets_importable(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_success_and_the_signal_handlers_restored(targets_importable):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    assert launch(2, "test_launch:fail_on", {"rank": -1, "how": "none"}) == 0
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_rank_that_exits_is_named_with_its_code_and_last_words(targets_importable, capsys):
    assert launch(2, "test_launch:fail_on", {"rank": 1, "how": "exit"}) == 1
    assert capsys.readouterr().err.splitlines() == ["Error: rank 1 of 2 exited with code 3; stopped the other ranks"]
    assert launch(2, "test_launch:fail_on", {"rank": 1, "how": "bad input"}) == 1
    assert capsys.readouterr().err.splitlines() == [
        "Error: rank 1 of 2 exited with code 1: model-00002.safetensors: truncated; download it again; "
        "stopped the other ranks"]


def test_bad_input_on_rank_0_is_its_own_line_and_code(targets_importable, capfd):
    assert launch(2, "test_launch:fail_on", {"rank": 0, "how": "bad input"}) == 1
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert err == ["Error: model-00002.safetensors: truncated; download it again"]
