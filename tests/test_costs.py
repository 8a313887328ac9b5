"""`dsv3cli.costs` and `dsv3 estimate-cost`: the published DeepSeek-V3 numbers (Table 1, parameter
counts, KV bytes, serving economics, deployment units) reproduced, parameter and byte counts checked
against real tiny checkpoints on disk, closed-form cross-checks, and bad input."""

from __future__ import annotations

import csv
import io
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsv3cli import costs
from dsv3cli.app import app
from dsv3cli.config import load_preset

runner = CliRunner()
V3 = load_preset("deepseek-v3")


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---- Table 1 ---------------------------------------------------------------------------------
def test_default_training_reproduces_table_1_exactly():
    t = costs.training(V3, costs.Scenario())
    assert [p["gpu_hours"] for p in t["phases"]] == [2_664_000, 119_000, 5_000]
    assert [p["usd"] for p in t["phases"]] == [5_328_000, 238_000, 10_000]
    assert t["total_gpu_hours"] == 2_788_000
    assert t["total_usd"] == 5_576_000
    assert t["gpu_hours_per_trillion"] == pytest.approx(180_000, rel=1e-12)
    assert round(t["days_per_trillion"], 1) == 3.7  # 180K GPU-hours / 2,048 GPUs / 24 = 3.66 days
    assert t["gpus"] == 2048 and t["gpu"] == "H800" and t["price"] == 2.0


def test_flops_per_token_and_the_mfu_table_1_implies():
    f = costs.train_flops_per_token(V3, 4096)
    assert f["total"] == pytest.approx(250e9, rel=0.01)
    assert f["total"] > costs.train_flops_per_token(V3, 2048)["total"]
    t = costs.training(V3, costs.Scenario())
    # 14.8T tokens x 250.5 GFLOP in 2,664K hours = 386.5 TFLOP/s per H800 = 39% of 989.5 dense BF16.
    achieved = 14.8e12 * f["total"] / (2_664_000 * 3600)
    assert t["implied_mfu_bf16"] == pytest.approx(achieved / 989.5e12, rel=1e-12)
    assert 0.385 < t["implied_mfu_bf16"] < 0.395
    fp8 = costs.training(V3, costs.Scenario(mfu_basis="fp8"))
    assert fp8["implied_mfu"] == pytest.approx(t["implied_mfu"] / 2, rel=1e-12)
    assert fp8["total_gpu_hours"] == 2_788_000  # the same sustained throughput, named on another basis


def test_mfu_basis_changes_gpu_hours_by_exactly_two_at_the_same_mfu():
    bf16 = costs.training(V3, costs.Scenario(mfu=0.35, mfu_basis="bf16"))
    fp8 = costs.training(V3, costs.Scenario(mfu=0.35, mfu_basis="fp8"))
    # 35% of the FP8 dense peak is twice the FLOP/s of 35% of the BF16 dense peak.
    assert bf16["total_gpu_hours"] == pytest.approx(2 * fp8["total_gpu_hours"], rel=1e-12)
    for a, b in zip(bf16["phases"], fp8["phases"]):
        assert a["gpu_hours"] == pytest.approx(2 * b["gpu_hours"], rel=1e-12)


def test_user_mfu_gives_hours_from_first_principles():
    gpu = costs.find_gpu("H100-SXM")
    t = costs.training(V3, costs.Scenario(gpu="H100-SXM", mfu=0.4, tokens=2e12, context=8192, gpus=1024, price=3.0))
    f = costs.train_flops_per_token(V3, 8192)["total"]
    hours = 2e12 * f / (gpu.bf16_dense_tflops * 1e12 * 0.4) / 3600
    pre = t["phases"][0]
    assert pre["gpu_hours"] == pytest.approx(hours, rel=1e-12)
    assert pre["days"] == pytest.approx(hours / 1024 / 24, rel=1e-12)
    assert pre["usd"] == pytest.approx(3.0 * hours, rel=1e-12)
    assert t["gpu_hours_per_trillion"] == pytest.approx(hours / 2, rel=1e-12)


def test_calibrated_mfu_moves_with_gpu_tokens_cluster_and_price():
    base = costs.training(V3, costs.Scenario())
    b200 = costs.training(V3, costs.Scenario(gpu="B200"))
    assert b200["total_gpu_hours"] == pytest.approx(2_788_000 * 989.5 / 2250, rel=1e-12)
    assert costs.training(V3, costs.Scenario(gpu="H100-SXM"))["total_gpu_hours"] == base["total_gpu_hours"]
    one_t = costs.training(V3, costs.Scenario(tokens=1e12))
    assert one_t["phases"][0]["gpu_hours"] == pytest.approx(180_000, rel=1e-12)
    half = costs.training(V3, costs.Scenario(gpus=1024))
    assert half["total_days"] == pytest.approx(2 * base["total_days"], rel=1e-12)
    assert costs.training(V3, costs.Scenario(price=3.0))["total_usd"] == pytest.approx(1.5 * 5_576_000, rel=1e-12)
    # A model with fewer activated parameters needs proportionally fewer hours at the same MFU.
    lite = costs.training(load_preset("deepseek-v2-lite"), costs.Scenario())
    ratio = costs.train_flops_per_token(load_preset("deepseek-v2-lite"), 4096)["total"] / \
        costs.train_flops_per_token(V3, 4096)["total"]
    assert lite["total_gpu_hours"] == pytest.approx(2_788_000 * ratio, rel=1e-12)


# ---- parameters ------------------------------------------------------------------------------
def test_v3_parameter_counts_and_the_activated_convention():
    p = costs.count_params(V3)
    assert rel(p.main_total, 671.0e9) < 0.005
    assert 11.5e9 <= p.mtp_total <= 11.62e9  # README_WEIGHTS: 11.5B unique
    # Activated without the embedding lookup (head included) is within 0.5% of README_WEIGHTS' 36.7B.
    assert rel(p.main_active, 36.7e9) < 0.005
    assert p.main_active_with_embedding == p.main_active + 129280 * 7168
    assert rel(p.main_active_with_embedding, 37.55e9) < 0.001
    assert p.total["embedding"] == p.total["head"] == 129280 * 7168  # 0.9B each
    assert rel(p.checkpoint_total, 685e9) < 0.005  # the hub's "685B"


def test_v3_counts_agree_with_a_closed_form():
    d, h, L, v = 7168, 128, 61, 129280
    attn = d * 1536 + 1536 + 1536 * h * 192 + d * 576 + 512 + 512 * h * 256 + h * 128 * d
    expert = 3 * d * 2048
    moe_layer = attn + 2 * d + 256 * expert + expert + 256 * d + 256
    dense_layer = attn + 2 * d + 3 * d * 18432
    main = 3 * dense_layer + 58 * moe_layer + 2 * v * d + d
    active = 3 * dense_layer + 58 * (attn + 2 * d + 9 * expert + 256 * d + 256) + v * d + d
    mtp = moe_layer + 3 * d + 2 * d * d
    p = costs.count_params(V3)
    assert (p.main_total, p.main_active, p.mtp_total) == (main, active, mtp)
    assert main == 671_026_419_200


@pytest.mark.parametrize("preset,total,active", [
    ("deepseek-v2", 236e9, 21e9),  # DeepSeek-V2 model card
    ("deepseek-v2-lite", 15.7e9, 2.4e9),  # DeepSeek-V2-Lite model card
])
def test_other_presets_match_their_model_cards(preset, total, active):
    p = costs.count_params(load_preset(preset))
    assert rel(p.main_total, total) < 0.01
    assert rel(p.main_active, active) < 0.03
    assert p.mtp_total == 0


def _scan(folder: Path) -> tuple[int, int]:
    """(parameters without scales, bytes of all tensors) from the safetensors headers on disk."""
    params = nbytes = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            nbytes += info["data_offsets"][1] - info["data_offsets"][0]
            if not name.endswith("_scale_inv"):
                params += math.prod(info["shape"])
    return params, nbytes


def test_counts_match_a_real_tiny_fp8_checkpoint(tiny_fp8):
    """Parameters and bytes (FP8 weights, their block scales, BF16 and F32 tensors, the MTP layer and
    its embedding/head copies) against the safetensors headers of a checkpoint in the hub's layout."""
    cfg = load_preset("tiny")
    params, nbytes = _scan(tiny_fp8)
    assert params == costs.count_params(cfg).checkpoint_total
    assert nbytes == costs.weight_bytes(cfg, "fp8", mtp=True, copies=True)["total"]


# ---- inference -------------------------------------------------------------------------------
def test_kv_cache_bytes_per_token():
    assert costs.kv_bytes_per_token(V3, "mla", 2) == 70_272  # 61 x (512 + 64) x 2
    assert costs.kv_bytes_per_token(V3, "mla", 1) == 35_136
    assert costs.kv_bytes_per_token(V3, "mha", 2) == 61 * 128 * (192 + 128) * 2 == 4_997_120
    assert costs.kv_bytes_per_token(V3, "gqa", 2) == 61 * 8 * (192 + 128) * 2 == 312_320


def test_fp8_checkpoint_size_and_min_gpus():
    files = costs.weight_bytes(V3, "fp8", mtp=True, copies=True)["total"]
    assert 685e9 < files < 692e9  # the hub's V3: about 688 GB in 163 shards
    for gpu, want in (("H800", 10), ("H200", 6), ("B200", 5), ("MI300X", 5)):
        s = costs.serving(V3, costs.Scenario(gpu=gpu, batch=32, context=4096), "fp8")
        g = costs.find_gpu(gpu)
        need = costs.weight_bytes(V3, "fp8", mtp=True)["total"] + 32 * 4096 * 70_272
        assert s["min_gpus"] == math.ceil(need / (g.hbm_gb * 1e9 * costs.HBM_USABLE)) == want


def test_decode_roofline_at_batch_one_reads_the_weights_eight_experts_touch():
    g = costs.find_gpu("H200")
    s = costs.serving(V3, costs.Scenario(gpu="H200", batch=1, context=4096), "fp8")
    expert = costs.routed_expert_bytes(V3, "fp8")
    main = costs.weight_bytes(V3, "fp8")["total"]
    read = main - 58 * 256 * expert + 58 * 8 * expert + 4096 * 70_272
    assert s["decode_binds"] == "memory"
    assert s["decode_tokens_per_s"] == pytest.approx(s["gpus"] * g.hbm_tbps * 1e12 / read, rel=1e-9)
    big = costs.serving(V3, costs.Scenario(gpu="H200", batch=4096, context=256, gpus=64), "fp8")
    assert big["decode_binds"] == "compute" and big["prefill_binds"] == "compute"
    assert big["usd_per_million_output"] < s["usd_per_million_output"]


def test_serving_economics_and_deployment_units():
    ps = costs.published_serving()
    assert rel(ps["nodes"], 226.75) < 0.001
    assert rel(ps["cost_per_day"], 87_072) < 0.001
    assert rel(ps["revenue_per_day"], 562_027) < 0.001
    assert rel(ps["margin"], (562_027 - 87_072) / 87_072) < 0.001
    assert round(100 * ps["margin"]) == 545
    assert (ps["prefill_tokens_per_s_per_node"], ps["decode_tokens_per_s_per_node"]) == (73_700, 14_800)
    assert ps["published"]["cost_per_day_at_published_nodes"] == 87_072  # 226.75 x 8 x 24 x $2
    units = {u["stage"]: u for u in costs.deployment_units(V3)}
    assert (units["prefill"]["gpus"], units["prefill"]["nodes"], units["prefill"]["experts_per_gpu"]) == (32, 4, 9)
    assert (units["decode"]["gpus"], units["decode"]["nodes"], units["decode"]["experts_per_gpu"]) == (320, 40, 1)


def test_gpu_catalog_has_sources_and_dense_peaks_apart_from_sparse():
    names = {g.name for g in costs.gpu_catalog()}
    assert {"H800", "H100-SXM", "H200", "B200", "A100-SXM", "MI300X"} <= names
    for g in costs.gpu_catalog():
        assert g.source and g.hbm_gb > 0 and g.hbm_tbps > 0 and g.interconnect
        assert g.bf16_sparse_tflops == pytest.approx(2 * g.bf16_dense_tflops, rel=1e-3)
        if g.fp8_dense_tflops is not None:
            assert g.fp8_dense_tflops == pytest.approx(2 * g.bf16_dense_tflops, rel=1e-3)
    h800 = costs.find_gpu("h800")
    assert (h800.bf16_dense_tflops, h800.fp8_dense_tflops, h800.interconnect_gbps) == (989.5, 1979.0, 400)
    assert costs.find_gpu("H100").name == "H100-SXM"


def test_every_preset_estimates():
    from dsv3cli.config import preset_names

    for name in preset_names():
        r = costs.estimate(load_preset(name), costs.Scenario(), model=name)
        assert set(r["sections"]) == set(costs.SECTIONS)


# ---- the command -----------------------------------------------------------------------------
def test_cli_default_shows_table_1_and_the_serving_row():
    r = runner.invoke(app, ["estimate-cost"])
    assert r.exit_code == 0, r.output
    for s in ("2,664,000", "119,000", "5,000", "2,788,000", "$5,328,000", "$238,000", "$10,000", "$5,576,000",
              "180,000", "39.1%", "70,272", "35,136", "671.03B", "36.63B", "226.75", "$87,072", "73,700",
              "14,800", "$562,027", "545.0%", "MI300X"):
        assert s in r.output, s


def test_cli_json_is_one_document_with_every_table():
    r = runner.invoke(app, ["estimate-cost", "--json", "--preset", "deepseek-v3"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    tables = {t["key"]: t for ts in doc["sections"].values() for t in ts}
    assert {"params", "training_phases", "kv_cache", "serving", "published_serving", "gpus"} <= set(tables)
    phases = tables["training_phases"]["rows"]
    assert [p["gpu_hours"] for p in phases] == [2_664_000, 119_000, 5_000, 2_788_000]
    assert tables["kv_cache"]["rows"][0]["bytes"] == 70_272
    assert doc["inputs"]["gpu"] == "H800" and doc["inputs"]["training_gpus"] == 2048


def test_json_holds_every_number_the_tables_show():
    args = ["estimate-cost", "--gpu", "H200", "--mfu", "0.3", "--batch-size", "8", "--max-seq-len", "16384"]
    md = runner.invoke(app, [*args, "--format", "markdown"]).stdout
    doc = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    shown = 0
    for tables in doc["sections"].values():
        for t in tables:
            assert f"### {t['title']}" in md
            for row in t["rows"]:
                fmts = {**{c["key"]: c["format"] for c in t["columns"]}, **row.get("_fmt", {})}
                cells = [costs.format_value(row.get(c["key"]), fmts[c["key"]]) for c in t["columns"]]
                assert "| " + " | ".join(cells) + " |" in md, cells
                shown += len(cells)
    assert shown > 200


def test_cli_sections_and_formats():
    r = runner.invoke(app, ["estimate-cost", "--section", "gpus", "--format", "csv"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert {row["GPU"] for row in rows} >= {"H800", "B200", "MI300X"}
    assert all(row["source"] for row in rows)
    r = runner.invoke(app, ["estimate-cost", "--section", "training", "--format", "markdown", "--gpu", "B200", "--mfu", "0.4"])
    assert r.exit_code == 0, r.output
    assert "| pre-training |" in r.stdout and "Parameters" not in r.stdout
    r = runner.invoke(app, ["estimate-cost", "--preset", "kimi-k2", "--section", "params", "--json"])
    assert json.loads(r.stdout)["sections"]["params"][0]["rows"][-1]["params"] > 1e12


@pytest.mark.parametrize("args,code,words", [
    (["--gpu", "Z9000"], 2, ["Z9000", "H800", "MI300X"]),
    (["--preset", "llama"], 2, ["llama", "deepseek-v3", "kimi-k2"]),
    (["--mfu", "0"], 2, ["--mfu"]),
    (["--mfu", "1.5"], 2, ["--mfu"]),
    (["--mfu", "-0.2"], 2, ["--mfu"]),
    (["--tokens", "0"], 2, ["--tokens"]),
    (["--tokens", "-5T"], 2, ["--tokens"]),
    (["--tokens", "lots"], 2, ["--tokens"]),
    (["--price", "0"], 2, ["--price"]),
    (["--price", "-2"], 2, ["--price"]),
    (["--gpus", "0"], 2, ["--gpus"]),
    (["--gpus", "1.5"], 2, ["--gpus"]),
    (["--max-seq-len", "0"], 2, ["--max-seq-len"]),
    (["--batch-size", "-1"], 2, ["--batch-size"]),
    (["--context", "0"], 2, ["--max-seq-len"]),  # the old spellings, hidden
    (["--batch", "-1"], 2, ["--batch-size"]),
    (["--mfu-basis", "fp4"], 2, ["--mfu-basis"]),
    (["--gpu", "A100", "--mfu-basis", "fp8"], 2, ["A100", "FP8"]),
    (["--section", "dollars"], 2, ["--section"]),
    (["--format", "xml"], 2, ["--format"]),
    (["--preset", "tiny", "--config", "x.json"], 2, ["--config", "--preset"]),
])
def test_cli_bad_options_are_one_line(args, code, words):
    r = runner.invoke(app, ["estimate-cost", *args])
    assert r.exit_code == code, r.output
    err = r.stderr.strip()
    assert "\n" not in err and err.startswith("Error:"), err
    for w in words:
        assert w in err, (w, err)
    assert "Traceback" not in r.output


def test_cli_bad_config_files(tmp_path):
    good = json.loads((Path(costs.__file__).parent / "presets" / "deepseek-v3.json").read_text())
    other = tmp_path / "llama.json"
    other.write_text(json.dumps({**good, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({k: v for k, v in good.items() if k not in ("kv_lora_rank", "vocab_size")}))
    cases = [(other, ["llama"]), (missing, ["kv_lora_rank", "vocab_size"]), (tmp_path / "nope.json", ["nope.json"])]
    for key, value in (("num_attention_heads", 0), ("hidden_size", "big"), ("num_hidden_layers", 2.5),
                       ("n_routed_experts", -1), ("rms_norm_eps", "tiny")):
        bad = tmp_path / f"{key}.json"
        bad.write_text(json.dumps({**good, key: value}))
        cases.append((bad, [f"{key}.json", key, json.dumps(value)]))
    for path, words in cases:
        r = runner.invoke(app, ["estimate-cost", "--config", str(path)])
        assert r.exit_code == 1, r.output
        err = r.stderr.strip()
        assert "\n" not in err and all(w in err for w in words), err
    ok = tmp_path / "v3.json"
    ok.write_text(json.dumps(good))
    r = runner.invoke(app, ["estimate-cost", "--config", str(ok), "--section", "training", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["sections"]["training"][1]["rows"][-1]["gpu_hours"] == 2_788_000


def test_estimate_cost_never_imports_torch():
    code = ("import sys; from dsv3cli.app import app\n"
            "try:\n    app(['estimate-cost', '--json'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
