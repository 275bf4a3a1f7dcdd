"""benchmarks/memory_sharded.py: the per-rank arithmetic, the --sharded --quick run;
benchmarks/memory_ranks.py's helpers for checking it against 2 CPU ranks."""

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
    assert set(fsdp) == {"root_embed_norm_lm_head", "decoder_layer"}


def test_fsdp2_prefalign_adds_the_root_buffer_and_the_head_copy(ms):
    head = 2 * 512 * 64
    root = 2 * head + 2 * 64
    ours = ms.per_rank_gathered(TINY, 2, False, "fsdp2", "prefalign")
    # The head gathered by full_tensor after the forward, while the root is
    # gathered again: all-gather buffer and unsharded copy alive together.
    assert ours["root_all_gather_buffer"] == root
    assert ours["lm_head_full_tensor"] == head
    stock = ms.per_rank_gathered(TINY, 2, False, "fsdp2", "stock")
    assert sum(ours.values()) - sum(stock.values()) == root + head
    # ZeRO-3 gathers the head once for either loss.
    assert ms.per_rank_gathered(TINY, 2, True, "zero3", "prefalign") == (
        ms.per_rank_gathered(TINY, 2, True, "zero3", "stock")
    )


def test_predict_adds_measured_step_to_computed_shards(ms):
    scenario = {"model": TINY, "layers": 2, "nf4": False, "engine": "fsdp2"}
    steps = {1024: {"at_target_gib": 1.0}, 2048: {"at_target_gib": 3.0}}
    settings = {"seq": 2048, "length_step": 128}
    fixed = ms.predict(
        scenario,
        {1024: {"at_target_gib": 0.0}},
        2,
        99.0,
        settings | {"seq": 1024},
        "stock",
    )["peak_gib"]
    got = ms.predict(scenario, steps, 2, fixed + 2.0, settings, "stock")
    assert got["peak_gib"] == pytest.approx(fixed + 3.0)
    assert got["per_length_peak_gib"][1024] == pytest.approx(fixed + 1.0)
    # fixed + 2 GiB crosses halfway between 1024 and 2048.
    assert (got["longest_under_cap"], got["longest_how"]) == (1536, "interpolated")
    assert got["longest_under_cap_with_margin"] is None  # + 2 GiB: none fits


def test_scenarios_reuse_the_benchmark_shapes(ms):
    import memory_predict as mp
    import workload

    assert ms.SCENARIOS["llama3-70b-qlora-zero3"]["model"] is workload.LLAMA3_70B_WIDTH
    assert ms.SCENARIOS["llama3-8b-lora-fsdp2"]["model"] is workload.LLAMA3_8B_WIDTH
    assert mp.SETTINGS["full"]["model"] is workload.LLAMA3_8B_WIDTH


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


# -- benchmarks/memory_ranks.py: the arithmetic checked against 2 CPU ranks ----------
@pytest.fixture()
def mr(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import memory_ranks

    return memory_ranks


def test_zero3_json_auto_values_filled_as_the_hf_trainer_fills_them(mr, tmp_path):
    config = mr.zero3_config(mr.ZERO3_JSON, hidden=256, world=2)
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 256 * 256
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 256 * 256)
    assert zero["stage3_param_persistence_threshold"] == 2560
    assert (config["train_batch_size"], config["gradient_clipping"]) == (2, 1.0)
    # The user's settings stay as the file has them.
    assert (zero["stage"], zero["stage3_max_live_parameters"]) == (3, 0)
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 3, "offload_param": "auto"}}')
    with pytest.raises(ValueError, match=r"ds\.json: 'auto' left.*offload_param"):
        mr.zero3_config(bad, hidden=256, world=2)


def test_computed_rank_bytes_split_parameters_from_states(mr):
    parts = mr.ms.model_parts(TINY, 2, False, False)
    base = parts["decoder"] + parts["norms"] + parts["embed"] + parts["lm_head"]
    lora = parts["lora_params"]
    z3 = mr.computed(TINY, 2, "zero3", 2, "stock")
    # ZeRO-3: bf16 LoRA parameter; fp32 master, gradient, m, v in the states.
    assert z3["params"] == pytest.approx((base + 2 * lora) / 2)
    assert z3["other_states"] == pytest.approx(16 * lora / 2)
    assert z3["held"] == pytest.approx(z3["params"] + z3["other_states"])
    assert z3["gathered"] == 2 * 512 * 64 + 2 * 36864 + 2 * 16 * 1024 + 2 * 64 * 64
    fsdp = mr.computed(TINY, 2, "fsdp2", 2, "stock")
    # FSDP2: PEFT's fp32 LoRA parameter; fp32 gradient, m, v.
    assert fsdp["params"] == pytest.approx((base + 4 * lora) / 2)
    assert fsdp["other_states"] == pytest.approx(12 * lora / 2)


def test_compare_leaves_the_batch_out_of_held_and_peak(mr):
    measured = {
        "param_bytes": 110,
        "baseline_bytes": 330,
        "batch_bytes": 30,
        "peak_bytes": 530,
    }
    comp = {"params": 100, "held": 300, "gathered": 50}
    got = mr.compare(measured, comp, step_bytes=150, predicted=500)
    assert got["params"] == {"measured": 110, "computed": 100, "rel": 0.1}
    assert got["held"]["measured"] == 300 and got["held"]["rel"] == 0
    assert got["above_held"] == {"measured": 200, "computed": 200, "rel": 0}
    assert got["peak"]["measured"] == 500 and got["peak"]["rel"] == 0


def test_storage_bytes_counts_a_flat_buffer_once(mr):
    import torch

    flat = torch.zeros(100)  # 400 B, two parameter views into it
    other = torch.zeros(10, dtype=torch.bfloat16)  # 20 B
    assert mr.storage_bytes([flat[:50], flat[50:], other, other[2:]]) == 420


def test_rank_live_bytes_follow_a_storage_resized_in_place(mr):
    import torch

    # FSDP2's all-gather grows a parameter's storage in place and frees it by
    # shrinking it to 0 bytes: no ATen op shows either.
    unsharded = torch.empty(0)
    with mr.RankLiveBytes() as tracker:
        tracker.add_all([unsharded])
        tracker.reset_peak()
        unsharded.untyped_storage().resize_(4000)
        grown = tracker.current
        unsharded.untyped_storage().resize_(0)
    assert (grown, tracker.peak, tracker.current) == (4000, 4000, 0)
    unsharded.untyped_storage().resize_(8)  # the patch is gone after the block
    assert tracker.current == 0


def test_ranks_table_shows_measured_computed_and_difference(mr):
    mib = 2**20
    row = {"engine": "zero3", "config": "prefalign", "rank": 1}
    row["peak_at"] = {"phase": "backward", "op": "mm"}
    row["compare"] = {
        c: {"measured": 3 * mib, "computed": 2 * mib, "rel": 0.5}
        for c in ("params", "held", "above_held", "peak")
    }
    text = mr.table([row])
    assert "| zero3 | prefalign | 1 | 3.0 / 2.0 (+50%) |" in text
    assert text.endswith("| 3.0 / 2.0 (+50%) | backward/mm |")
