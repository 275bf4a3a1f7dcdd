"""RobustFT end to end: detect → relabel → review → select (docs/methods.md#robustft).

`denoise_dataset` runs the stages over one `datasets.Dataset` and writes, under one
output folder:

    predictions/NN-<expert>/  shards + manifest: each expert's plain / reasoning replies
                              (and option log-likelihoods with expert_scoring: loglik)
    crossfit/fold-N/          (expert_training: crossfit) fold N's out-of-fold option
                              probabilities; its manifest lists the rows it trained on
    relabel/                  shards + manifest: context-enhanced replies and their H;
                              neighbours.json: the retrieved clean examples
    review/                   shards + manifest: the review replies (review: model)
                              (relabel: false: neither; the flagged rows are dropped)
    denoised.jsonl            the training set D_clean ∪ D_select, with provenance
    all.jsonl                 every input row, dropped and skipped ones included
    report.json               counts (and precision/recall against a gold column)

Every stage writes atomic shards, so an interrupted run resumes where it stopped;
`report.json` is written last and marks the folder complete. Where the pieces live:
`inputs` (rows and labels), `experts` (which models vote), `stages` (one function
per stage), `options` (one unit per value of each setting), `outputs` (the files),
`report` (report.json and its renderings), `folder` (the keyed folder name) and
`resolve` (from an Axolotl YAML to runs). This module keeps their public names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from ..core.config import RobustFTConfig
from ..core.rows import RowChecker
from .crossfit import FoldFit
from .errors import RobustFTError
from .experts import ModelSlot, default_loader, expert_list
from .folder import (
    ALL_FILE,
    REPORT_FILE,
    TRAIN_FILE,
    cache_key,
    default_parent,
    output_folder,
)
from .inputs import Rows, load_input, prepare_rows
from .options import pick_options
from .outputs import DenoiseResult, RunOutputs, load_result, write_outputs
from .predict import Predictor
from .relabel import Encoder
from .report import format_report, label_key, premise_warning, report_markdown
from .resolve import (
    DATASET_TYPE,
    denoise_entry,
    denoise_from_config,
    find_report,
    robustft_entries,
)
from .stages import (
    RunContext,
    detect_stage,
    drop_stage,
    predict_stage,
    relabel_stage,
    review_stage,
    select_stage,
)

__all__ = [
    "ALL_FILE",
    "DATASET_TYPE",
    "REPORT_FILE",
    "TRAIN_FILE",
    "DenoiseResult",
    "RobustFTError",
    "RowChecker",
    "Rows",
    "cache_key",
    "default_parent",
    "denoise_dataset",
    "denoise_entry",
    "denoise_from_config",
    "expert_list",
    "find_report",
    "format_report",
    "label_key",
    "load_input",
    "load_result",
    "output_folder",
    "premise_warning",
    "prepare_rows",
    "report_markdown",
    "robustft_entries",
]

LOG = logging.getLogger("axolotl_prefalign")


def denoise_dataset(
    ds: Rows,
    settings: RobustFTConfig,
    out_dir: str | Path,
    *,
    base_model: str | None,
    source: str = "dataset",
    on_bad_row: str = "error",
    load_predictor: Callable[[str], Predictor] | None = None,
    encoder: Encoder | None = None,
    load_in_4bit: bool = False,
    lines: Sequence[int | None] | None = None,
    crossfit_fit: FoldFit | None = None,
) -> DenoiseResult:
    """Detect, relabel and select the noisy rows of `ds`; resumable in `out_dir`.

    `lines` (each row's line in a JSON-lines file) lets errors name the line.

    `load_predictor(path)`, `encoder` and `crossfit_fit` replace the local HF
    models, the sentence encoder and the per-fold LoRA training (tests pass fixed
    replies, a bag-of-words embedding and recorded folds).
    """
    out_dir = Path(out_dir)
    if (out_dir / REPORT_FILE).exists():
        LOG.info("robustft: %s is complete; reusing it", out_dir)
        return load_result(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped = prepare_rows(
        ds, settings, RowChecker(source, on_bad_row, lines=lines)
    )
    experts = expert_list(settings, base_model)
    options = pick_options(settings)
    notes = {**options.training.check(rows), **options.scoring.check(rows)}
    ctx = RunContext(
        settings,
        out_dir,
        options,
        ModelSlot(load_predictor or default_loader(settings, load_in_4bit)),
        base_path=base_model or experts[0][1],
        encoder=encoder,
        crossfit_fit=crossfit_fit,
        load_in_4bit=load_in_4bit,
        # the folds are shared by every run on the same rows under this parent
        crossfit_root=out_dir.parent,
    )
    try:
        predictions = predict_stage(rows, experts, ctx)
        predictions |= options.training.train(ctx, rows)  # its expert votes too
        clean, noisy = detect_stage(rows, predictions, ctx)
        if settings.relabel:
            reviewed = review_stage(relabel_stage(noisy, clean, ctx), ctx)
        else:
            reviewed = drop_stage(noisy)
    finally:
        ctx.models.release()
    selected, selection_notes = select_stage(reviewed, rows, ctx)
    result = write_outputs(
        RunOutputs(
            ds=ds,
            settings=settings,
            out_dir=out_dir,
            source=source,
            skipped=skipped,
            clean=clean,
            reviewed=reviewed,
            selected=selected,
            experts=[name for name, _ in experts]
            + list(options.training.extra_experts),
            option_probs=options.option_probs,
            cut_reason=options.selection.cut_reason,
            report_notes={**notes, **selection_notes},
        )
    )
    LOG.info("robustft: wrote %s", out_dir)  # the caller shows the report
    return result
