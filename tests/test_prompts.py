"""`dsv3cli.prompts`: one reader of prompts files for `generate` and `profile-experts`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dsv3cli.app import app
from dsv3cli.errors import DsvError
from dsv3cli.prompts import encode, read_prompts_file, user
from dsv3cli.tokenizer import load_tokenizer

runner = CliRunner()
LINES = [
    "plain text, {braces} inside",
    json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]}),
    json.dumps([{"role": "user", "content": "a bare list"}]),
    json.dumps({"prompt": "an object"}),
]


def test_read_kinds_of_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(LINES[:2]) + "\n\n" + "\n".join(LINES[2:]) + "\n", encoding="utf-8")
    got = read_prompts_file(f)
    assert got == [user(LINES[0]), json.loads(LINES[1])["messages"], user("a bare list"), user("an object")]
    for text, where in [('{"oops": 1}\n', "p.jsonl:1"), ("ok\n{not json\n", "p.jsonl:2"), ("\n \n", "no prompts"),
                        ('[{"role": "user"}]\n', "p.jsonl:1")]:
        (tmp_path / "p.jsonl").write_text(text)
        with pytest.raises(DsvError, match=where.replace(".", r"\.")):
            read_prompts_file(tmp_path / "p.jsonl")
    with pytest.raises(DsvError, match="--prompts .*no such file"):
        read_prompts_file(tmp_path / "missing.txt")


@pytest.mark.parametrize("raw", [False, True])
def test_generate_and_profile_experts_read_a_file_alike(tiny_bf16, tmp_path, raw):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    tok = load_tokenizer(tiny_bf16)
    want = [encode(tok, m, raw) for m in read_prompts_file(f)]
    flags = ["--raw"] if raw else []
    g = runner.invoke(app, ["generate", str(tiny_bf16), "--prompts", str(f), "--json", "--max-new-tokens", "1",
                            "--dtype", "float32", *flags])
    assert g.exit_code == 0, g.output
    assert [o["prompt_ids"] for o in json.loads(g.stdout)["outputs"]] == want
    p = runner.invoke(app, ["profile-experts", str(tiny_bf16), "--prompts", str(f), "--json", "--dtype", "float32", *flags])
    assert p.exit_code == 0, p.output
    doc = json.loads(p.stdout)
    assert doc["prompts"] == len(want) and doc["tokens"] == sum(map(len, want))
