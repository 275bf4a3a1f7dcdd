"""A whole DPO training step: Axolotl's stock trainer, TRL 1.16's and prefalign's.

Same model (a small random Llama with a real-sized vocabulary, LoRA on all linear
layers), same weights, same pairs, same optimizer. Each trainer runs in its own
subprocess so peak RSS (CPU) or peak allocated memory (CUDA) is measured cleanly; step
time is the median over several steps after a warm-up step. Step 1's loss, LoRA
gradients and token ids are compared with prefalign's. Prints a table and writes JSON
(named by the Axolotl release it ran on, and TRL's where that arm ran).

    stock          Axolotl's AxolotlDPOTrainer (TRL's DPO loss on full logits)
    stock_liger    the same with `use_liger_kernel` (Axolotl's `dpo_use_liger_kernel`;
                   on TRL >= 1.14 it routes through TRL's chunked log-probs)
    prefalign      PrefAlignDPOTrainer, loss sigmoid, default chunk from V
    trl116         TRL 1.16.0's own DPOTrainer (always its chunked log-prob head),
                   run with the Python of a separate environment (tests/trl_env.sh)

Every arm loads the same initial weights (saved once per shape), gets the same frozen
"ref" copy of the initial adapter as its reference (what TRL does when handed a LoRA
model; with LoRA's zero B that is the base model, i.e. the adapter off), then has its
trained adapter moved off that copy by the same seeded noise, so step 1's loss is not
log 2. Pairs are taken in file order (a sequential sampler), one pair per step.

    python benchmarks/dpo_step.py                    # CPU defaults
    python benchmarks/dpo_step.py --vocab 128256 --tokens 512 --steps 5
    python benchmarks/dpo_step.py --shapes h256 h1024 --configs stock prefalign trl116
    python benchmarks/dpo_step.py --quick            # tiny smoke run
    .venv-ax021/bin/python benchmarks/dpo_step.py    # against Axolotl 0.21
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from workload import RESULTS, machine, pair_rows, word_tokenizer

HERE = Path(__file__).resolve().parent
CONFIGS = ("stock", "stock_liger", "prefalign", "trl116")
OPTIONAL = ("stock_liger", "trl116")  # peers that may not run: recorded, not fatal
OURS = "prefalign"
TRL_PYTHON = Path(
    os.environ.get("PREFALIGN_TRL116_PYTHON", HERE.parent / ".venv-trl116/bin/python")
)
# Named shapes (--shapes); "custom" is the --vocab/--hidden/--layers/--tokens flags.
SHAPES = {
    "h256": {"vocab": 128256, "hidden": 256, "layers": 2, "tokens": 1024},
    "h1024": {"vocab": 128256, "hidden": 1024, "layers": 4, "tokens": 2048},
}
QUICK = {"vocab": 512, "hidden": 64, "layers": 1, "tokens": 32}
# Step-1 agreement with ours: the tolerances tests/test_dpo_trainer.py holds our
# trainer to against Axolotl's stock DPO (torch.isclose: |a-b| <= atol + rtol*|ours|).
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}
PERTURB = 0.05  # std of the noise that moves the trained adapter off its reference
LOSS_SETTINGS = {
    "beta": 0.1,
    "loss_type": "sigmoid",
    "reference": "frozen 'ref' copy of the initial adapter (= adapter off at B=0)",
    "learning_rate": 1e-4,
    "optimizer": "transformers default (adamw_torch)",
    "max_grad_norm": 1.0,
}


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


def save_initial(args, path: Path) -> None:
    """The shape's initial weights (base + adapter), which every arm loads."""
    from safetensors.torch import save_file

    state = build_model(args, "cpu").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def load_initial(model, path: str) -> None:
    """Copy the saved initial weights in, one tensor at a time (no second copy)."""
    import torch
    from safetensors import safe_open

    state = model.state_dict(keep_vars=True)
    with safe_open(path, framework="pt") as f, torch.no_grad():
        keys = set(f.keys())
        if keys != set(state):
            missing, unexpected = sorted(set(state) - keys), sorted(keys - set(state))
            raise SystemExit(
                f"{path}: weights do not fit this model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        for key in keys:
            state[key].copy_(f.get_tensor(key))


def perturb_adapter(model) -> None:
    """Move the trained ("default") adapter off its frozen reference copy."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name and "lora_" in name:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.add_(torch.randn(p.shape, generator=g).to(p) * PERTURB)


def pair_digest(inputs) -> dict:
    """Which token ids (and completion positions) a step saw, as a short hash."""
    att = inputs["attention_mask"].bool()
    rows = [
        (ids[m].tolist(), comp[m].tolist())
        for ids, comp, m in zip(
            inputs["input_ids"], inputs["completion_mask"], att, strict=True
        )
    ]
    blob = json.dumps(rows).encode()
    return {
        "sha256": hashlib.sha256(blob).hexdigest()[:16],
        "tokens": [len(ids) for ids, _ in rows],
        "completion_tokens": [sum(comp) for _, comp in rows],
    }


def dataset(args):
    """Pairs whose prompt+chosen and prompt+rejected are exactly `tokens` long."""
    from datasets import Dataset

    return Dataset.from_list(
        pair_rows(args.batch * (args.steps + 1), args.tokens, args.vocab)
    )


def common_args(args, device: str, out: str) -> dict:
    """Training arguments every arm shares (TRL 1.16's own defaults differ: it turns
    on gradient checkpointing and bf16 unless told)."""
    return {
        "output_dir": out,
        "per_device_train_batch_size": args.batch,
        "max_steps": args.steps + 1,
        "learning_rate": LOSS_SETTINGS["learning_rate"],
        "beta": LOSS_SETTINGS["beta"],
        "max_length": None,
        "report_to": [],
        "remove_unused_columns": False,
        "use_cpu": device == "cpu",
        "bf16": device == "cuda",
        "gradient_checkpointing": args.grad_ckpt,
        "logging_steps": 10**6,
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "train_sampling_strategy": "sequential",  # step 1 is pair 0 in every arm
    }


def make_trainer(args, model, device: str):
    """The arm's trainer on the shared model and pairs."""
    kw = common_args(args, device, tempfile.mkdtemp())
    data, tok = dataset(args), word_tokenizer(args.vocab)
    if args.which == "trl116":
        from trl import DPOConfig, DPOTrainer

        targs = DPOConfig(loss_type=[LOSS_SETTINGS["loss_type"]], **kw)
        return DPOTrainer(
            model, None, args=targs, train_dataset=data, processing_class=tok
        )
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig

    targs = AxolotlDPOConfig(use_liger_kernel=args.which == "stock_liger", **kw)
    if args.which in ("stock", "stock_liger"):
        from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer as cls

        extra = {}
    else:
        from axolotl_prefalign.core.config import PrefAlignConfig
        from axolotl_prefalign.integrations.axolotl.trainers.dpo import (
            PrefAlignDPOTrainer as cls,
        )

        extra = {"prefalign": PrefAlignConfig(loss="sigmoid", chunk_size=args.chunk)}
    return cls(
        model, None, args=targs, train_dataset=data, processing_class=tok, **extra
    )


def step_one_probe(trainer) -> dict:
    """Record step 1's loss, token ids and raw LoRA gradients (before clipping)."""
    seen: dict = {"grads": {}, "hooks": []}

    def keep(name):
        def hook(p):
            if name not in seen["grads"]:
                seen["grads"][name] = p.grad.detach().float().cpu().clone()

        return hook

    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            seen["hooks"].append(p.register_post_accumulate_grad_hook(keep(name)))
    inner = trainer.compute_loss

    def compute_loss(model, inputs, *a, **k):
        out = inner(model, inputs, *a, **k)
        if "loss" not in seen:
            seen["loss"] = float((out[0] if isinstance(out, tuple) else out).detach())
            seen["pairs"] = pair_digest(inputs)
        return out

    trainer.compute_loss = compute_loss
    return seen


def worker(args) -> dict:
    import resource

    import torch
    from transformers import TrainerCallback

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args, device)
    if args.init:
        load_initial(model, args.init)
    trainer = make_trainer(args, model, device)
    perturb_adapter(trainer.model)
    probe = step_one_probe(trainer)
    times: list[float] = []
    cpu_times: list[float] = []  # process CPU seconds: less swayed by other load

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)
            cpu_times.append(time.process_time() - self.c)
            for hook in probe["hooks"]:  # step 1 recorded: no cost after it
                hook.remove()
            probe["hooks"] = []

    trainer.add_callback(Timer())
    if args.profile:
        trainer.add_callback(profiler_callback(args, device))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.train()
    import trl

    peft_cfg = trainer.accelerator.unwrap_model(trainer.model).peft_config
    result = {
        "which": args.which,
        "trl": trl.__version__,
        "step_s_median": statistics.median(times[1:]),
        "step_times_s": times,
        "step_cpu_s_median": statistics.median(cpu_times[1:]),
        "step_cpu_times_s": cpu_times,
        "torch_threads": torch.get_num_threads(),
        "tokens_per_step": args.batch * 2 * args.tokens,
        "reference": "ref adapter" if "ref" in peft_cfg else "adapter off",
        "step1_loss": probe["loss"],
        "step1_pairs": probe["pairs"],
    }
    if args.dump:
        torch.save(probe["grads"], Path(args.dump) / f"{args.which}.pt")
    if device == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mib"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        result["rss_before_train_mib"] = base_rss
    return result


def profiler_callback(args, device: str):
    """torch.profiler over step 2 (after the warm-up); writes the top ops table."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    acts = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if device == "cuda" else []
    )

    class Profile(TrainerCallback):
        def on_step_begin(self, a, state, c, **k):
            if state.global_step == 1:
                self.prof = profile(activities=acts, profile_memory=True)
                self.prof.__enter__()

        def on_step_end(self, a, state, c, **k):
            if state.global_step == 2:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                avg = self.prof.key_averages()
                text = "\n\n".join(
                    avg.table(sort_by=key, row_limit=25)
                    for key in ("self_cpu_time_total", "self_cpu_memory_usage")
                )
                Path(args.profile).write_text(text)

    return Profile()


def run_arm(which: str, args, init: Path, dump: Path) -> tuple[dict | None, str]:
    """One arm in its own process: (result, why it did not run)."""
    python = sys.executable
    if which == "trl116":
        if not TRL_PYTHON.exists():
            return (
                None,
                f"no TRL 1.16 environment at {TRL_PYTHON}: bash tests/trl_env.sh",
            )
        python = str(TRL_PYTHON)
    cmd = [python, __file__, "--which", which, "--init", str(init), "--dump", str(dump)]
    for key in ("vocab", "hidden", "layers", "tokens", "batch", "steps", "chunk"):
        if getattr(args, key) is not None:
            cmd += ["--" + key, str(getattr(args, key))]
    if args.grad_ckpt:
        cmd.append("--grad-ckpt")
    if args.profile and which in (OURS, "trl116"):
        cmd += ["--profile", f"{args.profile}.{which}.txt"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode == 0 and line:
        return json.loads(line[-1][7:]), ""
    return None, (proc.stderr or proc.stdout)[-3000:]


def agreement(results: dict, dump: Path) -> dict:
    """Each arm's step-1 loss, LoRA gradients and token ids against ours."""
    import torch

    if OURS not in results:
        return {}
    ours = torch.load(dump / f"{OURS}.pt")
    ref_loss = torch.tensor(results[OURS]["step1_loss"], dtype=torch.float64)
    out = {}
    for which, r in results.items():
        grads = torch.load(dump / f"{which}.pt")
        loss = torch.tensor(r["step1_loss"], dtype=torch.float64)
        shared = [n for n in ours if n in grads]
        diffs = [(grads[n] - ours[n]).abs().max().item() for n in shared]
        outside = sum(
            (~torch.isclose(grads[n], ours[n], **GRAD_TOL)).sum().item() for n in shared
        )
        # Per tensor ||theirs - ours|| / ||ours||: elementwise rtol is strict on the
        # smallest entries of a tensor whose large ones carry the step.
        rel = [
            ((grads[n] - ours[n]).norm() / ours[n].norm().clamp(min=1e-30)).item()
            for n in shared
        ]
        grads_close = set(grads) == set(ours) and outside == 0
        out[which] = {
            "step1_loss": r["step1_loss"],
            "loss_abs_diff": abs(loss - ref_loss).item(),
            "loss_within_tol": bool(torch.isclose(loss, ref_loss, **LOSS_TOL)),
            "max_abs_grad_diff": max(diffs, default=float("nan")),
            "max_abs_grad": max(g.abs().max().item() for g in ours.values()),
            "lora_tensors": len(grads),
            "grad_elements": sum(ours[n].numel() for n in shared),
            "grad_elements_outside_tol": outside,
            "max_rel_norm_diff": max(rel, default=float("nan")),
            "grads_within_tol": grads_close,
            "same_token_ids": r["step1_pairs"] == results[OURS]["step1_pairs"],
        }
    return out


def ratios_vs(results: dict, base: str, mem_key: str) -> dict:
    """Each arm's step time and peak memory over the base arm's."""
    b = results.get(base)
    if b is None:
        return {}
    return {
        which: {
            "time": r["step_s_median"] / b["step_s_median"],
            "peak": r[mem_key] / b[mem_key],
        }
        for which, r in results.items()
    }


def verdict(ag: dict) -> str:
    """Why an arm does not agree with ours, briefly."""
    if not ag["same_token_ids"]:
        return "NO: other token ids"
    if not ag["loss_within_tol"]:
        return f"NO: loss off by {ag['loss_abs_diff']:.1e}"
    return (
        f"NO: {ag['grad_elements_outside_tol']} of {ag['grad_elements']} grad "
        f"entries (max ‖Δ‖/‖g‖ {ag['max_rel_norm_diff']:.1e})"
    )


def table(title: str, results: dict, ratios: dict, agree: dict, mem_key: str) -> str:
    """The markdown table of one shape."""
    base = "TRL 1.16" if ratios else "-"
    lines = [
        title,
        "| arm | median step (CPU time) | "
        f"peak {'RSS' if 'rss' in mem_key else 'mem'} | "
        f"peak over start | time / {base} | peak / {base} | step-1 loss | "
        "max abs Δgrad vs ours | agrees |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for which, r in results.items():
        rt, ag = ratios.get(which, {}), agree.get(which, {})
        grow = r[mem_key] - r.get("rss_before_train_mib", 0.0)
        ok = ag and ag["loss_within_tol"] and ag["grads_within_tol"]
        ok = ok and ag["same_token_ids"]
        lines.append(
            f"| {which} | {r['step_s_median']:.3f} s "
            f"({r.get('step_cpu_s_median', float('nan')):.1f} s CPU) | "
            f"{r[mem_key]:.0f} MiB | "
            f"{grow:.0f} MiB | {rt.get('time', float('nan')):.2f}× | "
            f"{rt.get('peak', float('nan')):.2f}× | {r['step1_loss']:.6f} | "
            f"{ag.get('max_abs_grad_diff', float('nan')):.2e} | "
            f"{'yes' if ok else verdict(ag) if ag else '-'} |"
        )
    return "\n".join(lines)


def run_shape(name: str, args, versions: dict) -> Path:
    """Every arm at one shape; prints its table and writes its JSON."""
    results, failed = {}, {}
    with tempfile.TemporaryDirectory(prefix="dpo_step_") as tmp:
        init, dump = Path(tmp) / "init.safetensors", Path(tmp)
        save_initial(args, init)
        for which in args.configs:
            result, why = run_arm(which, args, init, dump)
            if result is not None:
                results[which] = result
                continue
            if which in OPTIONAL:
                failed[which] = why
                print(f"{which} did not run:\n{why[-600:]}")
                continue
            print(why)
            raise SystemExit(f"{which} run failed at shape {name}")
        agree = agreement(results, dump)
    mem_key = next(k for k in ("peak_mem_mib", "peak_rss_mib") if k in results[OURS])
    ratios = ratios_vs(results, "trl116", mem_key)
    trl = results.get("trl116", {}).get("trl")
    title = (
        f"\nDPO step [{name}], Axolotl {versions['axolotl']} (TRL {versions['trl']})"
        + (f" vs TRL {trl}" if trl else "")
        + f", V={args.vocab}, H={args.hidden}, L={args.layers}, "
        f"{args.batch}×2×{args.tokens} tokens, LoRA r=16 all-linear"
    )
    print(table(title, results, ratios, agree, mem_key))
    legacy = {}
    if "stock" in results:
        s, p = results["stock"], results[OURS]
        legacy["time_prefalign_over_stock"] = p["step_s_median"] / s["step_s_median"]
        legacy["mem_stock_over_prefalign"] = s[mem_key] / p[mem_key]
    device = "cuda" if mem_key == "peak_mem_mib" else "cpu"
    stem = f"dpo_step_{device}_axolotl{versions['axolotl']}"
    stem += (f"_trl{trl}" if trl else "") + ("" if name == "custom" else f"_{name}")
    out = Path(args.out) if args.out else RESULTS / f"{stem}.json"
    if args.out and len(args.shapes) > 1:
        out = out.with_name(f"{out.stem}_{name}{out.suffix}")
    settings = {k: v for k, v in vars(args).items() if k not in ("which", "out")}
    report = {
        "benchmark": "dpo_step",
        "shape": name,
        "versions": {**versions, **({"trl_arm": trl} if trl else {})},
        "settings": settings,
        "loss_settings": LOSS_SETTINGS,
        "trl116_log_probs": "chunked (trl.kernels ChunkedLogProbFunction, vocab tile "
        "32768; on CPU every position is scored, prompt included)",
        "tolerances": {"loss": LOSS_TOL, "grads": GRAD_TOL},
        "timings": "taken under load (shared CPU): rerun on a quiet machine"
        if args.under_load
        else "quiet machine",
        "not_run": failed,
        "machine": machine(),
        "memory_metric": mem_key,
        "results": results,
        "ratios": legacy,
        "ratios_vs_trl116": ratios,
        "agreement_vs_prefalign": agree,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=1, help="pairs per step")
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps (after 1 warm-up)"
    )
    ap.add_argument("--chunk", type=int, default=None, help="default: from V")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument(
        "--shapes",
        nargs="+",
        choices=["custom", *SHAPES],
        default=["custom"],
        help="h256: V=128256 H=256 L=2 2×1024 tokens; h1024: H=1024 L=4 2×2048; "
        "custom: the --vocab/--hidden/--layers/--tokens flags",
    )
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument(
        "--under-load", action="store_true", help="mark the timings as taken under load"
    )
    ap.add_argument(
        "--profile",
        help="torch.profiler tables of step 2 (ours, TRL's): PREFIX.arm.txt",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--which", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--init", help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes = ["quick"]
    if args.steps is None:
        args.steps = 2 if args.quick else 4
    return args


def main() -> None:
    args = parse_args()
    if args.which:
        print("RESULT " + json.dumps(worker(args)))
        return
    if OURS not in args.configs:
        raise SystemExit(
            f"--configs must include {OURS}: the others are compared to it"
        )

    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("axolotl", "trl", "transformers")}
    for name in args.shapes:
        shape = QUICK if name == "quick" else SHAPES.get(name, {})
        run_shape(name, argparse.Namespace(**{**vars(args), **shape}), versions)


if __name__ == "__main__":
    main()
