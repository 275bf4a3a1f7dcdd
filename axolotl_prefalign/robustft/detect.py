"""Stage 2–3: extract the experts' answers and split the rows into clean and noisy.

Paper rule (docs/methods.md#robustft-detect): a row is clean when BOTH the plain
prediction ŷ and the reasoning-enhanced prediction ŷ_r agree with its label y
(`agreement: all`; with several experts, every prediction of every expert).
`majority` asks for more than half of the predictions, `any` for one. A prediction
with no extractable answer never agrees. A log-likelihood prediction
(`expert_scoring: loglik`, the cross-fitted expert) is one vote (prompt "loglik")
with its option probabilities.

`detection: cleanlab` (beyond the paper): the noisy rows are those
`cleanlab.filter.find_label_issues(labels, pred_probs)` flags (confident learning,
Northcutt et al. 2021; default `filter_by`), with the label's option position as the
class and the option probabilities as pred_probs (the cross-fitted expert's
out-of-fold ones when there is one, else the mean over the experts).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from datasets import Dataset

from .answers import answers_match, extract_answer, letters

AGREEMENT_RULES = ("all", "majority", "any")
CLEANLAB_INSTALL = "pip install 'cleanlab>=2.6'"
# Fewer labelled examples of a class than this and confident learning has no
# per-class threshold to speak of (cleanlab needs one to estimate it at all).
CLEANLAB_MIN_PER_CLASS = 2


class DetectionError(ValueError):
    """Detection cannot run on these rows with these settings."""


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


def cleanlab_noisy(labels: Sequence[int], pred_probs: np.ndarray) -> list[bool]:
    """`cleanlab.filter.find_label_issues(labels, pred_probs)` as a list of flags,
    after checking every class has CLEANLAB_MIN_PER_CLASS labelled examples."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as err:
        raise DetectionError(
            f"detection: cleanlab needs the cleanlab package: {CLEANLAB_INSTALL}"
        ) from err
    n_classes = pred_probs.shape[1]
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes)
    short = [i for i in range(n_classes) if counts[i] < CLEANLAB_MIN_PER_CLASS]
    if short:
        what = ", ".join(f"{letters(n_classes)[i]}: {counts[i]}" for i in short)
        raise DetectionError(
            f"detection: cleanlab needs at least {CLEANLAB_MIN_PER_CLASS} rows "
            f"labelled with each option position; too few for {what} (of "
            f"{len(labels)} rows); use detection: agreement for this set"
        )
    issues = find_label_issues(np.asarray(labels, dtype=int), pred_probs)
    return [bool(x) for x in issues]


def _pred_probs(rows: Sequence[Mapping[str, Any]]) -> tuple[list[int], np.ndarray]:
    """(label classes, [n, K] option probabilities) of rows for cleanlab."""
    missing = [r["idx"] for r in rows if r["option_probs"] is None]
    if missing:
        raise DetectionError(
            "detection: cleanlab needs option probabilities for every row, and "
            f"{len(missing)} row(s) have none (not multiple-choice; first: row "
            f"{missing[0]}); use detection: agreement, or only multiple-choice rows"
        )
    widths = Counter(len(r["option_probs"]) for r in rows)
    if len(widths) > 1:
        raise DetectionError(
            "detection: cleanlab treats the option positions as classes, so every "
            "row needs the same number of options; found "
            + ", ".join(f"{n} rows with {k}" for k, n in sorted(widths.items()))
        )
    k = next(iter(widths))
    labels = [letters(k).index(r["label"]) for r in rows]
    probs = np.asarray([r["option_probs"] for r in rows], dtype=np.float64)
    # find_label_issues wants rows that sum to 1; the softmax does up to rounding.
    return labels, probs / probs.sum(axis=1, keepdims=True)


def mean_probs(found: Sequence[Sequence[float]]) -> list[float] | None:
    """The experts' mean option probabilities (None when none has any)."""
    if not found:
        return None
    return [float(x) for x in np.mean(np.asarray(found, dtype=np.float64), axis=0)]


def detect_noise(
    rows: Dataset,
    predictions: Mapping[str, Dataset],
    *,
    agreement: str = "all",
    rel_tol: float = 1e-2,
    detection: str = "agreement",
    probs_expert: str | None = None,
) -> Dataset:
    """Add each expert's extracted answers and the clean/noisy verdict to `rows`.

    `predictions` maps an expert name to its `predict_rows` output (idx, plain,
    reasoning, and with log-likelihood scoring option_probs / loglik_answer). New
    columns: `votes` (expert, prompt, answer, agrees, and option_probs when any
    expert scores options), `noisy`, `experts_agreed` (experts all of whose
    predictions agreed), `reasoning_answer` (the experts' consensus ŷ_r),
    `reasoning_text` (a reply that gave it) and, with option probabilities,
    `option_probs`: `probs_expert`'s (the cross-fitted expert), else the mean.
    """
    if detection not in ("agreement", "cleanlab"):
        raise ValueError(f"detection must be agreement or cleanlab, got {detection!r}")
    by_expert = {name: {r["idx"]: r for r in ds} for name, ds in predictions.items()}
    scored = any("option_probs" in ds.column_names for ds in predictions.values())

    def check(row: dict[str, Any]) -> dict[str, Any]:
        kind, options = row["kind"], row.get("options") or ()
        votes: list[dict[str, Any]] = []
        reasoned: list[tuple[str | None, str]] = []
        probs: dict[str, list[float]] = {}
        for name, preds in by_expert.items():
            if row["idx"] not in preds:
                raise KeyError(
                    f"expert {name!r} has no prediction for row {row['idx']}"
                )
            pred = preds[row["idx"]]
            if pred.get("option_probs") is not None:
                answer = pred["loglik_answer"]
                votes.append(
                    {
                        "expert": name,
                        "prompt": "loglik",
                        "answer": answer,
                        "agrees": answers_match(answer, row["label"], kind, rel_tol),
                        "option_probs": pred["option_probs"],
                    }
                )
                probs[name] = pred["option_probs"]
            for which in ("plain", "reasoning"):
                text = pred.get(which)
                if text is None:
                    continue
                answer = extract_answer(text, kind, options)
                agrees = answers_match(answer, row["label"], kind, rel_tol)
                vote = {
                    "expert": name,
                    "prompt": which,
                    "answer": answer,
                    "agrees": agrees,
                }
                if scored:  # one struct type for every vote of the column
                    vote["option_probs"] = None
                votes.append(vote)
                if which == "reasoning":
                    reasoned.append((answer, text))
        agreed = Counter(v["expert"] for v in votes if v["agrees"])
        total = Counter(v["expert"] for v in votes)
        r_answer = consensus([a for a, _ in reasoned], kind, rel_tol)
        r_text = next(
            (t for a, t in reasoned if answers_match(a, r_answer, kind, rel_tol)),
            reasoned[0][1] if reasoned else "",
        )
        out = {
            "votes": votes,
            "noisy": not is_clean([v["agrees"] for v in votes], agreement),
            "experts_agreed": [
                e for e in by_expert if agreed[e] and agreed[e] == total[e]
            ],
            "reasoning_answer": r_answer,
            "reasoning_text": r_text,
        }
        if scored:
            out["option_probs"] = (
                probs.get(probs_expert)
                if probs_expert is not None
                else mean_probs(list(probs.values()))
            )
        return out

    checked = [{**row, **check(row)} for row in rows]
    if detection == "cleanlab" and checked:
        if not scored:
            raise DetectionError(
                "detection: cleanlab needs option probabilities (expert_scoring: "
                "loglik or expert_training: crossfit)"
            )
        labels, pred_probs = _pred_probs(checked)
        for row, noisy in zip(checked, cleanlab_noisy(labels, pred_probs), strict=True):
            row["noisy"] = noisy
    # Built in Python and converted once: Arrow infers each column's type from all
    # rows (a batch whose answers are all None would otherwise fix a null type).
    return Dataset.from_list(checked)
