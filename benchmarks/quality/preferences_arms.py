"""The arms of preferences_little_data.py: the data split and each arm's YAML."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import common

ARMS = [
    "dpo_seed",
    "sft_chosen",
    "contrast_seed",
    "contrast_curriculum",
    "spa",
    "spa_listed",
    "dpo_all",
]
# the SPA arms: the name is the work folder; spa_listed's prompts list the options
SPA_ARMS = ("spa", "spa_listed")
# the base model, scored with the chat template / with the contrast inference prompt
BASELINES = ["untrained", "untrained_contrast"]
# arms scored with the contrast format's inference prompt ("...Positive answer:")
CONTRAST_PROMPT = ("contrast_seed", "sft_chosen", "contrast_curriculum")
# settings that must match for a rerun to keep an earlier run's finished arms
SHARED_KEYS = ("dataset", "n_pool", "n_test", "epochs", "dpo_lr")
RESUME_KEYS = (*SHARED_KEYS, "seed_size", "spa_prompts", "spa_max_new_tokens")
RESUME_KEYS += ("spa_gold", "contrast")
# arms that do not depend on the seed size: reused from the other seed sizes' runs
SEED_FREE = ("dpo_all",)
# the gold checker of the SPA arm: each prompt's correct option among its options
SPA_GOLD = {"gold_field": "gold", "gold_options_field": "options"}
SPA_GOLD_CHECKER = "choice"


def make_split(args: Any, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(seed pairs, unlabelled prompts, test rows with a fixed rejected option).

    The pool order and every rejected option depend on the seed only, so a smaller
    seed is the start of a larger one and the pool's pairs are the same for every
    seed size.
    """
    rows = common.arc_easy_rows()
    random.Random(1234).shuffle(rows)  # the test split is the same for every seed
    test, pool = rows[: args.n_test], rows[args.n_test : args.n_test + args.n_pool]
    if not 2 <= args.seed_size < len(pool):
        raise SystemExit(
            f"--seed-size {args.seed_size} must be at least 2 and below the pool "
            f"({len(pool)} questions)"
        )
    rng = random.Random(seed)
    rng.shuffle(pool)
    pairs = []
    for r in pool + test:
        wrong = [o for o in r["options"] if o != r["gold"]]
        r["rejected"] = rng.choice(wrong)
    for r in pool:
        pairs.append(
            {
                "prompt": r["question"],
                "chosen": r["gold"],
                "rejected": r["rejected"],
                # for the SPA gold report only; training reads the three above
                "options": r["options"],
            }
        )
    n = args.seed_size
    return pairs[:n], pairs[n:], test


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


def spa_cfg(
    work: Path,
    seed_path: Path,
    prompts: Path,
    n_prompts: int,
    args: Any,
    seed: int,
    arm: str = "spa",
) -> dict:
    """`axolotl prefalign spa`: seed DPO, then 2 self-annotation iterations; the
    prompts' correct options make the loop write iter_<i>/gold_report.json."""
    cfg = dpo_cfg(work, arm, seed_path, args, seed)
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
            "prompts": [{"path": str(prompts), **SPA_GOLD}],
            "prompts_per_iteration": [per_iter, per_iter],
            "seed": seed,
            "gold_checker": SPA_GOLD_CHECKER,
        },
    }
    cfg["save_strategy"] = "epoch"  # the summary reads the last trainer_state.json
    return cfg


def contrast_cfg(
    work: Path, data: Path, args: Any, seed: int, arm: str = "contrast_seed"
) -> dict:
    """Plaintext contrast SFT (preset en, raw mode) on the seed pairs.

    `sft_chosen` is the same run with every row positive-only: SFT on the chosen
    answer after exactly the prompt the contrast arm is scored with, one row per
    pair (the same rows, micro batches and steps), no negative answer anywhere.
    `contrast_curriculum` is the contrast run with the rows in curriculum order
    (largest base-model margin first), sampled in that order in every epoch.
    """
    ratio = 1.0 if arm == "sft_chosen" else 0.25
    contrast: dict[str, Any] = {"positive_only_ratio": ratio, "seed": seed}
    cfg = common.base_cfg(work / arm, seed)
    if arm == "contrast_curriculum":
        contrast["curriculum"] = "margin"
        cfg["curriculum_sampling"] = True
    cfg.update(
        {
            # as yaml_examples/contrast-sft.yml: a quarter of the rows are
            # positive-only, the form of the inference prompt we score with
            "prefalign": {"contrast": contrast},
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


def listed_prompt(question: str, options: list[str], ask: str = "Answer:") -> str:
    """The question with its lettered options, then `ask` (spa_listed's prompts
    end with "Answer:")."""
    lines = [f"{'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[k]}. {o}" for k, o in enumerate(options)]
    return "\n".join([question, *lines, ask])


def pair_row(p: dict) -> dict:
    """A pair as the training formats read it (prompt, chosen, rejected)."""
    return {k: p[k] for k in ("prompt", "chosen", "rejected")}


def prompt_gold(p: dict) -> str:
    """A prompt's gold for the SPA checker: the correct option's text, or its
    letter where that text is not one option's alone (after the checker's own
    normalising, which would otherwise stop the run on that row)."""
    try:
        from axolotl_prefalign.spa.gold import normalize
    except ImportError:  # no gold checker here: the spa arm skips anyway
        return p["chosen"]
    same = [o for o in p["options"] if normalize(o) == normalize(p["chosen"])]
    if len(same) == 1:
        return p["chosen"]
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[p["options"].index(p["chosen"])]


def spa_gold_problem(args: Any) -> str | None:
    """Why this checkout cannot run the SPA arm with its gold report, or None."""
    cfg = spa_cfg(args.work, Path("seed.jsonl"), Path("prompts.jsonl"), 2, args, 0)
    return common.prefalign_problem(cfg["prefalign"])


def write_data(
    d: Path, seed_pairs: list[dict], unlabelled: list[dict], test: list[dict]
) -> None:
    """The JSONL files the arms read: seed and all pairs, both prompt sets, test."""
    common.write_jsonl(d / "seed.jsonl", [pair_row(p) for p in seed_pairs])
    common.write_jsonl(d / "all.jsonl", [pair_row(p) for p in seed_pairs + unlabelled])
    common.write_jsonl(
        d / "prompts.jsonl",
        [
            {"prompt": p["prompt"], "gold": prompt_gold(p), "options": p["options"]}
            for p in unlabelled
        ],
    )
    common.write_jsonl(
        d / "prompts_listed.jsonl",
        [
            {
                "prompt": listed_prompt(p["prompt"], p["options"]),
                "gold": prompt_gold(p),
                "options": p["options"],
            }
            for p in unlabelled
        ],
    )
    common.write_jsonl(d / "test.jsonl", test)
