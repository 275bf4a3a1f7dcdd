"""Row validation shared by every input path: a clear error, or a counted skip.

One rule for where a problem is: 1-based, as editors and spreadsheets show it.
A row read from a JSON-lines file is named by its line in the file
(`data.jsonl, line 3, field 'chosen': ...`); any other row by its 1-based position
in the source (`my/dataset, row 3, ...`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

LOG = logging.getLogger("axolotl_prefalign")


def where(source: str, row: int, line: int | None = None) -> str:
    """`source, line L` (a JSON-lines file) or `source, row N` (1-based); a
    negative row means the position is unknown (the source then says which)."""
    if line is not None:
        return f"{source}, line {line}"
    return f"{source}, row {row + 1}" if row >= 0 else source


class BadRowError(ValueError):
    """An input row that cannot be used; the message names source, row and field.

    `row` is the 0-based position in the source, `line` the 1-based line of a
    JSON-lines file when known. The error survives pickling: `datasets` workers
    (num_proc > 1) send it to the parent, which must rebuild it or hang.
    """

    def __init__(
        self,
        source: str,
        row: int,
        fld: str | None,
        problem: str,
        line: int | None = None,
    ):
        self.source, self.row, self.field, self.problem = source, row, fld, problem
        self.line = line
        at = where(source, row, line) + (f", field {fld!r}" if fld else "")
        super().__init__(f"{at}: {problem}")

    def __reduce__(self):
        return (
            type(self),
            (self.source, self.row, self.field, self.problem, self.line),
        )


@dataclass
class RowChecker:
    """Applies the `on_bad_row` policy and counts what was skipped and why."""

    source: str
    policy: str = "error"
    skipped: Counter = field(default_factory=Counter)
    # 1-based file line of each row (JSON-lines input), so errors name the line.
    lines: Sequence[int | None] | None = None

    def __post_init__(self) -> None:
        if self.policy not in ("error", "skip"):
            raise ValueError(
                f"on_bad_row must be 'error' or 'skip', got {self.policy!r}"
            )

    def line_of(self, row: int) -> int | None:
        """The 1-based file line of 0-based row `row`, when known."""
        if self.lines is None or not 0 <= row < len(self.lines):
            return None
        return self.lines[row]

    def bad(
        self, row: int, fld: str | None, problem: str, line: int | None = None
    ) -> None:
        """Raise under `error`; count under `skip`."""
        if self.policy == "error":
            line = line if line is not None else self.line_of(row)
            raise BadRowError(self.source, row, fld, problem, line)
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
