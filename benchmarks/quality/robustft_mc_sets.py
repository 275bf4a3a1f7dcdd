"""The training sets of robustft_mc.py's arms and their numbers against the gold
column: label accuracy, answers by letter, each expert's accuracy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import common


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


def expert_accuracy(report: dict[str, Any]) -> dict[str, float] | None:
    """The labels' and each expert's share of right answers against the gold, from
    the denoise report (`gold.label_accuracy_in`, `gold.expert_accuracy`), or None
    when the report has no per-expert numbers."""
    gold = report.get("gold") or {}
    if "expert_accuracy" not in gold:
        return None
    return {"labels": gold["label_accuracy_in"], **gold["expert_accuracy"]}
