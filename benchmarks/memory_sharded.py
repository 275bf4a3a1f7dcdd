"""Per-rank GPU memory of one DPO step under DeepSpeed ZeRO-3 or FSDP2: a PREDICTION.

    python benchmarks/memory_predict.py --sharded          # ~2 min on one core
    python benchmarks/memory_predict.py --sharded --quick  # tiny shapes (tests)

Each rank trains its own micro-batch (one pair), so a rank's peak is

    peak = step(T, L)  +  held / N  +  gathered

- `step(T, L)` is MEASURED: live bytes of one step above its baseline (activations,
  checkpointed hidden states, the logits or the fused head's chunks, dequantized NF4
  weights, LoRA gradients), from memory_predict's fake steps at the target width
  and 1 and 2 layers, fitted a + b·L per length and evaluated at the target depth.
  Data parallelism leaves this part whole on every rank.
- `held / N` is COMPUTED: what lives through the step (frozen base, embeddings,
  lm_head, LoRA parameters with the engine's master copy, gradient and AdamW
  states), divided over the N ranks; the NF4 quantization statistics (absmax) are
  not parameters, so ZeRO-3 leaves them whole on every rank.
- `gathered` is COMPUTED: what the engine holds whole at the peak. ZeRO-3 (Axolotl's
  zero3_bf16.json: max_live_parameters 0): the lm_head (V·H bf16, gathered by the
  logits pass or by prefalign's fused path), one decoder layer and the reduce
  bucket (H² bf16). FSDP2 (Axolotl's fsdp2_prepare_model: a unit per decoder layer,
  the root holding embeddings, final norm and lm_head, resharded after forward):
  the root's parameters through forward and backward, and one decoder layer; with
  prefalign also the root's all-gather buffer (alive beside the unsharded root while
  it is gathered again) and the head copy the fused path gathers (`full_tensor`).

The computed single-process baseline is checked against the measured one (same
model, no engine). Not counted: the CUDA context and allocator (memory_predict's
2 GiB margin is added in the "with margin" columns), NCCL buffers, DeepSpeed's
prefetch of the next layer, fragmentation.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import memory_predict as mp
from workload import LLAMA3_8B_WIDTH, LLAMA3_70B_WIDTH, write_report

LORA_R = 16
# Bytes per trainable (LoRA) parameter on a rank, before dividing by N.
# ZeRO-3, bf16: bf16 parameter + fp32 master + fp32 gradient partition + AdamW m, v.
# FSDP2: PEFT keeps adapters in fp32 (autocast_adapter_dtype), fp32 gradient, m, v.
TRAINABLE_BYTES = {"zero3": 2 + 4 + 4 + 8, "fsdp2": 4 + 4 + 8}
SCENARIOS = {
    "llama3-70b-qlora-zero3": {
        "model": LLAMA3_70B_WIDTH,
        "layers": 80,
        "nf4": True,
        "engine": "zero3",
        "worlds": [[2, 80.0], [4, 24.0], [8, 24.0]],
    },
    "llama3-8b-lora-fsdp2": {
        "model": LLAMA3_8B_WIDTH,
        "layers": 32,
        "nf4": False,
        "engine": "fsdp2",
        "worlds": [[2, 24.0]],
    },
}
FULL = {
    "scenarios": SCENARIOS,
    "fit_layers": [1, 2],
    "seq": 2048,
    # Past 4096 the fused path's CPU vocabulary tiles make a fake step slow; the
    # step is linear in length here (checkpointed hidden states, the logits), so
    # the longest length is extrapolated from the last two (labelled so).
    "lengths": [1024, 2048, 4096],
    "length_step": 128,
}
QUICK = {
    "scenarios": {
        name: {
            **s,
            "model": mp.SETTINGS["quick"]["model"],
            "layers": 4,
            "worlds": [[2, 0.004]],
        }
        for name, s in SCENARIOS.items()
    },
    "fit_layers": [1, 2],
    "seq": 32,
    "lengths": [32, 64],
    "length_step": 8,
}
CONFIGS = ("stock", "prefalign")


# -- computed bytes ------------------------------------------------------------------
def linear_shapes(spec: dict) -> list[tuple[int, int]]:
    """(in, out) of each decoder linear of a Llama layer: q, k, v, o, gate, up, down."""
    h, i = spec["hidden"], spec["intermediate"]
    kv = spec["kv_heads"] * (h // spec["heads"])
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def nf4_bytes(n: int, double_quant: bool) -> dict:
    """An NF4 weight of n elements (blocksize 64): packed data, and the statistics
    (fp32 absmax per block, or with double quantization uint8 absmax plus an fp32
    absmax per 256 blocks and the fp32 offset), each with its 16-entry fp32 code."""
    blocks = n // 64
    if double_quant:
        stats = blocks + (blocks // 256) * 4 + 4 + 2 * 64
    else:
        stats = blocks * 4 + 64
    return {"packed": n // 2, "stats": stats}


def model_parts(spec: dict, layers: int, nf4: bool, double_quant: bool) -> dict:
    """Bytes of each part of the model (base in bf16 or NF4) and its LoRA size."""
    shapes = linear_shapes(spec)
    h, v = spec["hidden"], spec["vocab"]
    if nf4:
        per = [nf4_bytes(a * b, double_quant) for a, b in shapes]
        layer = sum(p["packed"] for p in per)
        stats = sum(p["stats"] for p in per)
    else:
        layer, stats = sum(2 * a * b for a, b in shapes), 0
    return {
        "decoder_layer": layer,
        "decoder": layer * layers,
        "quant_stats": stats * layers,
        "norms": 2 * h * (2 * layers + 1),
        "embed": 2 * v * h,
        "lm_head": 2 * v * h,
        "lora_params": LORA_R * sum(a + b for a, b in shapes) * layers,
        "lora_tensors": 2 * len(shapes) * layers,
    }


def single_process_baseline(spec: dict, layers: int, nf4: bool, seq: int) -> int:
    """memory_predict's measured baseline, computed: bf16 LoRA with bf16 AdamW m, v
    and an fp32 step per tensor, the batch (3 × [2, T] int64), RoPE's inv_freq."""
    p = model_parts(spec, layers, nf4, double_quant=False)
    head_dim = spec["hidden"] // spec["heads"]
    return (
        p["decoder"]
        + p["quant_stats"]
        + p["norms"]
        + p["embed"]
        + p["lm_head"]
        + 6 * p["lora_params"]
        + 4 * p["lora_tensors"]
        + 3 * 2 * seq * 8
        + 2 * (head_dim // 2) * 4
    )


def per_rank_held(spec: dict, layers: int, nf4: bool, engine: str, world: int):
    """What each rank keeps through the step (bytes, by part), COMPUTED."""
    p = model_parts(spec, layers, nf4, double_quant=True)
    base = p["decoder"] + p["norms"] + p["embed"] + p["lm_head"]
    return {
        "base_shard": base / world,
        "quant_stats_whole": p["quant_stats"],
        "lora_states_shard": TRAINABLE_BYTES[engine] * p["lora_params"] / world,
    }


def per_rank_gathered(
    spec: dict, layers: int, nf4: bool, engine: str, config: str = "stock"
) -> dict:
    """What the engine holds whole on each rank at the peak, beyond its shard.

    FSDP2 with prefalign: the fused loss reads the head after the forward, when the
    root is resharded, so `full_tensor` gathers the head (one V·H copy), and the
    peak comes while the root is gathered again for the next forward: FSDP2's
    all-gather output buffer and the unsharded parameters it is copied into are
    alive together (twice the root). The 2-rank CPU check (memory_ranks.py) put
    the peak there, with these parts among its largest tensors."""
    p = model_parts(spec, layers, nf4, double_quant=True)
    lora_layer = 2 * LORA_R * sum(a + b for a, b in linear_shapes(spec))
    layer = p["decoder_layer"] + lora_layer
    if engine == "zero3":
        return {
            "lm_head": p["lm_head"],
            "decoder_layer": layer,
            "reduce_bucket": 2 * spec["hidden"] ** 2,
        }
    root = p["embed"] + p["lm_head"] + 2 * spec["hidden"]
    parts = {"root_embed_norm_lm_head": root, "decoder_layer": layer}
    if config == "prefalign":
        parts["root_all_gather_buffer"] = root
        parts["lm_head_full_tensor"] = p["lm_head"]
    return parts


# -- measured step ---------------------------------------------------------------------
def step_fit(setup, settings: dict, scenario: dict, config: str, rows: list) -> dict:
    """Per length: the step's bytes above its baseline at 1, 2 layers (MEASURED,
    fake), fitted a + b·L, at the target depth; with the baseline check."""
    out = {}
    ls = settings["fit_layers"]
    for seq in settings["lengths"]:
        above, checks = [], []
        for layers in ls:
            row = mp.measure(
                setup,
                scenario["model"],
                layers,
                seq,
                config,
                "fake",
                nf4=scenario["nf4"],
            )
            rows.append(row)
            above.append(row["peak_above_baseline_gib"])
            computed = single_process_baseline(
                scenario["model"], layers, scenario["nf4"], seq
            )
            checks.append(computed / mp.GIB / row["baseline_gib"] - 1)
        fit = mp.linear_fit(ls, above)
        out[seq] = {
            "above_baseline_gib": dict(zip(ls, above, strict=True)),
            "fit": fit,
            "at_target_gib": fit["a"] + fit["b"] * scenario["layers"],
            "baseline_computed_vs_measured_rel": max(checks, key=abs),
        }
        mp.log(
            f"{config:10s} seq={seq:5d}: step {out[seq]['at_target_gib']:.2f} GiB "
            f"at {scenario['layers']} layers"
        )
    return out


def longest(points: list[tuple[int, float]], cap: float, step: int):
    """memory_predict.longest_under, and past the last measured length the line
    through the last two ("extrapolated")."""
    n, how = mp.longest_under(points, cap, step)
    if how != "at_least" or len(points) < 2:
        return n, how
    (s0, p0), (s1, p1) = sorted(points)[-2:]
    return int((s1 + (cap - p1) * (s1 - s0) / (p1 - p0)) // step * step), (
        "extrapolated"
    )


def predict(
    scenario: dict, steps: dict, world: int, cap: float, settings, config: str
) -> dict:
    """Per-rank peak per length and the longest length under the cap (+ margin)."""
    spec, layers, nf4 = scenario["model"], scenario["layers"], scenario["nf4"]
    held = per_rank_held(spec, layers, nf4, scenario["engine"], world)
    gathered = per_rank_gathered(spec, layers, nf4, scenario["engine"], config)
    fixed = (sum(held.values()) + sum(gathered.values())) / mp.GIB
    margin = sum(mp.GPU_MARGIN_GIB.values())
    points = [(seq, fixed + s["at_target_gib"]) for seq, s in steps.items()]
    step = settings["length_step"]
    n, how = longest(points, cap, step)
    n_m, how_m = longest([(s, p + margin) for s, p in points], cap, step)
    return {
        "world": world,
        "cap_gib": cap,
        "computed_held_gib": {k: v / mp.GIB for k, v in held.items()},
        "computed_gathered_gib": {k: v / mp.GIB for k, v in gathered.items()},
        "per_length_peak_gib": dict(points),
        "peak_gib": dict(points)[settings["seq"]],
        "peak_with_margin_gib": dict(points)[settings["seq"]] + margin,
        "longest_under_cap": n,
        "longest_how": how,
        "longest_under_cap_with_margin": n_m,
        "longest_with_margin_how": how_m,
    }


def run(settings: dict, quick: bool) -> dict:
    """Every scenario, config and world size of `settings`."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    setup = mp.Setup()
    report = {
        "benchmark": "memory_predict --sharded",
        "label": "PREDICTION per rank: the step MEASURED as live tensor bytes of fake "
        "CPU steps (one process), the sharded and gathered parameter bytes COMPUTED; "
        "not a GPU measurement",
        "quick": quick,
        "settings": settings,
        "trainable_bytes_per_param": TRAINABLE_BYTES,
        "margin_gib": mp.GPU_MARGIN_GIB,
        "measurements": [],
        "scenarios": {},
    }
    for name, scenario in settings["scenarios"].items():
        entry = {}
        for config in CONFIGS:
            steps = step_fit(setup, settings, scenario, config, report["measurements"])
            entry[config] = {
                "measured_step": steps,
                "worlds": [
                    predict(scenario, steps, n, c, settings, config)
                    for n, c in scenario["worlds"]
                ],
            }
        report["scenarios"][name] = entry
    report["wall_s"] = time.perf_counter() - t0
    report["table"] = table(report)
    return report


def _fmt_len(n, how) -> str:
    if n is None:
        return "none"
    return f"~{n} (extrapolated)" if how == "extrapolated" else str(n)


def table(report: dict) -> str:
    """The per-rank table in Markdown."""
    seq = report["settings"]["seq"]
    margin = sum(report["margin_gib"].values())
    lines = [
        f"PREDICTION per rank (step measured on the CPU, shards computed; "
        f"+{margin:g} GiB margin in the last two columns)",
        f"| scenario | GPUs | config | peak GiB at {seq}+{seq} | longest/side "
        f"| peak + margin GiB | longest/side with margin |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["scenarios"].items():
        for config in CONFIGS:
            for w in entry[config]["worlds"]:
                lines.append(
                    f"| {name} | {w['world']}×{w['cap_gib']:g} GiB | {config} "
                    f"| {w['peak_gib']:.1f} "
                    f"| {_fmt_len(w['longest_under_cap'], w['longest_how'])} "
                    f"| {w['peak_with_margin_gib']:.1f} "
                    f"| {_fmt_len(w['longest_under_cap_with_margin'], w['longest_with_margin_how'])} |"  # noqa: E501
                )
    return "\n".join(lines)


def main(quick: bool = False, out: str | None = None) -> int:
    report = run(QUICK if quick else FULL, quick)
    path = Path(out) if out else None
    if path is None and not quick:
        path = mp.RESULTS / "memory_predict_sharded_cpu.json"
    if path is not None:
        mp.log(f"wrote {write_report(path, report)}")
    print(report["table"])
    print(f"wall {report['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    sys.exit(main(quick="--quick" in argv, out=out))
