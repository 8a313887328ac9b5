"""What a user sees in a real terminal: `dsv3 estimate-cost` and the `dsv3 generate` chat, run in
pseudo-terminals of a fixed size (the process's controlling terminal, as in a terminal window)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3cli import costs

DSV3 = str(Path(sys.executable).with_name("dsv3"))
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[=>]")


class Terminal:
    """A child process on a pseudo-terminal of `cols` x `rows`; `read_until` collects its output."""

    def __init__(self, argv: list[str], cols: int, rows: int = 40, env: dict[str, str] | None = None):
        import fcntl
        import struct
        import termios

        env = {k: v for k, v in (env or os.environ).items() if k not in ("COLUMNS", "LINES")}
        env["TERM"] = "xterm"
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.execve(argv[0], argv, env)
        self.raw = b""

    def read_until(self, pattern: str | None, timeout: float = 120) -> str:
        """Output so far (ANSI codes removed) once `pattern` (a regex) appears after the previous
        call's match, or the child has closed the terminal when `pattern` is None."""
        start = len(self.raw)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text(start)
            if pattern is not None and re.search(pattern, text):
                return text
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in:\n{self.text(0)}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    assert pattern is None, f"exited without {pattern!r}:\n{self.text(0)}"
                    return text
                self.raw += chunk

    def text(self, start: int = 0) -> str:
        return _ANSI.sub("", self.raw[start:].decode("utf-8", "replace")).replace("\r\n", "\n")

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, 9)
        raise AssertionError(f"still running:\n{self.text(0)}")


def _tables() -> list[dict]:
    out = subprocess.run([DSV3, "estimate-cost", "--json"], capture_output=True, text=True, check=True).stdout
    return [t for ts in json.loads(out)["sections"].values() for t in ts]


def _whole(figure: str, text: str) -> bool:
    """`figure` appears with no digit, separator or unit glued to either side (not cut, not merged)."""
    return re.search(r"(?<![\w,.$])" + re.escape(figure) + r"(?![\w,.%])", text) is not None


@pytest.mark.parametrize("cols", [80, 120])
def test_estimate_cost_fits_the_terminal(cols):
    term = Terminal([DSV3, "estimate-cost"], cols)
    text = term.read_until(None)
    assert term.wait() == 0, text
    lines = text.splitlines()
    assert max(len(ln.rstrip()) for ln in lines) <= cols, "\n".join(ln for ln in lines if len(ln.rstrip()) > cols)
    shown = 0
    for t in _tables():
        assert t["title"].split(" ")[0] in text
        for row in t["rows"]:
            fmts = {**{c["key"]: c["format"] for c in t["columns"]}, **row.get("_fmt", {})}
            cells = [costs.format_value(row.get(c["key"]), fmts[c["key"]]) for c in t["columns"]]
            assert any(ln.startswith(cells[0] + " ") or ln.rstrip() == cells[0] for ln in lines), (t["key"], cells[0])
            for c, cell in zip(t["columns"], cells):
                if fmts[c["key"]] != "text":  # figures: whole, never cut or folded
                    assert _whole(cell, text), (t["key"], cells[0], c["key"], cell)
                    shown += 1
    assert shown > 150
    # Table 1 of the V3 report, each figure whole on the row of its phase.
    for phase, figures in {"pre-training": ["2,664,000", "$5,328,000"], "context extension": ["119,000", "$238,000"],
                           "post-training": ["5,000", "$10,000"], "total": ["2,788,000", "$5,576,000"]}.items():
        for figure in figures:
            assert any(ln.startswith(phase + " ") and _whole(figure, ln) for ln in lines), (phase, figure)


def test_estimate_cost_piped_honours_columns():
    def training_lines(columns: int) -> list[str]:
        env = {**os.environ, "COLUMNS": str(columns)}
        out = subprocess.run([DSV3, "estimate-cost", "--section", "training"], capture_output=True, text=True,
                             env=env, check=True).stdout
        assert max(len(ln.rstrip()) for ln in out.splitlines()) <= columns
        return [ln for ln in out.splitlines() if re.match(r"pre-training +[\d$]", ln)]

    wide, narrow = training_lines(200), training_lines(80)
    assert len(wide) == 1 and "2,664,000" in wide[0] and "$5,328,000" in wide[0]
    assert len(narrow) == 2  # the phases table in two parts, each repeating the phase


def _chat(ckpt: Path, *args: str) -> Terminal:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return Terminal([DSV3, "generate", str(ckpt), "--dtype", "float32", "--mtp", "0", "--verbose", *args], 80, env=env)


def _prompt_tokens(text: str) -> list[int]:
    """The prompt sizes on the --verbose stats lines."""
    return [int(n) for n in re.findall(r"(\d+) prompt \+", text)]


def test_chat_line_editing_commands_and_leaving(tiny_bf16):
    from dsv3cli.prompts import encode, user
    from dsv3cli.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_bf16)
    term = _chat(tiny_bf16, "--max-new-tokens", "4", "--max-seq-len", "256")
    assert "/help" in term.read_until(r"> $")
    term.send(b"Helo\x1b[Dl\r")  # a typo mended with the left arrow: "Hello" reaches the model
    first = term.read_until(r"prompt \+.*\n> $")
    assert _prompt_tokens(first) == [len(encode(tok, user("Hello"), raw=False))], first
    term.send(b"   \r")  # an empty line is not sent
    assert _prompt_tokens(term.read_until(r"> $")) == []
    term.send(b"/foo\r")  # an unknown command lists the commands instead of going to the model
    listed = term.read_until(r"unknown command /foo.*\n> $")
    assert all(c in listed for c in ("/help", "/clear", "/exit")) and _prompt_tokens(listed) == []
    term.send(b"\x1b[A\x1b[A\r")  # history: up twice recalls "Hello"; the first turn is in its prompt
    again = _prompt_tokens(term.read_until(r"prompt \+.*\n> $"))
    assert len(again) == 1 and again[0] > _prompt_tokens(first)[0] + 2
    term.send(b"\x03")  # Ctrl-C at the prompt: a hint, still in the chat
    term.read_until(r"Ctrl-C again.*\n> $")
    term.send(b"\x04")  # Ctrl-D leaves, on a fresh line
    tail = term.read_until(None)
    assert term.wait() == 0, term.text()
    assert tail.endswith("\n") and "Error" not in term.text()


def test_chat_ctrl_c_stops_a_reply(tiny_bf16):
    term = _chat(tiny_bf16, "--max-new-tokens", "4000", "--max-seq-len", "4096")
    term.read_until(r"> $")
    term.send(b"Tell me a long story\r")
    term.read_until(r"(?s)\n.{100}")  # the reply is streaming
    term.send(b"\x03")
    stopped = term.read_until(r"\(stopped.*\n> $")
    assert _prompt_tokens(stopped) == []  # no stats: the reply did not run to its end
    term.send(b"\x03")
    term.read_until(r"Ctrl-C again.*\n> $")
    term.send(b"\x03")  # twice at the prompt leaves
    term.read_until(None)
    assert term.wait() == 0, term.text()


def test_generated_control_bytes_are_escaped_on_a_terminal(tiny_bf16, capsys):
    from dsv3cli.commands.generate import _Printer
    from dsv3cli.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_bf16)
    text = "red \x1b[31mX\x0c\x0e done\tok\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for escape, shown in ((True, "red \\x1b[31mX\\x0c\\x0e done\tok\n"), (False, text)):
        p = _Printer(tok, [], live=True, escape=escape)
        for i in ids:  # token by token, as they stream
            p.add(0, [i])
        p.finish()
        assert capsys.readouterr().out == shown


def test_generate_on_a_terminal_writes_no_control_bytes(tiny_bf16):
    term = Terminal([DSV3, "generate", str(tiny_bf16), "--prompt", "Hello", "--max-new-tokens", "200",
                     "--dtype", "float32", "--mtp", "0"], 80)
    term.read_until(None)
    assert term.wait() == 0, term.text()
    # the random checkpoint's reply holds control bytes; only the terminal's own line ends remain
    body = term.raw.decode("utf-8", "replace").split("\r\n")[0]
    assert "\\x" in body and not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", body), repr(body)


def test_counts_of_one_read_singular():
    out = subprocess.run([DSV3, "estimate-cost", "--preset", "tiny", "--section", "params"], capture_output=True,
                         text=True, check=True, env={**os.environ, "COLUMNS": "120"}).stdout
    assert "1 layer " in out and "1 module;" in out and "1 layers" not in out and "module(s)" not in out
