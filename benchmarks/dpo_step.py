"""A whole DPO training step: Axolotl's stock trainer vs prefalign's, side by side.

Same model (a small random Llama with a real-sized vocabulary, LoRA on all linear
layers), same batch, same optimizer. Each trainer runs in its own subprocess so peak
RSS (CPU) or peak allocated memory (CUDA) is measured cleanly; step time is the median
over several steps after a warm-up step. Prints a table and writes JSON (named by the
Axolotl release it ran on).

    stock          Axolotl's AxolotlDPOTrainer (TRL's DPO loss on full logits)
    stock_liger    the same with `use_liger_kernel` (Axolotl's `dpo_use_liger_kernel`;
                   on TRL >= 1.14 it routes through TRL's chunked log-probs)
    prefalign      PrefAlignDPOTrainer, loss sigmoid, default chunk from V

    python benchmarks/dpo_step.py                    # CPU defaults
    python benchmarks/dpo_step.py --vocab 128256 --tokens 512 --steps 5
    .venv-ax021/bin/python benchmarks/dpo_step.py    # against Axolotl 0.21
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("stock", "stock_liger", "prefalign")


def machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def llama_config(args, **extra):
    """The benchmark's random Llama: `--vocab`, `--hidden`, `--layers`, room for
    `--tokens` (also the LLaMA-Factory step benchmark's model)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 128, 1),
        max_position_embeddings=4 * args.tokens + 16,
        tie_word_embeddings=False,
        **extra,
    )


def build_model(args, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(args)).to(device)
    lora = LoraConfig(
        r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0
    )
    return get_peft_model(model, lora)


def dataset(args):
    """Pairs whose prompt+chosen and prompt+rejected are exactly `tokens` long."""
    from datasets import Dataset
    from workload import pair_rows  # same folder

    return Dataset.from_list(
        pair_rows(args.batch * (args.steps + 1), args.tokens, args.vocab)
    )


def worker(args) -> dict:
    import resource

    import torch
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args, device)
    liger = args.which == "stock_liger"
    if args.which in ("stock", "stock_liger"):
        from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer as cls

        extra = {}
    else:
        from axolotl_prefalign.core.config import PrefAlignConfig
        from axolotl_prefalign.integrations.axolotl.trainers.dpo import (
            PrefAlignDPOTrainer as cls,
        )

        extra = {"prefalign": PrefAlignConfig(loss="sigmoid", chunk_size=args.chunk)}
    out = tempfile.mkdtemp()
    targs = AxolotlDPOConfig(
        output_dir=out,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + 1,
        learning_rate=1e-4,
        beta=0.1,
        max_length=None,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        gradient_checkpointing=args.grad_ckpt,
        logging_steps=10**6,
        save_strategy="no",
        dataloader_num_workers=0,
        use_liger_kernel=liger,
    )
    from workload import word_tokenizer

    trainer = cls(
        model,
        None,
        args=targs,
        train_dataset=dataset(args),
        processing_class=word_tokenizer(args.vocab),
        **extra,
    )
    times: list[float] = []

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Timer())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.train()
    result = {
        "which": args.which,
        "step_s_median": statistics.median(times[1:]),
        "step_times_s": times,
        "tokens_per_step": args.batch
        * 2
        * (args.tokens - args.tokens // 4 + args.tokens // 4),
    }
    if device == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mib"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        result["rss_before_train_mib"] = base_rss
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=1, help="pairs per step")
    ap.add_argument(
        "--steps", type=int, default=4, help="timed steps (after 1 warm-up)"
    )
    ap.add_argument("--chunk", type=int, default=None, help="default: from V")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--which", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.which:
        print("RESULT " + json.dumps(worker(args)))
        return

    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("axolotl", "trl", "transformers")}
    results, failed = {}, {}
    for which in args.configs:
        cmd = [sys.executable, __file__, "--which", which]
        for key, value in vars(args).items():
            if key in ("which", "out", "configs") or value in (False, None):
                continue
            flag = "--" + key.replace("_", "-")
            cmd += [flag] if value is True else [flag, str(value)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            if which == "stock_liger":  # an optional peer: record why it did not run
                failed[which] = (proc.stderr or proc.stdout)[-1500:]
                print(f"{which} did not run:\n{failed[which][-600:]}")
                continue
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"{which} run failed")
        results[which] = json.loads(line[-1][7:])

    mem_key = "peak_mem_mib" if "peak_mem_mib" in results["stock"] else "peak_rss_mib"
    s, p = results["stock"], results["prefalign"]
    print(
        f"\nDPO step, Axolotl {versions['axolotl']} (TRL {versions['trl']}), "
        f"V={args.vocab}, H={args.hidden}, L={args.layers}, "
        f"{args.batch}×2×{args.tokens} tokens, LoRA r=16 all-linear"
    )
    print("| trainer | step time (median) | peak memory |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s_median']:.3f} s | {r[mem_key]:.0f} MiB |")
    ratios = {
        "time_prefalign_over_stock": p["step_s_median"] / s["step_s_median"],
        "mem_stock_over_prefalign": s[mem_key] / p[mem_key],
    }
    if "stock_liger" in results:
        lg = results["stock_liger"]
        ratios["time_prefalign_over_stock_liger"] = (
            p["step_s_median"] / lg["step_s_median"]
        )
        ratios["mem_stock_liger_over_prefalign"] = lg[mem_key] / p[mem_key]
    print(
        f"\nprefalign/stock time: {ratios['time_prefalign_over_stock']:.2f}×; "
        f"stock/prefalign peak memory: {ratios['mem_stock_over_prefalign']:.2f}×"
    )
    device = "cuda" if "peak_mem_mib" in s else "cpu"
    name = f"dpo_step_{device}_axolotl{versions['axolotl']}.json"
    out = Path(args.out) if args.out else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "dpo_step",
                "versions": versions,
                "settings": {
                    k: v for k, v in vars(args).items() if k not in ("which", "out")
                },
                "not_run": failed,
                "machine": machine(),
                "memory_metric": mem_key,
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
