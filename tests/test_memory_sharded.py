"""benchmarks/memory_sharded.py: the per-rank arithmetic, the --sharded --quick run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
TINY = {"vocab": 512, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128}
GIB = 2**30


@pytest.fixture()
def ms(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import memory_sharded

    return memory_sharded


def test_model_parts_by_hand(ms):
    # Per layer: q 64×64, k, v 64×32, o 64×64, gate, up 64×128, down 128×64.
    bf16 = ms.model_parts(TINY, 2, nf4=False, double_quant=False)
    assert bf16["decoder_layer"] == 2 * 36864
    assert bf16["decoder"] == 2 * 2 * 36864
    assert bf16["quant_stats"] == 0
    assert bf16["lm_head"] == bf16["embed"] == 2 * 512 * 64
    assert bf16["norms"] == 2 * 64 * 5
    assert bf16["lora_params"] == 2 * 16 * (128 + 96 + 96 + 128 + 3 * 192)
    nf4 = ms.model_parts(TINY, 1, nf4=True, double_quant=False)
    assert nf4["decoder_layer"] == 36864 // 2
    # fp32 absmax per 64-block and a 16-entry fp32 code, per weight (7 of them).
    assert nf4["quant_stats"] == 36864 // 64 * 4 + 7 * 64
    dq = ms.model_parts(TINY, 1, nf4=True, double_quant=True)
    # uint8 absmax per block, fp32 offset and two codes per weight (no block
    # here reaches 256, the second-level block).
    assert dq["quant_stats"] == 36864 // 64 + 7 * (4 + 2 * 64)


def test_per_rank_shards_what_the_engine_shards(ms):
    one = ms.per_rank_held(TINY, 2, True, "zero3", 1)
    four = ms.per_rank_held(TINY, 2, True, "zero3", 4)
    assert four["base_shard"] == pytest.approx(one["base_shard"] / 4)
    assert four["lora_states_shard"] == pytest.approx(one["lora_states_shard"] / 4)
    # NF4 statistics are not parameters: ZeRO-3 leaves them whole on every rank.
    assert four["quant_stats_whole"] == one["quant_stats_whole"] > 0
    lora = ms.model_parts(TINY, 2, True, True)["lora_params"]
    assert one["lora_states_shard"] == 18 * lora
    assert ms.per_rank_held(TINY, 2, False, "fsdp2", 1)["lora_states_shard"] == (
        16 * lora
    )


def test_gathered_head_and_fsdp2_root(ms):
    head = 2 * 512 * 64
    z3 = ms.per_rank_gathered(TINY, 2, True, "zero3")
    assert z3["lm_head"] == head
    assert z3["reduce_bucket"] == 2 * 64 * 64
    fsdp = ms.per_rank_gathered(TINY, 2, False, "fsdp2")
    # The root unit (embeddings, final norm, lm_head) stays whole through the step.
    assert fsdp["root_embed_norm_lm_head"] == 2 * head + 2 * 64
    assert fsdp["decoder_layer"] == 2 * 36864 + 2 * 16 * 1024


def test_predict_adds_measured_step_to_computed_shards(ms):
    scenario = {"model": TINY, "layers": 2, "nf4": False, "engine": "fsdp2"}
    steps = {1024: {"at_target_gib": 1.0}, 2048: {"at_target_gib": 3.0}}
    settings = {"seq": 2048, "length_step": 128}
    fixed = ms.predict(
        scenario, {1024: {"at_target_gib": 0.0}}, 2, 99.0, settings | {"seq": 1024}
    )["peak_gib"]
    got = ms.predict(scenario, steps, 2, fixed + 2.0, settings)
    assert got["peak_gib"] == pytest.approx(fixed + 3.0)
    assert got["per_length_peak_gib"][1024] == pytest.approx(fixed + 1.0)
    # fixed + 2 GiB crosses halfway between 1024 and 2048.
    assert (got["longest_under_cap"], got["longest_how"]) == (1536, "interpolated")
    assert got["longest_under_cap_with_margin"] is None  # + 2 GiB: none fits


def test_scenarios_reuse_the_benchmark_shapes(ms):
    import memory_predict as mp

    assert ms.SCENARIOS["llama3-70b-qlora-zero3"]["model"] is mp.LLAMA3_70B_WIDTH
    assert ms.SCENARIOS["llama3-8b-lora-fsdp2"]["model"] is mp.LLAMA3_8B_WIDTH


@pytest.mark.slow  # the --sharded --quick run: about 40 s on 2 busy cores
def test_sharded_quick_run(tmp_path):
    out = tmp_path / "sharded.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AXOLOTL_DO_NOT_TRACK": "1"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "memory_predict.py"), "--sharded", "--quick"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "PREDICTION" in report["label"] and "PREDICTION" in proc.stdout
    for entry in report["scenarios"].values():
        for config in ("stock", "prefalign"):
            for step in entry[config]["measured_step"].values():
                # The computed single-process baseline is the measured one.
                assert abs(step["baseline_computed_vs_measured_rel"]) < 1e-6
                assert step["fit"]["max_abs_residual"] < 1e-9
        for stock, ours in zip(
            entry["stock"]["worlds"], entry["prefalign"]["worlds"], strict=True
        ):
            assert ours["peak_gib"] < stock["peak_gib"]


def test_longest_past_the_measured_lengths_is_extrapolated(ms):
    pts = [(1024, 2.0), (2048, 4.0)]
    assert ms.longest(pts, 3.0, 128) == (1536, "interpolated")
    assert ms.longest(pts, 9.0, 128) == (4608, "extrapolated")
    assert ms.longest(pts, 1.0, 128) == (None, "none_measured_fits")
