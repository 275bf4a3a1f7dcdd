"""The report of robustft_mc.py: markdown tables and the bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common
from robustft_mc_arms import ARMS, DENOISE_ARMS, LABELS, min_options


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
    lines = accuracy_lines(result) + denoise_lines(result)
    lines += expert_lines(result) + time_lines(result)
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


def accuracy_lines(result: dict) -> list[str]:
    """The title, the settings and test accuracy per seed and arm."""
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
    return lines


def denoise_lines(result: dict) -> list[str]:
    """Each denoise arm's detection against the gold and the training set it got."""
    lines = [
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
    return lines


def expert_lines(result: dict) -> list[str]:
    """The labels' and each expert's accuracy on the training questions, if any."""
    experts = sorted(
        {
            k
            for rec in result["runs"].values()
            for arm in DENOISE_ARMS
            for k in (rec["arms"].get(arm) or {}).get("expert_accuracy") or {}
            if k != "labels"
        }
    )
    if not experts:
        return []
    lines = [
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
                lines.append(f"| {seed} | {LABELS[arm]} | " + " | ".join(cells) + " |")
    return lines


def time_lines(result: dict) -> list[str]:
    """Wall time per arm and phase, in minutes."""
    lines = [
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
    return lines


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
    # chance: one of the options at random (2 for SST-2, 4 or more otherwise)
    ax.axhline(1 / min_options(s["data"]), color="#ccc", lw=0.8, ls="--")
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"{s['dataset_name']}, SmolLM2-135M, {s['noise']:.0%} label noise, "
        f"seeds {s['seeds']}{' (QUICK SMOKE)' if s['quick'] else ''}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
