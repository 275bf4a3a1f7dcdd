"""Plaintext contrast SFT against DPO on the same pairs: time, memory, forward passes.

The same preference pairs, model and LoRA (r=16, all linear layers) train for a
fixed number of steps in three arms, each in its own subprocess (clean peak RSS on
the CPU, peak allocated memory on CUDA):

    contrast    Axolotl's SFT trainer (AxolotlTrainer) on the pairs rendered by
                `type: axolotl_prefalign.contrast`: one row = prompt, rejected and
                chosen answer, loss on the chosen answer and its EOS
    prefalign   PrefAlignDPOTrainer (loss sigmoid): policy and adapter-off reference
                on the padded [chosen; rejected] batch
    prefalign_packed  the same with prefalign.packing (both sequences in one row)
    stock       Axolotl's AxolotlDPOTrainer (TRL's DPOTrainer as Axolotl runs it)

Per arm: the first step's time, the median step time after it, pairs and row tokens
per second, peak memory, and the model forward passes counted by a hook on the
CausalLM (calls per step, and sequences through the model per pair). Two shapes:

    llama128k   dpo_step.py's random Llama (V = 128256, H = 256, 2 layers)
    smollm2     the embedded SmolLM2-135M-Instruct (`prefalign:default`)

Pairs are dpo_step.py's (prompt a quarter of --tokens, each response the rest, one
token per word). `--predict` adds the Llama-3-8B QLoRA peak of one step per arm,
PREDICTED from live tensor bytes on the CPU with benchmarks/memory_predict.py's
machinery (contrast: the Hugging Face loss on full logits, as Axolotl's SFT trainer
computes it without a fused cross-entropy integration).

    python benchmarks/contrast_vs_dpo.py                    # both shapes, 10 steps
    python benchmarks/contrast_vs_dpo.py --predict          # + the 8B prediction
    .venv-ax021/bin/python benchmarks/contrast_vs_dpo.py    # against Axolotl 0.21
    python benchmarks/contrast_vs_dpo.py --quick            # tiny shapes (tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from workload import RESULTS, machine, set_env_defaults  # noqa: E402

set_env_defaults()
ARMS = ("contrast", "prefalign", "prefalign_packed", "stock")
SHAPES = ("llama128k", "smollm2")
# --quick: a tiny random Llama only, one timed step.
QUICK = {"vocab": 512, "hidden": 64, "layers": 1, "tokens": 32, "steps": 1}
# Markers would only add a few tokens per row; one word per token keeps lengths exact.
CONTRAST_TEMPLATE = {
    "question": "{question}",
    "negative": "{negative}",
    "positive": "{positive}",
}


# -- one arm, in a subprocess -------------------------------------------------
def build(args, device):
    """(LoRA model, vocabulary) of the shape: dpo_step's Llama, or SmolLM2."""
    import dpo_step

    if args.shape != "smollm2":
        return dpo_step.build_model(args, device), args.vocab
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_prefalign.core.models import prepare_default_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(prepare_default_model()).to(device)
    lora = LoraConfig(
        r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0
    )
    return get_peft_model(base, lora), base.config.vocab_size


def pairs(args, vocab: int) -> list[dict]:
    from workload import pair_rows

    return pair_rows(args.batch * (args.steps + 1), args.tokens, vocab)


def contrast_dataset(rows: list[dict], tokenizer):
    """The pairs as `type: axolotl_prefalign.contrast` renders them."""
    from datasets import Dataset

    from axolotl_prefalign.contrast import ContrastFormat
    from axolotl_prefalign.core.config import ContrastConfig

    config = ContrastConfig(template=CONTRAST_TEMPLATE, instruction="")
    fmt = ContrastFormat(tokenizer, config, sequence_len=10**6)
    return fmt.wrap_dataset(Dataset.from_list(rows))


class ForwardCounter:
    """Forward calls of the CausalLM and the sequences they carried."""

    def __init__(self, model):
        from axolotl_prefalign.core.heads import causal_lm

        self.calls = self.sequences = 0
        causal_lm(model).register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.calls += 1
        self.sequences += ids.shape[0] if ids is not None else 0


def trainer_for(args, model, rows, tokenizer, device):
    """The arm's trainer (Axolotl's classes), training arguments as dpo_step.py's."""
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + 1,
        learning_rate=1e-4,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        logging_steps=10**6,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    if args.which == "contrast":
        from axolotl.core.trainers.base import AxolotlTrainer
        from axolotl.core.training_args import AxolotlTrainingArguments
        from transformers import DataCollatorForSeq2Seq

        return AxolotlTrainer(
            model=model,
            args=AxolotlTrainingArguments(**common),
            train_dataset=contrast_dataset(rows, tokenizer),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
            processing_class=tokenizer,
        )
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
    from datasets import Dataset

    extra = {}
    if args.which == "stock":
        from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer as cls
    else:
        from axolotl_prefalign.core.config import PrefAlignConfig
        from axolotl_prefalign.integrations.axolotl.trainers.dpo import (
            PrefAlignDPOTrainer as cls,
        )

        packing = args.which == "prefalign_packed"
        extra = {"prefalign": PrefAlignConfig(loss="sigmoid", packing=packing)}
    targs = AxolotlDPOConfig(**common, beta=0.1, max_length=None)
    return cls(
        model,
        None,
        args=targs,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        **extra,
    )


def worker(args) -> dict:
    """Train one arm for 1 + --steps steps; its times, memory and forward counts."""
    import resource

    import torch
    from transformers import TrainerCallback
    from workload import word_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, vocab = build(args, device)
    tokenizer = word_tokenizer(vocab)
    rows = pairs(args, vocab)
    trainer = trainer_for(args, model, rows, tokenizer, device)
    counter = ForwardCounter(model)
    times: list[float] = []
    counts: list[tuple[int, int]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()
            self.seen = (counter.calls, counter.sequences)

        def on_step_end(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)
            counts.append(
                (counter.calls - self.seen[0], counter.sequences - self.seen[1])
            )

    trainer.add_callback(Timer())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    calls, sequences = counts[-1]
    row_tokens = _row_tokens(args, trainer, rows)
    median = statistics.median(times[1:])
    result = {
        "which": args.which,
        "first_step_s": times[0],
        "step_s_median": median,
        "step_times_s": times,
        "forward_calls_per_step": calls,
        "sequence_forwards_per_pair": sequences / args.batch,
        "row_tokens_per_step": row_tokens,
        "tokens_per_s": row_tokens / median,
        "pairs_per_s": args.batch / median,
    }
    if device == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mib"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
    return result


def _row_tokens(args, trainer, rows) -> int:
    """Tokens of one step's training rows: the contrast row, or prompt + chosen and
    prompt + rejected (EOS included) for DPO."""
    if args.which == "contrast":
        return sum(len(r) for r in trainer.train_dataset[: args.batch]["input_ids"])
    return args.batch * 2 * args.tokens


# -- the prediction for Llama-3-8B QLoRA -------------------------------------------
def contrast_loss(model, batch):
    """One contrast row from memory_predict's pair (prompt + rejected + chosen), the
    Hugging Face loss on the chosen answer (full logits, as Axolotl's SFT trainer)."""
    import torch

    ids, mask = batch["input_ids"], batch["completion_mask"]
    prompt = ids[0][mask[0] == 0]
    chosen, rejected = ids[0][mask[0] == 1], ids[1][mask[1] == 1]
    row = torch.cat([prompt, rejected, chosen])[None]
    labels = torch.full_like(row, -100)
    labels[0, -chosen.shape[0] :] = chosen
    out = model(input_ids=row, attention_mask=torch.ones_like(row), labels=labels)
    return out.loss, None, None


def predict(quick: bool) -> dict:
    """Peak GiB of one Llama-3-8B QLoRA step per arm, PREDICTED from live tensor bytes
    (memory_predict: fake steps at 1, 2, 4 layers, fitted a + b·L, at 32 layers)."""
    import memory_predict as mp

    settings = mp.SETTINGS["quick" if quick else "full"]
    stock_loss = mp.loss_fn

    def loss_fn(setup, model, config):
        if config == "contrast":
            return (lambda batch: contrast_loss(model, batch)), "hf_cross_entropy"
        return stock_loss(setup, model, config)

    mp.loss_fn = loss_fn
    setup = mp.Setup()
    layers, target, seq = (
        settings["fit_layers"],
        settings["target_layers"],
        settings["seq"],
    )
    out = {
        "label": "PREDICTION from live tensor bytes on the CPU, not a GPU measurement",
        "model": settings["model"],
        "seq_per_side": seq,
        "target_layers": target,
        "gpu_margin_gib": mp.GPU_MARGIN_GIB,
        "arms": {},
    }
    for arm in ARMS:  # memory_predict names its configurations as the arms
        peaks = [
            mp.measure(setup, settings["model"], n, seq, arm, "fake")["peak_gib"]
            for n in layers
        ]
        fit = mp.linear_fit(layers, peaks)
        out["arms"][arm] = {
            "peaks_gib": dict(zip(layers, peaks, strict=True)),
            "predicted_peak_gib": fit["a"] + fit["b"] * target,
        }
    return out


# -- the driver ------------------------------------------------------------------
def run_in_process(args, shape: str, arms: list[str]) -> list[dict]:
    """The arms, one after another, in one fresh Python process."""
    cmd = [sys.executable, __file__, "--which", ",".join(arms), "--shape", shape]
    for key in ("vocab", "hidden", "layers", "tokens", "batch", "steps"):
        cmd += ["--" + key, str(getattr(args, key))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or len(lines) != len(arms):
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"{shape}/{','.join(arms)} failed")
    return [json.loads(x[7:]) for x in lines]


def run_arms(args) -> dict:
    """Each (shape, arm) in its own process, one after another, so that memory is
    the arm's own and no arm shares the machine. --quick runs a shape's arms in one
    process (a smoke test of the code paths: its numbers mean nothing)."""
    results: dict = {}
    for shape in args.shapes:
        groups = [args.arms] if args.quick else [[a] for a in args.arms]
        done = [r for arms in groups for r in run_in_process(args, shape, arms)]
        results[shape] = {r["which"]: r for r in done}
    return results


def table(report: dict) -> str:
    lines = [
        "| shape | arm | first step | step (median) | pairs/s | tokens/s | peak "
        "memory | forward calls/step | sequences/pair |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, arms in report["results"].items():
        for arm, r in arms.items():
            mem = r.get("peak_mem_mib", r.get("peak_rss_mib"))
            lines.append(
                f"| {shape} | {arm} | {r['first_step_s']:.3f} s | "
                f"{r['step_s_median']:.3f} s | {r['pairs_per_s']:.2f} | "
                f"{r['tokens_per_s']:.0f} | {mem:.0f} MiB | "
                f"{r['forward_calls_per_step']} | {r['sequence_forwards_per_pair']:g} |"
            )
    pred = report.get("prediction_8b_qlora")
    if pred:
        lines.append(f"\nLlama-3-8B QLoRA, one step, {pred['label']}:")
        for arm, p in pred["arms"].items():
            lines.append(f"  {arm}: {p['predicted_peak_gib']:.2f} GiB live bytes")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=SHAPES)
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per DPO side")
    ap.add_argument("--batch", type=int, default=1, help="pairs per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps after 1")
    ap.add_argument("--predict", action="store_true", help="+ the 8B QLoRA prediction")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, for tests")
    ap.add_argument("--out", default=None)
    ap.add_argument("--which", help=argparse.SUPPRESS)  # arms, comma-separated
    ap.add_argument("--shape", choices=SHAPES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.which:
        for which in args.which.split(","):
            args.which = which
            print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    if args.quick:
        vars(args).update(QUICK, shapes=["llama128k"])

    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("axolotl", "trl", "transformers", "peft")}
    report = {
        "benchmark": "contrast_vs_dpo",
        "versions": versions,
        "machine": machine(),
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("which", "shape", "out")
        },
        "results": run_arms(args),
    }
    if args.predict:
        report["prediction_8b_qlora"] = predict(args.quick)
    print(table(report))
    device = "cuda" if "gpu" in report["machine"] else "cpu"
    tag = "_quick" if args.quick else ""
    name = f"contrast_vs_dpo_{device}_axolotl{versions['axolotl']}{tag}.json"
    out = Path(args.out) if args.out else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
