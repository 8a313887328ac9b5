"""The CLI root: help, version, and the error boundary."""

import subprocess
import sys

import pytest

from typer.testing import CliRunner

from dsv3cli import __version__
from dsv3cli.app import app

runner = CliRunner()


def test_help_lists_every_command():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for name in ("download", "quantize", "generate", "profile-experts", "estimate-cost", "tiny", "verify"):
        assert name in r.output


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_help_does_not_import_torch():
    code = "import sys; from dsv3cli.app import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


DSV3 = [sys.executable, "-c", "from dsv3cli.app import main; main()"]


def _dsv3(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DSV3, *args], capture_output=True, text=True, timeout=120)


def test_usage_errors_are_one_line_with_exit_2(tmp_path):
    """Typer's own checks (unknown option, range, missing argument) read like ours: one line."""
    for args, words in [
        (["estimate-cost", "--bogus"], ["--bogus"]),
        (["generate", str(tmp_path), "--batch-size", "0"], ["--batch-size"]),
        (["generate", str(tmp_path), "--top-p", "1.5"], ["--top-p 1.5", "(0, 1]"]),
        (["generate", str(tmp_path), "--top-p", "0"], ["--top-p 0", "(0, 1]"]),
        (["quantize", str(tmp_path)], ["dst"]),
        (["download", "--max-workers", "0"], ["--max-workers"]),
    ]:
        r = _dsv3(*args)
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(err) == 1 and err[0].startswith("Error: "), (args, r.stderr)
        assert all(w in err[0] for w in words), (args, err[0])
    r = _dsv3("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_old_option_spellings_still_work_hidden(tmp_path):
    for cmd, old, new in [("generate", "--file", "--prompts"), ("quantize", "--workers", "--threads"),
                          ("download", "--workers", "--max-workers"), ("estimate-cost", "--batch", "--batch-size"),
                          ("estimate-cost", "--context", "--max-seq-len")]:
        shown = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"}).output
        assert new in shown and f"{old} " not in shown, (cmd, old)
    new = _dsv3("estimate-cost", "--section", "inference", "--batch-size", "8", "--max-seq-len", "8192", "--json").stdout
    old = _dsv3("estimate-cost", "--section", "inference", "--batch", "8", "--context", "8192", "--json").stdout
    assert new == old and '"batch": 8' in new


@pytest.mark.parametrize("debug", ["0", "1"])
def test_internal_errors_one_line_or_a_traceback_under_debug(debug, monkeypatch, capsys):
    import typer

    from dsv3cli.app import boundary

    def broken():
        raise RuntimeError("a bug of ours")

    monkeypatch.setenv("DSV3_DEBUG", debug)
    with pytest.raises(typer.Exit) as e:
        boundary(broken)()
    err = capsys.readouterr().err
    assert e.value.exit_code == 1 and err.splitlines()[-1].startswith("Error: internal error: RuntimeError: a bug of ours")
    assert ("Traceback" in err) == (debug == "1")
    assert ("set DSV3_DEBUG=1" in err) == (debug == "0")
