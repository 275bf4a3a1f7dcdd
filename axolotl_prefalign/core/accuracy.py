"""An accuracy with its binomial 95% interval, as the premise checks report it.

The interval is Wilson's score interval (scipy's `binomtest(...).proportion_ci`):
unlike the normal approximation it stays inside [0, 1] and keeps its coverage on
the few dozen pairs or rows a premise check runs on.
"""

from __future__ import annotations

from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Accuracy:
    """`correct` of `total` right, with the interval [low, high] (None when
    total = 0)."""

    correct: int
    total: int
    low: float | None
    high: float | None

    @property
    def rate(self) -> float | None:
        return self.correct / self.total if self.total else None

    def as_dict(self) -> dict[str, float | int | None]:
        """The numbers as JSON keys."""
        return {
            "correct": self.correct,
            "total": self.total,
            "accuracy": self.rate,
            "interval_low": self.low,
            "interval_high": self.high,
            "confidence": CONFIDENCE,
        }

    def text(self) -> str:
        """`58.3% (7 of 12), 95% interval 32.0%-80.7%` (or `n/a (0 checked)`)."""
        if not self.total:
            return "n/a (none checked)"
        return (
            f"{100 * self.rate:.1f}% ({self.correct} of {self.total}), "
            f"{100 * CONFIDENCE:.0f}% interval {100 * self.low:.1f}%-"
            f"{100 * self.high:.1f}%"
        )


def binomial_accuracy(correct: int, total: int) -> Accuracy:
    """`correct` of `total` with Wilson's 95% interval."""
    if not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total, got {correct} of {total}")
    if total == 0:
        return Accuracy(0, 0, None, None)
    from scipy.stats import binomtest

    ci = binomtest(correct, total).proportion_ci(CONFIDENCE, method="wilson")
    return Accuracy(correct, total, float(ci.low), float(ci.high))
