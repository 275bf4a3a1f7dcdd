"""Row validation shared by every input path: a clear error, or a counted skip."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

LOG = logging.getLogger("axolotl_prefalign")


class BadRowError(ValueError):
    """An input row that cannot be used; the message names source, row and field."""

    def __init__(self, source: str, row: int, fld: str | None, problem: str):
        self.source, self.row, self.field, self.problem = source, row, fld, problem
        where = f"{source}, row {row}" + (f", field {fld!r}" if fld else "")
        super().__init__(f"{where}: {problem}")


@dataclass
class RowChecker:
    """Applies the `on_bad_row` policy and counts what was skipped and why."""

    source: str
    policy: str = "error"
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.policy not in ("error", "skip"):
            raise ValueError(
                f"on_bad_row must be 'error' or 'skip', got {self.policy!r}"
            )

    def bad(self, row: int, fld: str | None, problem: str) -> None:
        """Raise under `error`; count under `skip`."""
        if self.policy == "error":
            raise BadRowError(self.source, row, fld, problem)
        self.skipped[f"{fld}: {problem}" if fld else problem] += 1

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def report(self) -> None:
        """Log the skip counts (never a silent drop)."""
        if self.n_skipped:
            detail = "; ".join(f"{n} × {why}" for why, n in self.skipped.most_common())
            LOG.warning(
                "%s: skipped %d bad row(s) (on_bad_row: skip): %s",
                self.source,
                self.n_skipped,
                detail,
            )


def text_problem(row: Mapping[str, Any], name: str) -> str | None:
    """Why `row[name]` is not usable text, or None when it is."""
    if name not in row or row[name] is None:
        return "missing"
    value = row[name]
    if not isinstance(value, str):
        return f"must be text, got {type(value).__name__}"
    if not value.strip():
        return "empty"
    return None


def check_text_fields(
    checker: RowChecker, idx: int, row: Mapping[str, Any], names: Iterable[str]
) -> bool:
    """True when every named field holds non-empty text; else report and False."""
    for name in names:
        problem = text_problem(row, name)
        if problem:
            checker.bad(idx, name, problem)
            return False
    return True
