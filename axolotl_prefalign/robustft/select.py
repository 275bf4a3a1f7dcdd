"""Stage 5: keep the most confident relabelled rows (docs/methods.md#robustft-select).

H = −(1/N) Σ_j log p(y_j | q, y_<j), the mean negative log-likelihood of the
context-enhanced reply (`Generation.mean_nll`); the ceil(β·n) rows with the lowest
H are kept (β = `select_ratio`, paper: 0.5). The official code keeps the rows below
the median H of all noisy rows; here the fraction is taken over the rows that got a
pseudo-label, so dropped rows do not shift the cut.

`selection: quota` (beyond the paper) keeps the same total ceil(β·n) but splits it
per label in proportion to the label distribution of the INPUT rows, so a set whose
relabels drift towards one answer (a weak expert's favourite) keeps its input
balance: quota_c = total · share_c rounded by largest remainder (ties: the label
that sorts first), capped by the candidates label c has, lowest H within each label.
A label with fewer candidates than its quota hands the shortfall to the labels that
have more, again in proportion to their input shares, so the total is always
ceil(β·n), as with the entropy selection.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset


def _entropies(ds: Dataset, column: str) -> list[float]:
    values = (
        [float(v) if v is not None else math.inf for v in ds[column]] if len(ds) else []
    )
    bad = [i for i, v in enumerate(values) if math.isnan(v)]
    if bad:
        raise FloatingPointError(
            f"robustft: entropy is NaN for {len(bad)} row(s) (first: position {bad[0]})"
        )
    return values


def _check_ratio(ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"select_ratio must be in (0, 1], got {ratio}")


def select_by_entropy(ds: Dataset, ratio: float, column: str = "entropy") -> Dataset:
    """The ceil(ratio·n) rows with the lowest `column` (ties keep input order)."""
    _check_ratio(ratio)
    values = _entropies(ds, column)
    keep = math.ceil(ratio * len(values))
    order = sorted(range(len(values)), key=lambda i: (values[i], i))[:keep]
    return ds.select(sorted(order))


def largest_remainder(total: int, counts: Mapping[str, int]) -> dict[str, int]:
    """`total` split in proportion to `counts`: floors, then one more to the largest
    remainders (ties: the label that sorts first)."""
    n = sum(counts.values())
    if n == 0:
        return {c: 0 for c in counts}
    # In integers (total·k = quota·n + remainder): float remainders would break
    # ties by rounding error (4·6/10 − 2 < 4·1/10).
    quota = {c: total * k // n for c, k in counts.items()}
    rest = {c: total * k % n for c, k in counts.items()}
    left = total - sum(quota.values())
    for c in sorted(rest, key=lambda c: (-rest[c], c))[:left]:
        quota[c] += 1
    return quota


def select_by_quota(
    ds: Dataset,
    ratio: float,
    input_labels: Sequence[str],
    *,
    label_column: str = "new_label",
    column: str = "entropy",
) -> tuple[Dataset, dict[str, dict[str, int]]]:
    """ceil(ratio·n) rows split per label like `input_labels`, lowest `column`
    within each label: (kept rows in input order, label → quota/available/kept)."""
    _check_ratio(ratio)
    values = _entropies(ds, column)
    labels = [str(x) for x in ds[label_column]] if len(ds) else []
    total = math.ceil(ratio * len(values))
    shares = Counter(str(x) for x in input_labels)
    quota = largest_remainder(total, shares)
    available = Counter(labels)
    take = {c: min(quota.get(c, 0), available[c]) for c in available}
    while sum(take.values()) < total:
        # total ≤ n, so some label always has candidates to spare.
        spare = {c: available[c] - take[c] for c in available if available[c] > take[c]}
        weights = {c: shares.get(c, 0) for c in spare}
        if not sum(weights.values()):  # only labels the input never had are left
            weights = spare
        extra = largest_remainder(total - sum(take.values()), weights)
        for c, k in extra.items():
            take[c] += min(k, spare[c])
    keep: list[int] = []
    plan: dict[str, dict[str, int]] = {}
    for label in sorted(set(quota) | set(available)):
        mine = sorted(
            (i for i, x in enumerate(labels) if x == label),
            key=lambda i: (values[i], i),
        )
        kept = take.get(label, 0)
        keep += mine[:kept]
        plan[label] = {
            "quota": quota.get(label, 0),
            "available": len(mine),
            "kept": kept,
        }
    return ds.select(sorted(keep)), plan


def label_counts(labels: Sequence[Any]) -> dict[str, int]:
    """Label → count, labels sorted (None is counted as "none")."""
    counts = Counter("none" if x is None else str(x) for x in labels)
    return dict(sorted(counts.items()))
