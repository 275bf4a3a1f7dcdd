"""The report of preferences_little_data.py: markdown tables and the bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common
from preferences_arms import ARMS, BASELINES, SPA_ARMS


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
