"""The benchmark scripts run (tiny shapes): they must not rot between real runs."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_logprob_path_benchmark_runs_plain_fused_and_trl_side_by_side(tmp_path):
    """One tiny case through every path, TRL 1.16's kernel included (installed into
    a side folder from the package index on first use)."""
    out = tmp_path / "lp.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "logprob_path.py"),
            "--case",
            "3000:1x96:32",
            "--repeats",
            "1",
            "--trl-site",
            str(tmp_path / "trl"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["trl"] == "1.16.0"
    (case,) = result["cases"]
    # V = 3000 > 2048 on the CPU: tiled, TILED_CHUNK rows × VOCAB_TILE columns.
    assert (case["fused_chunk_size"], case["fused_vocab_tile"]) == (512, 2048)
    for impl in ("plain", "fused", "trl", "trl_8192"):
        assert case[impl]["max_abs_diff_vs_plain"] < 1e-4, impl
        assert case[impl]["peak_bytes"] > 0 and case[impl]["median_s"] > 0
    assert case["mem_plain_over_fused"] > 1
    assert "| fused |" in proc.stdout and "| trl |" in proc.stdout


def test_contrast_vs_dpo_benchmark_counts_forward_passes_per_arm(tmp_path):
    """--quick: every arm trains on the same pairs; forward passes are counted."""
    out = tmp_path / "cvd.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "contrast_vs_dpo.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    arms = report["results"]["llama128k"]
    assert set(arms) == {"contrast", "prefalign", "prefalign_packed", "stock"}
    counted = {
        a: (r["forward_calls_per_step"], r["sequence_forwards_per_pair"])
        for a, r in arms.items()
    }
    # Contrast: one row per pair, one forward; DPO: policy + reference passes.
    assert counted["contrast"] == (1, 1)
    assert counted["prefalign_packed"] == (2, 2)
    assert counted["prefalign"] == counted["stock"] == (2, 4)
    # One contrast row: the prompt once, both answers (8 + 2 × 23 words) and one
    # EOS; a DPO pair is 2 × 32 tokens (each side's EOS included).
    assert arms["contrast"]["row_tokens_per_step"] == 8 + 2 * 23 + 1
    assert all(r["step_s_median"] > 0 for r in arms.values())
    assert "| llama128k | contrast |" in proc.stdout
