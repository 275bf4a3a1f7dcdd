"""Stage 5: keep the most confident relabelled rows (METHODS.md §3, step 3).

H = −(1/N) Σ_j log p(y_j | q, y_<j), the mean negative log-likelihood of the
context-enhanced reply (`Generation.mean_nll`); the ceil(β·n) rows with the lowest
H are kept (β = `select_ratio`, paper: 0.5). The official code keeps the rows below
the median H of all noisy rows; here the fraction is taken over the rows that got a
pseudo-label, so dropped rows do not shift the cut.
"""

from __future__ import annotations

import math

from datasets import Dataset


def select_by_entropy(ds: Dataset, ratio: float, column: str = "entropy") -> Dataset:
    """The ceil(ratio·n) rows with the lowest `column` (ties keep input order)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"select_ratio must be in (0, 1], got {ratio}")
    values = (
        [float(v) if v is not None else math.inf for v in ds[column]] if len(ds) else []
    )
    bad = [i for i, v in enumerate(values) if math.isnan(v)]
    if bad:
        raise FloatingPointError(
            f"robustft: entropy is NaN for {len(bad)} row(s) (first: position {bad[0]})"
        )
    keep = math.ceil(ratio * len(values))
    order = sorted(range(len(values)), key=lambda i: (values[i], i))[:keep]
    return ds.select(sorted(order))
