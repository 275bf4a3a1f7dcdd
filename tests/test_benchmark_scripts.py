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
