"""Predicted GPU memory of one QLoRA DPO step: live tensor bytes on the CPU.

A `TorchDispatchMode` (`LiveBytes`) sees every ATen op of one training step and
registers each new storage of its outputs once (views share their base's storage and
are not counted again); a `weakref.finalize` on the storage subtracts its bytes when
it is freed. Live bytes = the model's parameters, buffers, NF4 packed weights and
absmax, LoRA parameters and AdamW states present before the step (the baseline) +
every storage born during the step and not yet freed; the peak is the maximum after
each op. That is what `torch.cuda.max_memory_allocated` would count on a GPU, without
the allocator's rounding, caching or fragmentation (docs/memory_prediction.md).

The step is what benchmarks/gpu_check.py runs on the GPU, with its pieces: NF4 base
(bitsandbytes, compute dtype bf16), LoRA r=16 all-linear in bf16, gradient
checkpointing (non-reentrant), bf16 autocast (accelerate), one pair per step;
loss (policy forward of chosen+rejected, reference pass with the adapter disabled),
backward, clip_grad_norm_, AdamW (foreach, as on CUDA). Configurations:

    stock              TRL's own DPOTrainer._compute_loss (gpu_check.stock_loss)
                       (TRL is needed: no copy of its loss stands in)
    prefalign          core.preference.PreferenceStep, padded batch
    prefalign_packed   the same, packed (one row, position ids restart per sequence)

Two ways of running a step:

    real   the step computed on the CPU (real values, bitsandbytes' CPU NF4 kernels)
    fake   the same Python code under FakeTensorMode: every op's output shape, dtype
           and storage size, no arithmetic (bitsandbytes' registered fake kernels for
           the NF4 ops); the ops on the batch's own index tensors run for real, and
           data-dependent results (`.item()`) read as 1

The full Llama-3-8B width (hidden 4096, MLP 14336, 32/8 heads, vocab 128256) runs
fake at 1, 2 and 4 decoder layers, the peak is fitted as a + b·L and extrapolated to
32 layers, per length; the fake shortcut is checked against a real step at full width
(1 layer, short sequences), the extrapolation against every depth of a small model
(real), and the 32-layer prediction against a fake step of the whole 32-layer model.
The tracker is live_bytes.py, the step built and measured memory_step.py; this
module runs the measurements, fits and extrapolates them and writes the report.

    python benchmarks/memory_predict.py            # ~13 min on one core
    python benchmarks/memory_predict.py --quick    # tiny shapes, seconds (tests)
    python benchmarks/memory_predict.py --sharded  # per rank, ZeRO-3 / FSDP2 (~2 min)
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import workload

# GIB and REPO: used by memory_sharded and memory_ranks through this module
from workload import GIB, HERE, LLAMA3_8B_WIDTH, REPO, RESULTS, write_report  # noqa: F401

workload.set_env_defaults(one_thread=True)  # before torch reads the thread count

import torch  # noqa: E402

# The tracker and the step live in their own modules; memory_sharded, memory_ranks,
# contrast_vs_dpo and the tests reach them through this one (hence F401).
from live_bytes import LiveBytes, toy_check  # noqa: E402, F401
from memory_step import MIB, Setup, loss_fn, measure  # noqa: E402, F401

CONFIGS = ("stock", "prefalign", "prefalign_packed")
SETTINGS = {
    "full": {
        "model": LLAMA3_8B_WIDTH,
        "fit_layers": [1, 2, 4],
        "target_layers": 32,
        "seq": 2048,
        "lengths": [1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768],
        "cap_gib": 24.0,
        "length_step": 128,
        # The fake shortcut against a computed step at the full width.
        "real_check": {"layers": 1, "seq": 256},
        # The extrapolation against every depth of a small model, all computed.
        "small": {
            "model": {
                "vocab": 16384,
                "hidden": 512,
                "heads": 8,
                "kv_heads": 2,
                "intermediate": 1792,
            },
            "layers": [1, 2, 4, 8, 16],
            "seq": 256,
        },
        "direct_target": True,
    },
    "quick": {
        "model": {
            "vocab": 512,
            "hidden": 64,
            "heads": 4,
            "kv_heads": 2,
            "intermediate": 128,
        },
        "fit_layers": [1, 2],
        "target_layers": 4,
        "seq": 32,
        "lengths": [32, 64],
        "cap_gib": 0.004,
        "length_step": 8,
        "real_check": {"layers": 1, "seq": 32},
        "small": {
            "model": {
                "vocab": 256,
                "hidden": 32,
                "heads": 4,
                "kv_heads": 2,
                "intermediate": 64,
            },
            "layers": [1, 2, 4],
            "seq": 16,
        },
        "direct_target": True,
    },
}
# Not counted by live bytes, present on a GPU (docs/memory_prediction.md).
GPU_MARGIN_GIB = {
    "cuda_context": 0.75,
    "allocator_and_workspaces": 1.25,
}


# -- fits ----------------------------------------------------------------------------
def linear_fit(xs, ys) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    res = [y - (a + b * x) for x, y in zip(xs, ys, strict=True)]
    return {"a": a, "b": b, "max_abs_residual": max(abs(r) for r in res)}


def longest_under(points: list[tuple[int, float]], cap: float, step: int):
    """Largest length (multiple of `step`) whose peak, linearly interpolated between
    the measured lengths, stays under `cap`; None if even the first does not fit;
    the last measured length (and 'at_least') if all fit."""
    points = sorted(points)
    if points[0][1] > cap:
        return None, "none_measured_fits"
    for (s0, p0), (s1, p1) in zip(points, points[1:], strict=False):
        if p1 > cap:
            s = s0 + (cap - p0) * (s1 - s0) / (p1 - p0)
            return int(s // step * step), "interpolated"
    return points[-1][0], "at_least"


# -- the run -------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[memory_predict] {msg}", file=sys.stderr, flush=True)


def run(settings: dict, quick: bool) -> dict:
    """Every measurement of `settings`, the fits and the prediction, as one report."""
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    setup = Setup()
    import gpu_check

    report: dict = {
        "benchmark": "memory_predict",
        "label": "PREDICTION from live tensor bytes on the CPU, not a GPU measurement",
        "quick": quick,
        "machine": gpu_check.versions()
        | {
            "python": platform.python_version(),
            "cpu": workload.cpu_name(),
            "torch_threads": torch.get_num_threads(),
        },
        "settings": settings,
        "tracker_toy_check": toy_check(),
        "measurements": [],
    }
    do = _recorder(setup, report["measurements"])
    report["fake_vs_real_full_width"] = fake_vs_real(do, settings)
    report["small_model_validation"] = small_model_validation(do, settings)
    report["prediction"] = prediction(do, settings)
    if settings["direct_target"]:
        report["direct_fake_target_depth"] = direct_target(
            do, settings, report["prediction"]["configs"]
        )
    report["wall_s"] = time.perf_counter() - t_start
    report["cpu_s"] = time.process_time() - cpu_start
    report["table"] = table(report)
    return report


def _recorder(setup: Setup, rows: list[dict]):
    """`do(spec, layers, seq, config, mode, tag)`: one measured step, logged and kept
    in `rows`."""

    def do(spec, layers, seq, config, mode, tag):
        row = measure(setup, spec, layers, seq, config, mode)
        row["set"] = tag
        rows.append(row)
        log(
            f"{tag:12s} {config:16s} {mode} L={layers:2d} seq={seq:5d}: peak "
            f"{row['peak_gib']:.3f} GiB (base {row['baseline_gib']:.3f}) at "
            f"{row['peak_at'].get('phase')}/{row['peak_at'].get('op')} "
            f"[{row['build_s']:.1f}+{row['step_s']:.1f}s]"
        )
        return row

    return do


def fake_vs_real(do, settings: dict) -> dict:
    """1. The fake shortcut against a computed step at the full width."""
    model = settings["model"]
    rc = settings["real_check"]
    check = {}
    for config in CONFIGS:
        real = do(model, rc["layers"], rc["seq"], config, "real", "real_check")
        fake = do(model, rc["layers"], rc["seq"], config, "fake", "real_check")
        check[config] = {
            "real_peak_gib": real["peak_gib"],
            "fake_peak_gib": fake["peak_gib"],
            "rel_diff": (fake["peak_gib"] - real["peak_gib"]) / real["peak_gib"],
        }
    return {"shape": rc, "configs": check}


def small_model_validation(do, settings: dict) -> dict:
    """2. The extrapolation against every depth of a small model (computed)."""
    small = settings["small"]
    val: dict = {}
    for config in CONFIGS:
        by_mode: dict = {}
        for mode in ("real", "fake"):
            peaks = {
                L: do(small["model"], L, small["seq"], config, mode, "small")[
                    "peak_gib"
                ]
                for L in small["layers"]
            }
            fit_ls = [L for L in small["layers"] if L <= max(settings["fit_layers"])]
            fit = linear_fit(fit_ls, [peaks[L] for L in fit_ls])
            errs = {
                L: (fit["a"] + fit["b"] * L - peaks[L]) / peaks[L]
                for L in small["layers"]
                if L not in fit_ls
            }
            by_mode[mode] = {
                "peaks_gib": peaks,
                "fit_on": fit_ls,
                "fit": fit,
                "extrapolation_rel_error": errs,
            }
        by_mode["fake_vs_real_rel_diff"] = {
            L: (by_mode["fake"]["peaks_gib"][L] - by_mode["real"]["peaks_gib"][L])
            / by_mode["real"]["peaks_gib"][L]
            for L in small["layers"]
        }
        val[config] = by_mode
    return {"shape": small, "configs": val}


def prediction(do, settings: dict) -> dict:
    """3. The full width at the fit depths, per length (fake), fitted, extrapolated."""
    model = settings["model"]
    target = settings["target_layers"]
    pred: dict = {}
    cap = settings["cap_gib"]
    for config in CONFIGS:
        per_len = {}
        for seq in settings["lengths"]:
            ls = settings["fit_layers"]
            peaks = [do(model, L, seq, config, "fake", "full")["peak_gib"] for L in ls]
            fit = linear_fit(ls, peaks)
            per_len[seq] = {
                "peaks_gib": dict(zip(ls, peaks, strict=True)),
                "fit": fit,
                "predicted_peak_gib": fit["a"] + fit["b"] * target,
            }
        points = [(s, v["predicted_peak_gib"]) for s, v in per_len.items()]
        longest, how = longest_under(points, cap, settings["length_step"])
        margin = sum(GPU_MARGIN_GIB.values())
        longest_m, how_m = longest_under(
            [(s, p + margin) for s, p in points], cap, settings["length_step"]
        )
        pred[config] = {
            "per_length": per_len,
            "seq": settings["seq"],
            "predicted_peak_gib": per_len[settings["seq"]]["predicted_peak_gib"],
            "predicted_peak_with_margin_gib": per_len[settings["seq"]][
                "predicted_peak_gib"
            ]
            + margin,
            "longest_under_cap": longest,
            "longest_how": how,
            "longest_under_cap_with_margin": longest_m,
            "longest_with_margin_how": how_m,
        }
    return {
        "target_layers": target,
        "cap_gib": cap,
        "margin_gib": GPU_MARGIN_GIB,
        "configs": pred,
    }


def direct_target(do, settings: dict, pred: dict) -> dict:
    """4. The whole target depth, fake: the extrapolation checked at the real shape."""
    model = settings["model"]
    target = settings["target_layers"]
    direct = {}
    for config in CONFIGS:
        at = do(model, target, settings["seq"], config, "fake", "direct")
        entry = {
            "seq": settings["seq"],
            "peak_gib": at["peak_gib"],
            "extrapolated_gib": pred[config]["predicted_peak_gib"],
        }
        entry["rel_error"] = (entry["extrapolated_gib"] - at["peak_gib"]) / at[
            "peak_gib"
        ]
        longest = pred[config]["longest_under_cap"]
        if longest:
            at_l = do(model, target, longest, config, "fake", "direct")
            entry["at_longest"] = {"seq": longest, "peak_gib": at_l["peak_gib"]}
        direct[config] = entry
    return direct


def table(report: dict) -> str:
    pred = report["prediction"]
    cap = pred["cap_gib"]
    margin = sum(pred["margin_gib"].values())
    direct = report.get("direct_fake_target_depth", {})
    lines = [
        f"PREDICTION (live tensor bytes, {pred['target_layers']} layers extrapolated "
        f"from {report['settings']['fit_layers']}; +{margin:g} GiB margin for the "
        "CUDA context/allocator in the last two columns)",
        f"| config | peak GiB at 2x{report['settings']['seq']} | a GiB | b GiB/layer "
        f"| fit max residual GiB | direct {pred['target_layers']}-layer (fake) GiB "
        f"| longest/side under {cap:g} GiB | peak + margin GiB "
        f"| longest/side with margin |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt_len(n, how):
        if n is None:
            return "none"
        return f">= {n}" if how == "at_least" else str(n)

    for name in CONFIGS:
        p = pred["configs"][name]
        fit = p["per_length"][p["seq"]]["fit"]
        d = direct.get(name, {}).get("peak_gib")
        lines.append(
            f"| {name} | {p['predicted_peak_gib']:.2f} | {fit['a']:.3f} "
            f"| {fit['b']:.4f} | {fit['max_abs_residual']:.2e} "
            f"| {'' if d is None else format(d, '.2f')} "
            f"| {fmt_len(p['longest_under_cap'], p['longest_how'])} "
            f"| {p['predicted_peak_with_margin_gib']:.2f} "
            f"| {fmt_len(p['longest_under_cap_with_margin'], p['longest_with_margin_how'])} |"  # noqa: E501
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes, seconds")
    ap.add_argument(
        "--sharded",
        action="store_true",
        help="per-rank peaks under ZeRO-3 / FSDP2 (memory_sharded.py; "
        "default JSON: results/memory_predict_sharded_cpu.json)",
    )
    ap.add_argument("--out", help="JSON path (default: results/memory_predict_cpu.json")
    args = ap.parse_args(argv)
    if args.sharded:  # its own program: memory_sharded builds on this module
        cmd = [sys.executable, str(HERE / "memory_sharded.py")]
        cmd += ["--quick"] * args.quick + (["--out", args.out] if args.out else [])
        return subprocess.call(cmd)
    settings = SETTINGS["quick" if args.quick else "full"]
    report = run(settings, args.quick)
    out = Path(args.out) if args.out else None
    if out is None and not args.quick:
        out = RESULTS / "memory_predict_cpu.json"
    if out is not None:
        log(f"wrote {write_report(out, report)}")
    print(report["table"])
    print(
        f"wall {report['wall_s']:.0f}s, cpu {report['cpu_s']:.0f}s; tracker toy check "
        f"exact: {report['tracker_toy_check']['exact']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
