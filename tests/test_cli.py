"""The CLI root: help, version, and the error boundary."""

import subprocess
import sys

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
