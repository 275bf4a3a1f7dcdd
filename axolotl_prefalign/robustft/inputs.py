"""The input rows of a RobustFT run: read, validated, labels parsed.

Every row that cannot be denoised (no question, an unparsable label, bad options)
is named by file, line and field (`on_bad_row: error`) or skipped and counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset

from ..core.config import RobustFTConfig
from ..core.local_data import DataFileError, LocalRows, read_entry
from ..core.rows import RowChecker, text_problem
from .answers import LabelError, infer_kind, label_text, parse_label
from .errors import RobustFTError

# A Dataset, or rows read by local_data (plain dicts, possibly of mixed types).
Rows = Dataset | Sequence[Mapping[str, Any]]


def prepare_rows(
    ds: Rows, settings: RobustFTConfig, checker: RowChecker
) -> tuple[Dataset, dict[int, str]]:
    """Validate every row and parse its label: (rows to denoise, skipped idx → why).

    Rows get `idx` (position in `ds`), `question`, `options`, `kind`, `label`
    (canonical answer), `style` (how to write a label back) and `gold`.
    """
    f = settings.fields
    has_options = f.options is not None and f.options in _column_names(ds)
    out: list[dict[str, Any]] = []
    skipped: dict[int, str] = {}

    def bad(idx: int, fld: str, problem: str) -> None:
        checker.bad(idx, fld, problem)  # raises under on_bad_row: error
        skipped[idx] = f"{fld}: {problem}"

    for idx, row in enumerate(ds):
        problem = text_problem(row, f.question)
        if problem:
            bad(idx, f.question, problem)
            continue
        try:
            label = label_text(row.get(f.answer))
        except LabelError as err:
            bad(idx, f.answer, str(err))
            continue
        options = row.get(f.options) if has_options else None
        if options is not None:
            problem = _options_problem(options)
            if problem:
                bad(idx, f.options, problem)
                continue
            options = [o.strip() for o in options]
        kind = infer_kind(label, options, settings.answer_type)
        if kind == "choice" and not options:
            where = f"column {f.options!r}" if f.options else "an options column"
            bad(idx, f.options or f.answer, f"answer_type choice needs {where}")
            continue
        try:
            canonical, style = parse_label(label, kind, options)
        except LabelError as err:
            bad(idx, f.answer, str(err))
            continue
        gold = None
        if settings.gold_field:
            try:
                gold, _ = parse_label(row.get(settings.gold_field), kind, options)
            except LabelError as err:
                bad(idx, settings.gold_field, str(err))
                continue
        out.append(
            {
                "idx": idx,
                "question": row[f.question].strip(),
                "options": options,
                "kind": kind,
                "label": canonical,
                "style": style,
                "gold": gold,
            }
        )
    checker.report()
    return Dataset.from_list(out) if out else Dataset.from_dict({"idx": []}), skipped


def _options_problem(options: Any) -> str | None:
    if not isinstance(options, list):
        return f"options must be a list of texts, got {type(options).__name__}"
    if len(options) < 2:
        return f"needs at least 2 options, got {len(options)}"
    if len(options) > 26:
        return f"at most 26 options (letters A-Z), got {len(options)}"
    for i, opt in enumerate(options):
        if not isinstance(opt, str) or not opt.strip():
            return f"option {i} must be non-empty text, got {opt!r}"
    return None


def load_input(ds_cfg: Mapping[str, Any], on_bad_row: str = "error") -> LocalRows:
    """The rows of a local file or folder named by a `datasets:` entry, each with
    its line (no hub or remote datasets)."""
    try:
        return read_entry(ds_cfg, on_bad_row)
    except DataFileError as err:
        raise RobustFTError(
            f"RobustFT reads local .json/.jsonl/.parquet/.csv data only: {err}"
        ) from None


def _column_names(ds: Rows) -> list[str]:
    names = getattr(ds, "column_names", None)
    if names is not None:
        return list(names)
    return list(dict.fromkeys(k for row in ds for k in row))
