"""A whole LLaMA-Factory DPO step: its stock trainer vs `prefalign llamafactory train`.

Run with the Python of LLaMA-Factory's environment (tests/llamafactory_env.sh):

    /tmp/lf-venv/bin/python benchmarks/llamafactory_dpo_step.py
    /tmp/lf-venv/bin/python benchmarks/llamafactory_dpo_step.py --tokens 512

Both arms are LLaMA-Factory's own `run_exp` on the same random Llama (V = 128256,
H = 256, 2 layers, saved once with a one-word-per-token tokenizer), the same pairs
(alpaca, `ranking: true`, template `empty`), LoRA r = 16 on all linear layers, one pair
per step, `pref_loss: sigmoid`. The only difference: the prefalign arm installs
`PrefAlignLFTrainer` first, as the launcher does. Each arm runs in its own
subprocess; step time is the median after one warm-up step (a trainer callback),
memory the process's peak RSS and its rise during `run_exp`. Prints a table, writes
`benchmarks/results/llamafactory_dpo_step_cpu.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import RESULTS, machine  # noqa: E402


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(args, root: Path) -> tuple[Path, Path]:
    """The random model (with its tokenizer) and the pairs, written once."""
    import torch
    from dpo_step import llama_config  # same folder
    from transformers import LlamaForCausalLM
    from workload import pair_rows, word_tokenizer

    model_dir, data_dir = root / "model", root / "data"
    torch.manual_seed(0)
    config = llama_config(args, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    word_tokenizer(args.vocab).save_pretrained(model_dir)
    data_dir.mkdir(parents=True)
    rows = pair_rows(args.batch * (args.steps + 1), args.tokens, args.vocab)
    (data_dir / "pairs.json").write_text(json.dumps(rows))
    info = {
        "pairs": {
            "file_name": "pairs.json",
            "ranking": True,
            "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
        }
    }
    (data_dir / "dataset_info.json").write_text(json.dumps(info))
    return model_dir, data_dir


def worker(args) -> dict:
    from transformers import TrainerCallback

    root = Path(args.root)
    lf_args = {
        "model_name_or_path": str(root / "model"),
        "stage": "dpo",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_target": "all",
        "pref_beta": 0.1,
        "pref_loss": "sigmoid",
        "dataset": "pairs",
        "dataset_dir": str(root / "data"),
        "template": "empty",
        "cutoff_len": 2 * args.tokens,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "output_dir": tempfile.mkdtemp(),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": args.batch,
        "max_steps": args.steps + 1,
        "learning_rate": 1e-4,
        "logging_steps": 10**6,
        "save_strategy": "no",
        "report_to": "none",
        "disable_shuffling": True,
        "use_cpu": True,
        "seed": 0,
    }
    trainer_name = "CustomDPOTrainer"
    if args.which == "prefalign":
        from axolotl_prefalign.core.config import PrefAlignConfig
        from axolotl_prefalign.integrations.llamafactory import launcher

        pa = launcher.resolve(lf_args, PrefAlignConfig(chunk_size=args.chunk))
        trainer_name = launcher.install(pa).__name__
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    from llamafactory.train.tuner import run_exp

    start = _rss_mib()
    run_exp(lf_args, callbacks=[Timer()])
    return {
        "which": args.which,
        "trainer": trainer_name,
        "step_s_median": statistics.median(times[1:]),
        "step_times_s": times,
        "peak_rss_mib": _rss_mib(),
        "rss_before_run_mib": start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=1, help="pairs per step")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (+1 warm-up)")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--which", choices=["stock", "prefalign"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.which:
        print("RESULT " + json.dumps(worker(args)))
        return

    import llamafactory

    root = Path(tempfile.mkdtemp(prefix="lf-dpo-step-"))
    prepare(args, root)
    results = {}
    for which in ("stock", "prefalign"):
        cmd = [sys.executable, __file__, "--which", which, "--root", str(root)]
        for key in ("vocab", "hidden", "layers", "tokens", "batch", "steps", "chunk"):
            cmd += ["--" + key, str(getattr(args, key))]
        env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, **env}
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"{which} run failed")
        results[which] = json.loads(line[-1][7:])

    s, p = results["stock"], results["prefalign"]
    for r in results.values():
        r["rss_rise_mib"] = r["peak_rss_mib"] - r["rss_before_run_mib"]
    print(
        f"\nLLaMA-Factory {llamafactory.__version__} DPO step, V={args.vocab}, "
        f"H={args.hidden}, L={args.layers}, {args.batch}×2×{args.tokens} tokens, "
        "LoRA r=16 all linear, CPU"
    )
    print("| trainer | step time (median) | peak RSS | rise during run_exp |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} ({r['trainer']}) | {r['step_s_median']:.2f} s | "
            f"{r['peak_rss_mib']:,.0f} MiB | {r['rss_rise_mib']:,.0f} MiB |"
        )
    ratios = {
        "time_prefalign_over_stock": p["step_s_median"] / s["step_s_median"],
        "peak_stock_over_prefalign": s["peak_rss_mib"] / p["peak_rss_mib"],
        "rise_stock_over_prefalign": s["rss_rise_mib"] / p["rss_rise_mib"],
    }
    print(
        f"\nprefalign/stock time {ratios['time_prefalign_over_stock']:.2f}×; peak "
        f"RSS {ratios['peak_stock_over_prefalign']:.2f}× lower "
        f"({ratios['rise_stock_over_prefalign']:.2f}× lower rise)"
    )
    out = Path(args.out) if args.out else RESULTS / "llamafactory_dpo_step_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        k: v for k, v in vars(args).items() if k not in ("which", "root", "out")
    }
    out.write_text(
        json.dumps(
            {
                "benchmark": "llamafactory_dpo_step",
                "llamafactory": llamafactory.__version__,
                "settings": settings,
                "machine": machine(),
                "results": results,
                "ratios": ratios,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
