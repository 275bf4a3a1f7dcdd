"""What the SPA loop reports: each stage's training statistics, each iteration's
gold report, and the per-iteration tables (printed, and in the model card)."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Any

from ..core.config import SpaConfig
from ..core.shards import atomic_write_json
from .layout import iter_dir

LOG = logging.getLogger("axolotl_prefalign")


def training_stats(d: Path) -> dict[str, Any]:
    """Loss and reward statistics of a finished stage, from the trainer's log
    history (trainer_state.json here or in the newest checkpoint, else its log)."""
    history: list[dict] = []
    candidates = [d / "trainer_state.json"] + sorted(
        d.glob("checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.split("-")[-1]),
        reverse=True,
    )
    for path in candidates:
        if path.exists():
            history = json.loads(path.read_text(encoding="utf-8")).get(
                "log_history", []
            )
            break
    if not history and (d / "train.log").exists():
        for line in (d / "train.log").read_text(encoding="utf-8").splitlines():
            line = line.strip().split("\r")[-1]
            if line.startswith("{") and "loss" in line:
                try:
                    entry = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(entry, dict):
                    history.append(entry)
    return history_stats(history)


def history_stats(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Loss, reward and SPA statistics of a trainer's log history: the last and
    the mean logged value of each, and the final train loss."""
    steps = [h for h in history if "loss" in h]
    final = [h for h in history if "train_loss" in h]
    stats: dict[str, Any] = {"logged_steps": len(steps)}
    if final:
        stats["train_loss"] = float(final[-1]["train_loss"])
    spa_keys = sorted({k for h in steps for k in h if k.startswith("spa/")})
    for key in ("loss", "rewards/accuracies", "rewards/margins", *spa_keys):
        values = [float(h[key]) for h in steps if key in h]
        if values:
            stats[f"last_{key}"] = values[-1]
            stats[f"mean_{key}"] = sum(values) / len(values)
    return stats


def flags_path(spa: SpaConfig, stage_dir: Path) -> Path | None:
    """Where an iteration's training records its noise flags (gold configured)."""
    from .gold import FLAGS_FILE

    return (Path(stage_dir) / FLAGS_FILE).resolve() if spa.has_gold else None


def write_gold_report(
    spa: SpaConfig, iteration: int, stage_dir: Path, prompts: Any
) -> dict[str, Any]:
    """`iter_<i>/gold_report.json`: iteration i's pairs against its prompts' gold,
    with the noise flags its training recorded; returns the report."""
    from ..core.shards import read_shards
    from .gold import (
        FLAG_KINDS,
        FLAGS_FILE,
        REPORT_FILE,
        flag_files,
        gold_report,
        read_flags,
    )

    d = Path(stage_dir)
    has_gold = "gold" in prompts.column_names
    rows = prompts.to_list() if has_gold else []
    flags_file = d / FLAGS_FILE
    report = gold_report(
        rows,
        read_shards(d / "pairs"),
        spa.gold_checker,
        read_flags(flags_file) or None,
        iteration,
    )
    report["flag_files"] = [str(f) for f in flag_files(flags_file)]
    if not has_gold:
        report["note"] = "this iteration's prompt source has no gold_field"
    atomic_write_json(d / REPORT_FILE, report)
    flags = report["noise_flags"]
    LOG.info(
        "SPA iteration %d gold (%s): %d pairs: %d exactly one right, %d both, %d "
        "neither, %d unknown; self-label accuracy %s on the exactly-one pairs; noise "
        "flags precision/recall with DND %s / %s, without %s / %s",
        iteration,
        spa.gold_checker,
        report["pairs"],
        report["exactly_one"],
        report["both"],
        report["neither"],
        report["unknown"],
        _fmt(report["self_labels"]["accuracy"], ".3f"),
        *(
            _fmt((flags.get(kind) or {}).get(key), ".3f")
            for kind in FLAG_KINDS
            for key in ("precision", "recall")
        ),
    )
    return report


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The per-iteration statistics as a fixed-width text table."""
    head = (
        f"{'iter':>4} {'pairs':>6} {'ties':>5} {'empty':>5} {'|margin|':>9} "
        f"{'p_judge':>7} {'chosen':>7} {'reject':>7} {'loss':>7} {'acc':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        e, t = r.get("expansion") or {}, r.get("training") or {}
        lines.append(
            f"{r['iteration']:>4} {_fmt(e.get('pairs'), 'd'):>6} "
            f"{_fmt(e.get('ties_dropped'), 'd'):>5} "
            f"{_fmt(e.get('dropped_empty'), 'd'):>5} "
            f"{_fmt(e.get('mean_abs_margin'), '.4f'):>9} "
            f"{_fmt(e.get('mean_judge_prob'), '.3f'):>7} "
            f"{_fmt(e.get('chosen_mean_tokens'), '.1f'):>7} "
            f"{_fmt(e.get('rejected_mean_tokens'), '.1f'):>7} "
            f"{_fmt(t.get('train_loss', t.get('last_loss')), '.4f'):>7} "
            f"{_fmt(t.get('mean_rewards/accuracies'), '.3f'):>6}"
        )
    return "\n".join(lines)


CARD_HEADERS = (
    "iteration",
    "stage",
    "pairs",
    "ties dropped",
    "mean judge p(y_w ≻ y_l)",
    "noisy fraction",
    "τ (last)",
    "train loss",
    "reward accuracy",
)


# With gold answers (a prompt source's gold_field): the self-labels' accuracy and
# the noise flags' precision / recall on the pairs with exactly one right answer.
GOLD_HEADERS = (
    "gold: exactly-one pairs",
    "self-label accuracy",
    "flag precision / recall (DND)",
    "flag precision / recall (no DND)",
)


def _pr(precision: float | None, recall: float | None) -> str | None:
    if precision is None and recall is None:
        return None
    return f"{_fmt(precision, '.3f')} / {_fmt(recall, '.3f')}"


def card_table(rows: list[dict[str, Any]]) -> str:
    """The per-iteration statistics as a markdown table (for the model card):
    expansion pairs, ties, the judge's mean preference probability, the fraction
    of pairs below the confidence threshold τ (mean over logged steps) and τ; with
    gold answers also the gold report's summary (`spa.gold`)."""
    from ..core.model_card import markdown_table

    gold = any(r.get("gold") for r in rows)
    table = []
    for r in rows:
        e, t = r.get("expansion") or {}, r.get("training") or {}
        row = [
            r["iteration"],
            r.get("stage") or ("seed DPO" if r["iteration"] == 0 else "SPA"),
            e.get("pairs"),
            e.get("ties_dropped"),
            e.get("mean_judge_prob"),
            t.get("mean_spa/noisy_fraction"),
            t.get("last_spa/threshold"),
            t.get("train_loss", t.get("last_loss")),
            t.get("mean_rewards/accuracies"),
        ]
        if gold:
            g = r.get("gold") or {}
            row += [
                g.get("exactly_one"),
                g.get("self_label_accuracy"),
                _pr(g.get("flag_precision_dnd"), g.get("flag_recall_dnd")),
                _pr(g.get("flag_precision_plain"), g.get("flag_recall_plain")),
            ]
        table.append(row)
    headers = CARD_HEADERS + (GOLD_HEADERS if gold else ())
    return markdown_table(headers, table)


def gold_table(rows: list[dict[str, Any]]) -> str:
    """The gold reports' summaries as a fixed-width text table."""
    head = (
        f"{'iter':>4} {'pairs':>6} {'one':>5} {'unkn':>5} {'label_acc':>9} "
        f"{'P(dnd)':>7} {'R(dnd)':>7} {'P(plain)':>8} {'R(plain)':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        g = r.get("gold")
        if not g:
            continue
        lines.append(
            f"{r['iteration']:>4} {_fmt(g.get('pairs'), 'd'):>6} "
            f"{_fmt(g.get('exactly_one'), 'd'):>5} {_fmt(g.get('unknown'), 'd'):>5} "
            f"{_fmt(g.get('self_label_accuracy'), '.3f'):>9} "
            f"{_fmt(g.get('flag_precision_dnd'), '.3f'):>7} "
            f"{_fmt(g.get('flag_recall_dnd'), '.3f'):>7} "
            f"{_fmt(g.get('flag_precision_plain'), '.3f'):>8} "
            f"{_fmt(g.get('flag_recall_plain'), '.3f'):>8}"
        )
    return "\n".join(lines)


def finished_rows(out: Path, before: int) -> list[dict[str, Any]]:
    """The metrics.json of iterations 0..before−1 that exist (for a stage's card)."""
    rows = []
    for i in range(before):
        path = iter_dir(out, i) / "metrics.json"
        if path.exists():
            rows.append(json.loads(path.read_text(encoding="utf-8")))
    return rows
