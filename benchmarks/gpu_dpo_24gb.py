"""QLoRA DPO of a Llama-3-8B-shaped model under a 24 GiB cap: stock trainer vs ours.

A random-weight model with Llama-3-8B's shapes is built on the GPU in bf16, its
decoder linears are replaced by bitsandbytes NF4 `Linear4bit` (nothing is saved to
disk), and LoRA r=16 goes on all linear layers (not lm_head). Each configuration runs
one preference pair per micro-batch (prompt+chosen = prompt+rejected = --seq tokens)
with gradient checkpointing, in its own subprocess with GPU memory capped by
`torch.cuda.set_per_process_memory_fraction`:

    stock              Axolotl's AxolotlDPOTrainer (TRL's DPOTrainer without Axolotl)
    prefalign          PrefAlignDPOTrainer, loss sigmoid, padded batch
    prefalign_packed   PrefAlignDPOTrainer, loss sigmoid, prefalign.packing

Measured: peak allocated memory, tokens per second (policy tokens, 2 x --seq per
step), MFU (6·N·tokens/s over the GPU's bf16 dense peak, N = decoder linears +
lm_head), and the longest --seq per side that fits under the cap (each length in a
fresh subprocess, OOM = does not fit). Prints a markdown table, writes JSON.

    python benchmarks/gpu_dpo_24gb.py                       # the real thing (CUDA)
    python benchmarks/gpu_dpo_24gb.py --layers 2 --no-search
    python benchmarks/gpu_dpo_24gb.py --cpu-smoke --steps 1 --no-search  # logic only

This needs Axolotl and TRL installed. Where they are not (the lent GPU machine has
neither), `benchmarks/gpu_check.sh` runs the same comparison through TRL's own loss
and `core.preference.PreferenceStep` in one time-boxed call (docs/gpu.md); it
shares their model build, NF4 swap, FLOP count and peak table (workload.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workload import (
    GIB,
    LLAMA3_8B,
    RESULTS,
    TINY_LLAMA,
    build_model,
    flops_params,
    gpu_properties,
    lora_config,
    machine,
    pair_rows,
    set_env_defaults,
    word_tokenizer,
)

CONFIGS = {
    "stock": {"trainer": "stock", "packing": False},
    "prefalign": {"trainer": "prefalign", "packing": False},
    "prefalign_packed": {"trainer": "prefalign", "packing": True},
}
# Per side (prompt + one response); scaled down proportionally for --cpu-smoke.
SEARCH_LENGTHS = (1024, 2048, 3072, 4096, 6144, 8192)
SMOKE = {**TINY_LLAMA, "seq": 64}


# -- one configuration, in a subprocess -----------------------------------------
def _trainer_classes(which: str) -> tuple[type, type, str]:
    """(trainer class, config class, baseline name) for one configuration."""
    if which == "prefalign":
        from axolotl.core.trainers.dpo.args import AxolotlDPOConfig

        from axolotl_prefalign.integrations.axolotl.trainers.dpo import (
            PrefAlignDPOTrainer,
        )

        return PrefAlignDPOTrainer, AxolotlDPOConfig, "axolotl_prefalign"
    try:
        from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
        from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer

        return AxolotlDPOTrainer, AxolotlDPOConfig, "axolotl.AxolotlDPOTrainer"
    except ImportError:
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig, "trl.DPOTrainer"


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


def worker(spec: dict) -> dict:
    """Build, train warm-up + timed steps of one configuration; measure."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    cfg = CONFIGS[spec["config"]]
    result: dict = {"config": spec["config"], "seq": spec["seq"], **cfg}
    try:
        trainer_cls, config_cls, baseline = _trainer_classes(cfg["trainer"])
    except ImportError as exc:
        return {
            **result,
            "trainer_class": cfg["trainer"],
            "status": "skipped",
            "reason": f"import failed: {exc}",
        }
    result["trainer_class"] = baseline

    cuda = spec["device"] == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda and spec["cap_gib"]:
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(spec["cap_gib"] * GIB / total, 1.0)
        torch.cuda.set_per_process_memory_fraction(fraction)
        result["memory_fraction"] = fraction

    try:
        t0 = time.perf_counter()
        model, n_quantized = build_model(spec, spec["device"], dtype)
        result["build_s"] = time.perf_counter() - t0
        result["linears_nf4"] = n_quantized
        if cuda:
            torch.cuda.empty_cache()
            result["build_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            result["weights_gib"] = torch.cuda.memory_allocated() / GIB

        steps = spec["warmup"] + spec["steps"]
        extra = {}
        if cfg["trainer"] == "prefalign":
            from axolotl_prefalign.core.config import PrefAlignConfig

            extra["prefalign"] = PrefAlignConfig(loss="sigmoid", packing=cfg["packing"])
        targs = config_cls(
            output_dir=tempfile.mkdtemp(prefix="gpu_dpo_"),
            per_device_train_batch_size=1,
            gradient_accumulation_steps=1,
            max_steps=steps,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            beta=0.1,
            max_length=None,
            report_to=[],
            remove_unused_columns=False,
            use_cpu=not cuda,
            bf16=cuda,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            logging_steps=10**6,
            save_strategy="no",
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        lora = lora_config()
        tokenizer = word_tokenizer(spec["vocab"])
        rows = pair_rows(steps, spec["seq"], spec["vocab"])
        trainer = trainer_cls(
            model,
            None,
            args=targs,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora,
            **extra,
        )
        first = trainer.train_dataset[0]
        sides = (
            len(first["prompt_ids"]) + len(first["chosen_ids"]),
            len(first["prompt_ids"]) + len(first["rejected_ids"]),
        )
        if sides != (spec["seq"], spec["seq"]):
            raise RuntimeError(f"tokenized sides are {sides}, expected {spec['seq']}")
        result["lora_params"] = sum(
            p.numel() for p in trainer.model.parameters() if p.requires_grad
        )

        times: list[float] = []

        class Timer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                if cuda:
                    torch.cuda.synchronize()
                self.t = time.perf_counter()

            def on_step_end(self, *a, **k):
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - self.t)

        trainer.add_callback(Timer())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out = trainer.train()
    except Exception as exc:  # OOM anywhere (build, first step) = does not fit
        if cuda and _is_oom(exc):
            peak = torch.cuda.max_memory_allocated() / GIB
            return {**result, "status": "oom", "peak_gib": peak, "error": str(exc)}
        raise

    timed = times[spec["warmup"] :]
    tokens_per_step = 2 * spec["seq"]  # chosen + rejected sequences, whole
    tokens_per_s = tokens_per_step * len(timed) / sum(timed)
    result.update(
        status="ok",
        train_loss=out.training_loss,
        step_times_s=times,
        step_s_median=statistics.median(timed),
        tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_s,
        model_tflops=6 * flops_params(spec) * tokens_per_s / 1e12,
    )
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    return result


# -- orchestration ------------------------------------------------------------
def run_config(spec: dict, timeout: int) -> dict:
    """One configuration at one length in a fresh Python process."""
    env = set_env_defaults(dict(os.environ))
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"config": spec["config"], "seq": spec["seq"], "status": "timeout"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if lines:
        result = json.loads(lines[-1][len("RESULT ") :])
    else:
        tail = (proc.stdout[-2000:] + proc.stderr[-4000:]).strip()
        # The CUDA context itself can die on OOM before Python can report.
        status = "oom" if "out of memory" in tail.lower() else "error"
        result = {
            "config": spec["config"],
            "seq": spec["seq"],
            "status": status,
            "returncode": proc.returncode,
            "error": tail,
        }
    result["wall_s"] = time.perf_counter() - t0
    return result


def _log(result: dict) -> None:
    bits = [f"[{result['config']} seq={result['seq']}] {result['status']}"]
    if "peak_gib" in result:
        bits.append(f"peak {result['peak_gib']:.2f} GiB")
    if "tokens_per_s" in result:
        bits.append(f"{result['tokens_per_s']:.0f} tok/s")
    if result["status"] in ("error", "skipped"):
        bits.append((result.get("error") or result.get("reason", ""))[-800:])
    print(", ".join(bits), file=sys.stderr, flush=True)


def search_max_seq(spec: dict, main: dict, lengths: list[int], timeout: int) -> dict:
    """Longest per-side length that fits: ascending, stopping at the first misfit.

    Memory grows with length, so lengths below a fitting --seq are not re-run.
    """
    attempts = []
    best = None
    for length in lengths:
        if length == spec["seq"]:
            r = main
        elif length < spec["seq"] and main["status"] == "ok":
            best = length
            continue
        else:
            r = run_config({**spec, "seq": length, "steps": 1}, timeout)
            _log(r)
        attempts.append(
            {
                k: r.get(k)
                for k in ("seq", "status", "peak_gib", "tokens_per_s")
                if k in r
            }
        )
        if r["status"] != "ok":
            break
        best = length
    return {"max_seq_per_side": best, "lengths": lengths, "attempts": attempts}


def gpu_info() -> dict:
    """The GPU, driver, CUDA and library versions this run used."""
    import torch

    info: dict = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    for pkg in ("transformers", "peft", "trl", "axolotl", "bitsandbytes", "flash-attn"):
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = None
    if not torch.cuda.is_available():
        return info
    info.update(gpu_properties())
    try:
        info["driver"] = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            .stdout.split("\n")[0]
            .strip()
        )
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def table(results: dict, peak: float | None, cap: float | None) -> str:
    """The markdown table printed at the end (and kept in the JSON)."""
    stock = results.get("stock", {})
    lines = [
        "| config | trainer | packing | status | peak mem | tokens/s | vs stock "
        "| MFU | max seq/side" + (f" under {cap:g} GiB |" if cap else " |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rate = r.get("tokens_per_s")
        mem = f"{r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""
        if not mem and r["status"] == "ok":
            mem = "n/a (CPU)"
        vs = (
            f"{rate / stock['tokens_per_s']:.2f}×"
            if rate and stock.get("tokens_per_s")
            else ""
        )
        mfu = (
            f"{100 * r['model_tflops'] / peak:.1f}%"
            if peak and "model_tflops" in r
            else "n/a"
        )
        search = r.get("search") or {}
        max_seq = search.get("max_seq_per_side", "not searched")
        lines.append(
            f"| {name} | {r.get('trainer_class', '?')} | {r.get('packing', '')} "
            f"| {r['status']} | {mem} | {f'{rate:.0f}' if rate else ''} | {vs} "
            f"| {mfu} | {max_seq if max_seq is not None else 'none'} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=None, help="default 32")
    ap.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="default 4096; heads = hidden/128, KV heads = heads/4, MLP 3.5×hidden",
    )
    ap.add_argument("--vocab", type=int, default=None, help="default 128256")
    ap.add_argument("--seq", type=int, default=None, help="tokens per side (2048)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="0 = no cap")
    ap.add_argument("--no-search", action="store_true", help="skip max-length search")
    ap.add_argument("--attn", choices=["sdpa", "flash_attention_2"], default="sdpa")
    ap.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated subset of " + ", ".join(CONFIGS),
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep other configurations' results already in --out (same settings)",
    )
    ap.add_argument("--timeout", type=int, default=1800, help="per subprocess, s")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny shapes on the CPU, no cap: exercises the logic, measures nothing",
    )
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown --configs {unknown}; known: {list(CONFIGS)}")
    return args


def make_spec(args: argparse.Namespace) -> tuple[dict, list[int]]:
    """The settings every subprocess gets, and the lengths the search tries."""
    import torch

    shapes = dict(SMOKE if args.cpu_smoke else {**LLAMA3_8B, "seq": 2048})
    if args.hidden:
        heads = max(args.hidden // 128, 1)
        shapes.update(
            hidden=args.hidden,
            heads=heads,
            kv_heads=max(heads // 4, 1),
            intermediate=int(3.5 * args.hidden),
        )
    for key in ("layers", "vocab", "seq"):
        if getattr(args, key):
            shapes[key] = getattr(args, key)
    if args.cpu_smoke:
        device, cap = "cpu", None
        lengths = [max(8, n * shapes["seq"] // 2048) for n in SEARCH_LENGTHS]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible; use --cpu-smoke to check the logic")
        device, cap = "cuda", (args.cap_gib or None)
        lengths = list(SEARCH_LENGTHS)
        if cap and cap * GIB > torch.cuda.get_device_properties(0).total_memory:
            print(f"note: --cap-gib {cap} exceeds the GPU's memory", file=sys.stderr)
    if args.attn == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError as exc:
            raise SystemExit(
                f"--attn flash_attention_2 needs flash-attn: {exc}"
            ) from None
    spec = {
        **shapes,
        "attn": args.attn,
        "device": device,
        "cap_gib": cap,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    return spec, lengths


def write_report(spec: dict, results: dict, out_arg: str | None, merge: bool) -> Path:
    """Print the table and write the JSON; returns its path."""
    info = gpu_info()
    cuda = spec["device"] == "cuda"
    name = f"gpu_dpo_24gb_{slug(info['name'])}" if cuda else "gpu_dpo_24gb_cpu-smoke"
    out = Path(out_arg) if out_arg else RESULTS / f"{name}.json"
    if merge and out.exists():
        old = json.loads(out.read_text())
        if old.get("settings") != spec:
            raise SystemExit(f"--merge: {out} was written with other settings")
        results = {**old["results"], **results}
    peak = info.get("peak_bf16_tflops")
    for r in results.values():
        if peak and "model_tflops" in r:
            r["mfu"] = r["model_tflops"] / peak
    baseline = results.get("stock", {}).get("trainer_class")
    md = table(results, peak, spec["cap_gib"])
    print(
        f"\nQLoRA DPO, L={spec['layers']} H={spec['hidden']} V={spec['vocab']}, "
        f"1 pair × 2 × {spec['seq']} tokens, NF4 + LoRA r=16 all-linear, grad ckpt, "
        f"{spec['attn']}, {spec['device']}"
        + (f", cap {spec['cap_gib']:g} GiB" if spec["cap_gib"] else "")
        + f"; baseline: {baseline}\n"
    )
    print(md)
    report = {
        "benchmark": "gpu_dpo_24gb",
        "measured": cuda,
        "settings": spec,
        "n_params_flops": flops_params(spec),
        "n_params_flops_means": "decoder linear weights + lm_head (6·N per token)",
        "baseline": baseline,
        "gpu": info,
        "machine": machine(),
        "env": {"PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")},
        "results": results,
        "table": md,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return out


def main() -> None:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    spec, lengths = make_spec(args)
    results = {}
    for name in args.configs:
        r = run_config({**spec, "config": name}, args.timeout)
        _log(r)
        if not args.no_search and r["status"] in ("ok", "oom"):
            r["search"] = search_max_seq(
                {**spec, "config": name}, r, lengths, args.timeout
            )
        results[name] = r
    write_report(spec, results, args.out, args.merge)


if __name__ == "__main__":
    main()
