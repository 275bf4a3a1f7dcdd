"""What gpu_check.py's JSON says of parts 2 and 3: the per-configuration rows with
MFU and ratios to stock, ours against stock, the length search, and the table."""

from __future__ import annotations

import workload
from gpu_check_settings import CONFIGS


def dpo_summary(rows: dict, seconds: float, peak_tflops, model: dict) -> dict:
    """Part 2: each row with its MFU (over the device's bf16 peak) and its speed and
    memory against stock, the agreement of ours with stock, and the status."""
    stock = rows.get("stock", {})
    for r in rows.values():
        if peak_tflops and "model_tflops" in r:
            r["mfu"] = r["model_tflops"] / peak_tflops
        if r.get("tokens_per_s") and stock.get("tokens_per_s"):
            r["speedup_vs_stock"] = r["tokens_per_s"] / stock["tokens_per_s"]
        if r.get("peak_gib") and stock.get("peak_gib"):
            r["memory_vs_stock"] = r["peak_gib"] / stock["peak_gib"]
    ok = [r for r in rows.values() if r.get("status") == "ok"]
    status = "ok" if len(ok) == len(CONFIGS) else ("partial" if ok else "error")
    return {
        "status": status,
        "seconds": seconds,
        "rows": rows,
        "agreement": agreement(rows),
        "n_params_flops": workload.flops_params(model),
    }


def agreement(rows: dict) -> dict:
    """Ours vs stock on the same model, data and seed: the step-0 log-probs
    (policy = reference, so TRL's full-logits path against the fused one over
    the whole model) and the losses of every step."""
    stock = rows.get("stock", {})
    out = {}
    for name in ("prefalign", "prefalign_packed"):
        r = rows.get(name, {})
        if "logps" not in r or "logps" not in stock:
            continue
        s0, o0 = stock["logps"][0], r["logps"][0]
        out[name] = {
            "logps_step0_max_rel_diff": max(
                abs(a - b) / max(abs(b), 1e-30) for a, b in zip(o0, s0, strict=True)
            ),
            "loss_max_abs_diff": max(
                abs(a - b) for a, b in zip(r["losses"], stock["losses"], strict=True)
            ),
        }
    return out


def search_summary(searches: dict, cap_gib) -> dict:
    """Part 3: each configuration's longest length per side, and the status."""
    ok = [s for s in searches.values() if s.get("status") == "ok"]
    status = "ok" if len(ok) == len(CONFIGS) else ("partial" if ok else "error")
    return {
        "status": status,
        "seconds": sum(s.get("seconds", 0.0) for s in searches.values()),
        "cap_gib": cap_gib,
        "rows": searches,
    }


def table(parts: dict, cap_gib) -> str:
    """Parts 2 and 3 as a Markdown table, one row per configuration."""
    rows = parts.get("dpo_step", {}).get("rows", {})
    search = parts.get("max_length", {}).get("rows", {})
    lines = [
        "| config | status | peak GiB | tokens/s | vs stock | MFU | max seq/side"
        + (f" under {cap_gib:g} GiB |" if cap_gib else " |"),
        "|---|---|---|---|---|---|---|",
    ]
    for name in CONFIGS:
        r = rows.get(name, {"status": "not_run"})

        def fmt(key, spec, r=r):
            return format(r[key], spec) if r.get(key) is not None else ""

        lines.append(
            f"| {name} | {r['status']} | {fmt('peak_gib', '.2f')} "
            f"| {fmt('tokens_per_s', '.0f')} | {fmt('speedup_vs_stock', '.2f')} "
            f"| {fmt('mfu', '.1%')} "
            f"| {search.get(name, {}).get('max_seq_per_side', '')} |"
        )
    return "\n".join(lines)
