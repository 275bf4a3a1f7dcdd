"""Pre-check of the `datasets:` entries that use our types, before Axolotl loads them.

Axolotl reads local files with `datasets`, whose errors name neither the line nor
the field (and a column of mixed types fails the whole file). So at `register`
time every local file behind `type: axolotl_prefalign.contrast` or
`axolotl_prefalign.spa_pairs` or `axolotl_prefalign.robustft` is read here, line by
line, and each row validated
with the format's own row check: under `on_bad_row: error` the first bad row stops
the run naming file, line and field; under `skip` the bad rows are counted and
the entry is pointed at a checked copy without them, so that every row we report
as kept reaches training.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

from ...core.config import PrefAlignConfig
from ...core.local_data import (
    DataFileError,
    is_local,
    keep_checked,
    looks_local,
    read_entry,
)
from ...core.rows import RowChecker

LOG = logging.getLogger("axolotl_prefalign")

CONTRAST_TYPE = "axolotl_prefalign.contrast"
SPA_PAIRS_TYPE = "axolotl_prefalign.spa_pairs"
ROBUSTFT_TYPE = "axolotl_prefalign.robustft"
SPLIT_KEYS = ("datasets", "test_datasets")

# Each check returns the 0-based positions of the usable rows (bad ones raise
# under on_bad_row: error, or are counted by the checker under skip).
RowsCheck = Callable[[list[Any], RowChecker, PrefAlignConfig], list[int]]


def _contrast_ok(rows: list[Any], checker: RowChecker, pa: PrefAlignConfig):
    from ...contrast.format import RowProblem, parse_row

    kept = []
    for idx, row in enumerate(rows):
        try:
            parse_row(row, pa.contrast.fields)
        except RowProblem as err:
            checker.bad(idx, err.field, err.problem)
            continue
        kept.append(idx)
    return kept


def _spa_pairs_ok(rows: list[Any], checker: RowChecker, pa: PrefAlignConfig):
    from ...spa.pairs import normalize_pair

    return [i for i, r in enumerate(rows) if normalize_pair(r, i, checker) is not None]


def _robustft_ok(rows: list[Any], checker: RowChecker, pa: PrefAlignConfig):
    from ...robustft.pipeline import prepare_rows

    _, skipped = prepare_rows(rows, pa.robustft, checker)
    return [i for i in range(len(rows)) if i not in skipped]


ROWS_CHECKS: dict[str, RowsCheck] = {
    CONTRAST_TYPE: _contrast_ok,
    SPA_PAIRS_TYPE: _spa_pairs_ok,
    ROBUSTFT_TYPE: _robustft_ok,
}


def precheck_entry(
    entry: MutableMapping[str, Any], pa: PrefAlignConfig
) -> tuple[int, int] | None:
    """Check one entry of our types: (rows kept, rows skipped), None if not ours."""
    check = ROWS_CHECKS.get(str(entry.get("type")))
    if check is None:
        return None
    if not is_local(entry):
        if looks_local(entry):
            raise DataFileError(f"{entry.get('path')} does not exist")
        return None  # a hub dataset: Axolotl loads it, our transform checks rows
    data = read_entry(entry, pa.on_bad_row)
    checked = keep_checked(
        data,
        lambda rows, checker: check(rows, checker, pa),
        pa.on_bad_row,
        copy_always=data.converted or bool(data.recoded),
    )
    if checked.copy is not None:
        if not checked.skipped:
            what = f"LLaMA-Factory dataset {entry.get('name')!r}"
            LOG.info(
                "%s: %d row(s) of %s, read as %s",
                data.source,
                len(checked.rows),
                what if data.converted else data.recoded,
                checked.copy,
            )
        entry["path"] = str(checked.copy)
        entry["ds_type"] = "json"
        for key in ("data_files", "name"):  # the copy is one plain jsonl file
            entry.pop(key, None)
    return len(checked.rows), checked.skipped


_deferred = False


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Load a config without the pre-check (contrast-preview shows bad rows)."""
    global _deferred
    before, _deferred = _deferred, True
    try:
        yield
    finally:
        _deferred = before


def precheck_datasets(cfg: MutableMapping[str, Any], pa: PrefAlignConfig) -> None:
    """Pre-check every local `datasets:`/`test_datasets:` entry of our types."""
    if _deferred:
        return
    for key in SPLIT_KEYS:
        for entry in cfg.get(key) or []:
            if isinstance(entry, MutableMapping):
                precheck_entry(entry, pa)
