"""Stage 2–3: extract the experts' answers and split the rows into clean and noisy.

Paper rule (METHODS.md §3, step 1): a row is clean when BOTH the plain prediction ŷ
and the reasoning-enhanced prediction ŷ_r agree with its label y (`agreement: all`;
with several experts, every prediction of every expert). `majority` asks for more
than half of the predictions, `any` for one. A prediction with no extractable answer
never agrees.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset

from .answers import answers_match, extract_answer

AGREEMENT_RULES = ("all", "majority", "any")


def is_clean(agrees: Sequence[bool], rule: str) -> bool:
    """Apply the agreement rule to the per-prediction agreement flags."""
    if rule not in AGREEMENT_RULES:
        raise ValueError(f"agreement must be one of {AGREEMENT_RULES}, got {rule!r}")
    if not agrees:
        return False
    if rule == "all":
        return all(agrees)
    if rule == "majority":
        return sum(agrees) * 2 > len(agrees)
    return any(agrees)


def consensus(answers: Sequence[str | None], kind: str, rel_tol: float) -> str | None:
    """The most common answer among the experts (ties: the earliest expert's)."""
    found = [a for a in answers if a is not None]
    if not found:
        return None
    groups: list[list[str]] = []
    for a in found:
        for g in groups:
            if answers_match(a, g[0], kind, rel_tol):
                g.append(a)
                break
        else:
            groups.append([a])
    best = max(len(g) for g in groups)
    return next(g[0] for g in groups if len(g) == best)


def detect_noise(
    rows: Dataset,
    predictions: Mapping[str, Dataset],
    *,
    agreement: str = "all",
    rel_tol: float = 1e-2,
) -> Dataset:
    """Add each expert's extracted answers and the clean/noisy verdict to `rows`.

    `predictions` maps an expert name to its `predict_rows` output (idx, plain,
    reasoning). New columns: `votes` (expert, prompt, answer, agrees), `noisy`,
    `experts_agreed` (experts all of whose predictions agreed), `reasoning_answer`
    (the experts' consensus ŷ_r) and `reasoning_text` (a reply that gave it).
    """
    by_expert = {name: {r["idx"]: r for r in ds} for name, ds in predictions.items()}

    def check(row: dict[str, Any]) -> dict[str, Any]:
        kind, options = row["kind"], row.get("options") or ()
        votes: list[dict[str, Any]] = []
        reasoned: list[tuple[str | None, str]] = []
        for name, preds in by_expert.items():
            if row["idx"] not in preds:
                raise KeyError(
                    f"expert {name!r} has no prediction for row {row['idx']}"
                )
            pred = preds[row["idx"]]
            for which in ("plain", "reasoning"):
                text = pred.get(which)
                if text is None:
                    continue
                answer = extract_answer(text, kind, options)
                agrees = answers_match(answer, row["label"], kind, rel_tol)
                votes.append(
                    {
                        "expert": name,
                        "prompt": which,
                        "answer": answer,
                        "agrees": agrees,
                    }
                )
                if which == "reasoning":
                    reasoned.append((answer, text))
        agreed = Counter(v["expert"] for v in votes if v["agrees"])
        total = Counter(v["expert"] for v in votes)
        r_answer = consensus([a for a, _ in reasoned], kind, rel_tol)
        r_text = next(
            (t for a, t in reasoned if answers_match(a, r_answer, kind, rel_tol)),
            reasoned[0][1] if reasoned else "",
        )
        return {
            "votes": votes,
            "noisy": not is_clean([v["agrees"] for v in votes], agreement),
            "experts_agreed": [
                e for e in by_expert if agreed[e] and agreed[e] == total[e]
            ],
            "reasoning_answer": r_answer,
            "reasoning_text": r_text,
        }

    # Built in Python and converted once: Arrow infers each column's type from all
    # rows (a batch whose answers are all None would otherwise fix a null type).
    return Dataset.from_list([{**row, **check(row)} for row in rows])
