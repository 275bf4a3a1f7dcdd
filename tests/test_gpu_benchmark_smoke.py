"""benchmarks/gpu_dpo_24gb.py: its pieces, a CPU smoke run, and the real GPU run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "gpu_dpo_24gb.py"
CONFIGS = {"stock", "prefalign", "prefalign_packed"}


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_dpo_24gb

    return gpu_dpo_24gb


@pytest.fixture()
def workload(monkeypatch):
    """benchmarks/workload.py: the shapes, model and data every benchmark shares."""
    monkeypatch.syspath_prepend(str(BENCH))
    import workload

    return workload


def test_flops_params_plus_embeddings_and_norms_is_llama3_8b_size(workload):
    spec = workload.LLAMA3_8B
    embedding = spec["vocab"] * spec["hidden"]
    norms = (2 * spec["layers"] + 1) * spec["hidden"]
    # Meta's Llama-3-8B has 8,030,261,248 parameters.
    assert workload.flops_params(spec) + embedding + norms == 8_030_261_248


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_tflops_table(workload, name, tflops):
    assert workload.peak_tflops(name) == tflops


def _fake_runs(bench, monkeypatch, fits_up_to):
    ran = []

    def fake(spec, timeout):
        ran.append(spec["seq"])
        ok = spec["seq"] <= fits_up_to
        return {"seq": spec["seq"], "status": "ok" if ok else "oom", "peak_gib": 1.0}

    monkeypatch.setattr(bench, "run_config", fake)
    monkeypatch.setattr(bench, "_log", lambda r: None)
    return ran


def test_search_goes_up_from_a_fitting_seq_and_stops_at_first_oom(bench, monkeypatch):
    ran = _fake_runs(bench, monkeypatch, fits_up_to=4096)
    main = {"seq": 2048, "status": "ok"}
    found = bench.search_max_seq(
        {"seq": 2048}, main, list(bench.SEARCH_LENGTHS), timeout=1
    )
    assert ran == [3072, 4096, 6144]  # 1024 < a fitting 2048; 8192 after an OOM
    assert found["max_seq_per_side"] == 4096
    assert [a["status"] for a in found["attempts"]] == ["ok", "ok", "ok", "oom"]


def test_search_goes_down_when_seq_does_not_fit(bench, monkeypatch):
    ran = _fake_runs(bench, monkeypatch, fits_up_to=1024)
    main = {"seq": 2048, "status": "oom"}
    found = bench.search_max_seq(
        {"seq": 2048}, main, list(bench.SEARCH_LENGTHS), timeout=1
    )
    assert ran == [1024]
    assert found["max_seq_per_side"] == 1024


def test_pairs_tokenize_to_exactly_seq_tokens_per_side(workload):
    tok = workload.word_tokenizer(500)
    for row in workload.pair_rows(3, seq=40, vocab=500):
        prompt = tok(row["prompt"])["input_ids"]
        chosen = tok(row["prompt"] + row["chosen"] + tok.eos_token)["input_ids"]
        rejected = tok(row["prompt"] + row["rejected"] + tok.eos_token)["input_ids"]
        assert len(prompt) == 10
        assert len(chosen) == len(rejected) == 40
        assert chosen[:10] == prompt and chosen[-1] == tok.eos_token_id
        assert max(chosen) < 500


def test_quantize_swaps_decoder_linears_for_nf4_and_keeps_lm_head(bench, workload):
    import bitsandbytes as bnb
    import torch
    from torch import nn

    spec = {**bench.SMOKE, "attn": "sdpa"}
    model, n = workload.build_model(spec, "cpu", torch.float32)
    assert n == 7 * spec["layers"]
    layer = model.model.layers[0]
    for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
        assert isinstance(lin, bnb.nn.Linear4bit)
        assert lin.weight.dtype == torch.uint8 and lin.weight.quant_type == "nf4"
    assert type(model.lm_head) is nn.Linear
    assert not any(p.requires_grad for p in model.parameters())
    logits = model(torch.randint(3, spec["vocab"], (1, 8))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_cpu_smoke_runs_all_three_configurations(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--cpu-smoke",
            "--steps",
            "1",
            "--no-search",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == CONFIGS
    for r in results.values():
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["tokens_per_step"] == 2 * 64
        assert len(r["step_times_s"]) == 2  # warm-up + 1 timed
    assert report["baseline"] == "axolotl.AxolotlDPOTrainer"
    assert results["stock"]["trainer_class"] == report["baseline"]
    assert results["prefalign"]["trainer_class"] == "axolotl_prefalign"
    assert results["prefalign_packed"]["packing"] is True
    assert results["prefalign"]["packing"] is False
    # Same model, data, seed and sigmoid loss: all three train the same way.
    stock_loss = results["stock"]["train_loss"]
    assert math.isfinite(stock_loss)
    for name in ("prefalign", "prefalign_packed"):
        assert results[name]["train_loss"] == pytest.approx(stock_loss, rel=1e-3)
    assert report["measured"] is False
    assert "| prefalign_packed |" in proc.stdout


@pytest.mark.gpu
def test_gpu_two_layer_run_fits_under_the_cap(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--layers",
            "2",
            "--steps",
            "2",
            "--no-search",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["measured"] is True and report["gpu"]["name"]
    for name, r in report["results"].items():
        if r["status"] == "skipped":  # no Axolotl: our trainer cannot import
            assert name != "stock"
            continue
        assert r["status"] == "ok", r
        assert 0 < r["peak_gib"] <= 24.0
        assert r["tokens_per_s"] > 0
        assert math.isfinite(r["train_loss"])
        if report["gpu"]["peak_bf16_tflops"]:
            assert 0 < r["mfu"] < 1
