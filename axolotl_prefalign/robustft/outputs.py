"""What a RobustFT run writes: denoised.jsonl, all.jsonl and report.json.

report.json is written last and marks the folder complete; `load_result` reads a
finished folder back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..core.config import RobustFTConfig
from ..core.shards import atomic_write_json, atomic_write_text
from .answers import write_label
from .folder import ALL_FILE, REPORT_FILE, TRAIN_FILE
from .inputs import Rows
from .report import build_report, one_answer_experts, warn_if_doubtful

PREFIX = "robustft_"


@dataclass
class DenoiseResult:
    """What one denoising run produced."""

    out_dir: Path
    train: Dataset
    all_rows: Dataset
    report: dict[str, Any]


@dataclass
class RunOutputs:
    """What the stages of one run produced, ready to be written."""

    ds: Rows  # the input rows, as given
    settings: RobustFTConfig
    out_dir: Path
    source: str
    skipped: Mapping[int, str]  # input position → why it was not denoised
    clean: Dataset  # D_clean: rows whose label the experts confirmed
    reviewed: Dataset  # the noisy rows with their pseudo-label (new_label)
    selected: Dataset  # D_select: the reviewed rows kept for training
    experts: list[str]  # names of every expert that voted
    option_probs: bool  # write each row's option probabilities
    cut_reason: str  # why a relabelled row the selection left out was dropped
    report_notes: dict[str, Any] = field(default_factory=dict)  # None: left out


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def row_verdicts(run: RunOutputs) -> dict[int, dict[str, Any]]:
    """Each denoised row by input position, with its status, new label and why."""
    chosen = set(run.selected["idx"]) if len(run.selected) else set()
    info: dict[int, dict[str, Any]] = {}
    for r in run.clean:
        info[r["idx"]] = {**r, "status": "clean", "new": r["label"], "why": None}
    for r in run.reviewed:
        if r["idx"] in chosen:
            status, why = "relabelled", None
        elif r["new_label"] is not None:
            status, why = "dropped", run.cut_reason
        else:
            status, why = "dropped", r["drop_reason"]
        info[r["idx"]] = {**r, "status": status, "new": r["new_label"], "why": why}
    return info


def _written_row(
    idx: int, original: Mapping[str, Any], r: Mapping[str, Any], run: RunOutputs
) -> dict[str, Any]:
    """An input row with its robustft_* columns (and its new answer when kept)."""
    answer_field = run.settings.fields.answer
    if r["status"] == "clean":
        # D_clean is kept as it is: its parsed label ('5' for '5 km') is only
        # for comparing votes, never written back over the original answer.
        new = original.get(answer_field)
    elif r["new"] is not None:
        new = write_label(r["new"], r["kind"], r["style"], r["options"])
    else:
        new = None
    row = dict(original)
    row.update(
        {
            f"{PREFIX}index": idx,
            f"{PREFIX}status": r["status"],
            f"{PREFIX}original_answer": original.get(answer_field),
            f"{PREFIX}new_answer": new,
            f"{PREFIX}entropy": _finite(r.get("entropy")),
            f"{PREFIX}experts_agreed": r["experts_agreed"],
            f"{PREFIX}votes": r["votes"],
            f"{PREFIX}reasoning_answer": r["reasoning_answer"],
            f"{PREFIX}context_answer": r.get("context_answer"),
            f"{PREFIX}neighbours": r.get("neighbours"),
            f"{PREFIX}drop_reason": r["why"],
        }
    )
    if run.option_probs:
        row[f"{PREFIX}option_probs"] = r.get("option_probs")
    if r["status"] != "dropped":
        row[answer_field] = new
    return row


def write_outputs(run: RunOutputs) -> DenoiseResult:
    """Write denoised.jsonl, all.jsonl and report.json (last: marks completion)."""
    info = row_verdicts(run)
    all_rows, train_rows = [], []
    for idx, original in enumerate(run.ds):
        if idx in run.skipped:
            row = dict(original)
            row.update(
                {
                    f"{PREFIX}index": idx,
                    f"{PREFIX}status": "skipped",
                    f"{PREFIX}drop_reason": run.skipped[idx],
                }
            )
            all_rows.append(row)
            continue
        row = _written_row(idx, original, info[idx], run)
        if info[idx]["status"] != "dropped":
            train_rows.append(row)
        all_rows.append(row)

    report = build_report(
        ds_len=len(run.ds),
        skipped=len(run.skipped),
        info=info,
        experts=run.experts,
        settings=run.settings,
        source=run.source,
        rel_tol=run.settings.number_rel_tol,
    )
    report["output_dir"] = str(run.out_dir)
    report["one_answer_experts"] = one_answer_experts(info)
    for name, value in run.report_notes.items():
        if value is not None:
            report[name] = value
    warn_if_doubtful(report)
    _write_jsonl(run.out_dir / ALL_FILE, all_rows)
    _write_jsonl(run.out_dir / TRAIN_FILE, train_rows)
    atomic_write_json(run.out_dir / REPORT_FILE, report)
    return DenoiseResult(
        run.out_dir, _to_dataset(train_rows), _to_dataset(all_rows), report
    )


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_text(
        path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _to_dataset(rows: list[dict[str, Any]]) -> Dataset:
    return Dataset.from_list(rows) if rows else Dataset.from_dict({})


def load_result(out_dir: str | Path) -> DenoiseResult:
    """A finished run read back from its folder."""
    out_dir = Path(out_dir)
    report = json.loads((out_dir / REPORT_FILE).read_text(encoding="utf-8"))
    return DenoiseResult(
        out_dir,
        _to_dataset(_read_jsonl(out_dir / TRAIN_FILE)),
        _to_dataset(_read_jsonl(out_dir / ALL_FILE)),
        report,
    )
