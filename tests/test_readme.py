"""The README's examples run in order, as written: every `dsv3` line of its bash blocks that needs
no GPU, no hub and no folder of the user's (`/data/...`, `./...`), with `/tmp/` moved into a
fresh folder; each may use what the lines before it wrote there."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def examples() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line.startswith("dsv3 "):
                lines.append(line)
    return lines


def runnable(line: str) -> bool:
    if re.search(r"(^|\s)\./|/data/|dsv3 download|--hub|--device cuda", line):
        return False
    if line.startswith("dsv3 generate") and not re.search(r"--prompt", line):  # the chat: a terminal's
        return False
    return shutil.which("jq") is not None or "| jq" not in line


@pytest.mark.slow
def test_readme_examples_run_in_order(tmp_path):
    todo = [ln for ln in examples() if runnable(ln)]
    assert len(todo) >= 18, todo
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for line in todo:
        cmd = line.replace("/tmp/", f"{tmp_path}/")
        r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
