"""Tables and plot of spa_rules.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common

ARMS = ["untrained", "sft", "dpo_seed", "spa", "dpo_all"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def premise_table(result: dict[str, Any]) -> str:
    """One row per candidate: the judge's accuracy against the rule."""
    s = result["settings"]
    lines = [
        f"SPA premise per candidate: seed DPO on {s['premise_size']} rule-labelled "
        f"pairs, then the judge on {s['premise_samples']} unlabelled prompts "
        "(2 samples each); accuracy on the pairs where exactly one answer keeps "
        "the rule, 95% Wilson interval.",
        "",
        "| candidate | rule | base samples keeping it | pairs checked | judge accuracy "
        "| 95% interval | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for cand, r in result["premise"].items():
        if "judge" not in r:
            continue
        j, b = r["judge"], r["base_samples"]["pool"]
        lines.append(
            f"| {cand} | `{r['rule']}` | {b['samples_keeping_rule']}/{b['samples']} "
            f"| {j['total']} of {r['pairs']} | {_pct(j['accuracy'])} "
            f"| {_pct(j['interval_low'])}-{_pct(j['interval_high'])} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def _values(result: dict[str, Any], size: int, arm: str, key: str) -> dict[int, float]:
    out = {}
    for run in result["runs"].values():
        if run.get("size") not in (size, None):
            continue
        entry = run["arms"].get(arm)
        if entry and entry.get(key) is not None:
            out[run["seed"]] = entry[key]
    return out


def compare_table(result: dict[str, Any]) -> str:
    """Mean ± sd over seeds per seed size and arm; per-seed SPA − DPO-seed."""
    sizes = sorted({r["size"] for r in result["runs"].values() if "size" in r})
    lines = [f"Rule: `{result.get('rule')}`.", ""]
    for key, label in (
        ("rule_satisfaction", "held-out rule satisfaction (greedy answer)"),
        ("preference_accuracy", "held-out preference accuracy (implicit reward)"),
    ):
        lines += [f"### {label}", "", "| seed pairs | " + " | ".join(ARMS) + " |"]
        lines.append("|---|" + "---|" * len(ARMS))
        for size in sizes:
            cells = []
            for arm in ARMS:
                if arm == "untrained" and key == "preference_accuracy":
                    cells.append("n/a")  # the base's implicit reward is 0 for all
                    continue
                vals = list(_values(result, size, arm, key).values())
                cells.append(common.fmt_mean_sd(vals))
            lines.append(f"| {size} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### per seed: SPA − seed DPO (points)", ""]
    lines += ["| seed pairs | seed | rule satisfaction | preference accuracy |"]
    lines.append("|---|---|---|---|")
    for size in sizes:
        for seed in sorted(_values(result, size, "spa", "rule_satisfaction")):
            diffs = []
            for key in ("rule_satisfaction", "preference_accuracy"):
                a = _values(result, size, "spa", key).get(seed)
                b = _values(result, size, "dpo_seed", key).get(seed)
                diffs.append("-" if a is None or b is None else f"{100 * (a - b):+.1f}")
            lines.append(f"| {size} | {seed} | {diffs[0]} | {diffs[1]} |")
    lines += ["", "### SPA self-label accuracy per iteration (against the rule)", ""]
    lines += ["| seed pairs | seed | iteration 1 | iteration 2 |", "|---|---|---|---|"]
    order = sorted(result["runs"].values(), key=lambda r: (r.get("size", 0), r["seed"]))
    for run in order:
        spa = run["arms"].get("spa")
        if not spa or "self_labels" not in spa:
            continue
        cells = []
        for i in ("1", "2"):
            s = spa["self_labels"].get(i) or spa["self_labels"].get(int(i))
            cells.append(f"{_pct(s['accuracy'])} ({s['correct']}/{s['pairs']})")
        lines.append(f"| {run['size']} | {run['seed']} | {cells[0]} | {cells[1]} |")
    lines += ["", "### time per arm (s, train + eval, mean over seeds)", ""]
    lines += ["| seed pairs | " + " | ".join(ARMS[1:]) + " |", "|---|" + "---|" * 4]
    for size in sizes:
        cells = []
        for arm in ARMS[1:]:
            t = [
                v.get("train_s", 0) + v.get("eval_s", 0)
                for r in result["runs"].values()
                if r.get("size") in (size, None) and (v := r["arms"].get(arm))
            ]
            cells.append(f"{sum(t) / len(t):.0f}" if t else "-")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Rule satisfaction and preference accuracy per arm, one group per size."""
    if not result.get("runs"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in result["runs"].values() if "size" in r})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(ARMS)
    for ax, key in zip(axes, ("rule_satisfaction", "preference_accuracy"), strict=True):
        for k, arm in enumerate(ARMS):
            for j, size in enumerate(sizes):
                vals = list(_values(result, size, arm, key).values())
                if not vals:
                    continue
                mean, sd = common.mean_sd(vals)
                ax.bar(j + k * width, 100 * mean, width, yerr=100 * sd,
                       color=f"C{k}", label=arm if j == 0 else None)  # fmt: skip
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))])
        ax.set_xticklabels([f"{s} seed pairs" for s in sizes])
        ax.set_ylabel(key.replace("_", " ") + " (%)")
    axes[0].legend(fontsize=8)
    rule = result.get("rule")
    fig.suptitle(f"SPA with a rule as gold: {rule} (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
