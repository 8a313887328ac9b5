"""Every in-process case of the bad-input sweep (tests/sweep_bad_input.py) as a test: exit 1 or 2,
one line naming the culprit, no traceback, nothing new at a final path. The sweep's faults in
real processes (killed and stopped ranks, stdout closed) are tested in test_generate_cli.py and
here (stdout closed)."""

from __future__ import annotations

import pytest

import sweep_bad_input as sweep  # tests/ is on sys.path under pytest

CASES = [c for c in sweep.cases() if c.process is None or c.process is sweep.closed_stdout]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return sweep.Work(tmp_path_factory.mktemp("sweep"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_handled(case, work):
    ok, line = sweep.run_case(case, work)
    assert ok, line


def test_the_sweep_has_at_least_60_cases_across_every_command():
    cases = sweep.cases()
    assert len(cases) >= 60
    commands = {c.name.split(":")[0].split()[0] for c in cases}
    assert commands == {"generate", "quantize", "verify", "profile-experts", "estimate-cost", "download", "tiny"}
