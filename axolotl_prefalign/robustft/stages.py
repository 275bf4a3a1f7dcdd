"""The stages of a RobustFT run, in order: predict → detect → relabel → review →
select (docs/methods.md#robustft).

Each stage writes atomic shards under the run's folder, so an interrupted run
resumes where it stopped; the options a run picked (`options.Options`) decide how
a stage works where the settings offer a choice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..core.config import RobustFTConfig
from ..core.shards import ShardWriter, atomic_write_json
from .crossfit import FoldFit
from .detect import DetectionError
from .errors import RobustFTError
from .experts import ModelSlot, expert_slug
from .folder import NEIGHBOURS_FILE
from .options import Options
from .predict import predict_rows
from .relabel import Encoder, load_encoder, relabel_noisy, retrieve_examples

LOG = logging.getLogger("axolotl_prefalign")


@dataclass
class RunContext:
    """What every stage of one run reads: settings, folder, options, models."""

    settings: RobustFTConfig
    out_dir: Path
    options: Options
    models: ModelSlot
    base_path: str  # the relabelling model, and the cross-fitted expert's base
    encoder: Encoder | None = None  # None: the sentence encoder of the settings
    crossfit_fit: FoldFit | None = None  # None: LoRA training of each fold
    # where the cross-fitted folds are cached by key (None: out_dir/crossfit)
    crossfit_root: Path | None = None
    load_in_4bit: bool = False


def predict_stage(
    rows: Dataset, experts: Sequence[tuple[str, str]], ctx: RunContext
) -> dict[str, Dataset]:
    """Each expert's plain and reasoning-enhanced replies (predictions/NN-<name>/),
    by expert name."""
    s, scoring = ctx.settings, ctx.options.scoring
    predictions = {}
    for i, (name, path) in enumerate(experts):
        meta = {"stage": "predict", "expert": name, **scoring.meta}
        writer = ShardWriter(
            ctx.out_dir / "predictions" / f"{i:02d}-{expert_slug(name)}", meta=meta
        )
        predictions[name] = predict_rows(
            rows,
            ctx.models.predictor(path),
            reasoning=s.reasoning,
            max_new_tokens=s.max_new_tokens,
            answer_max_new_tokens=s.answer_max_new_tokens,
            batch_size=s.batch_size,
            writer=writer,
            desc=f"predict ({name})",
            scorer=scoring.scorer(ctx, path),
        )
    return predictions


def detect_stage(
    rows: Dataset, predictions: Mapping[str, Dataset], ctx: RunContext
) -> tuple[Dataset, Dataset]:
    """(clean, noisy): the rows with the experts' votes, split by `detection`."""
    try:
        checked = ctx.options.detection.detect(rows, predictions, ctx)
    except DetectionError as err:
        raise RobustFTError(str(err)) from None
    noisy_mask = checked["noisy"] if len(checked) else []
    clean = checked.select([i for i, n in enumerate(noisy_mask) if not n])
    noisy = checked.select([i for i, n in enumerate(noisy_mask) if n])
    return clean, noisy


def relabel_stage(noisy: Dataset, clean: Dataset, ctx: RunContext) -> Dataset:
    """Retrieved clean examples and the context-enhanced reply of each noisy row
    (relabel/; docs/methods.md#robustft-relabel)."""
    if len(noisy) == 0:
        return noisy
    s = ctx.settings
    noisy = with_neighbours(noisy, clean, ctx)
    contexts = relabel_noisy(
        noisy,
        clean,
        ctx.models.predictor(ctx.base_path),
        max_new_tokens=s.answer_max_new_tokens,
        batch_size=s.batch_size,
        writer=ShardWriter(ctx.out_dir / "relabel", meta={"stage": "relabel"}),
    )
    by_idx = {r["idx"]: r for r in contexts}
    return Dataset.from_list([{**r, **by_idx[r["idx"]]} for r in noisy])


# drop_reason of a flagged row under relabel: false
NOT_RELABELLED = "flagged noisy; relabel: false drops it"


def drop_stage(noisy: Dataset) -> Dataset:
    """relabel: false: every flagged row dropped as it is, with no pseudo-label
    (in place of the relabel and review stages)."""
    if len(noisy) == 0:
        return noisy
    n = len(noisy)
    return noisy.add_column("new_label", [None] * n).add_column(
        "drop_reason", [NOT_RELABELLED] * n
    )


def review_stage(relabelled: Dataset, ctx: RunContext) -> Dataset:
    """Each noisy row's pseudo-label `new_label` (None: dropped), by `review`."""
    if len(relabelled) == 0:
        return relabelled
    return ctx.options.review.review(
        relabelled, ctx, ctx.models.predictor(ctx.base_path)
    )


def select_stage(
    reviewed: Dataset, rows: Dataset, ctx: RunContext
) -> tuple[Dataset, dict[str, Any]]:
    """(D_select, what report.json notes): the relabelled rows kept by `selection`
    (docs/methods.md#robustft-select)."""
    candidates = (
        reviewed.filter(lambda r: r["new_label"] is not None)
        if len(reviewed)
        else reviewed
    )
    if not len(candidates):
        return candidates, {}
    return ctx.options.selection.select(candidates, rows, ctx.settings.select_ratio)


def with_neighbours(noisy: Dataset, clean: Dataset, ctx: RunContext) -> Dataset:
    """Retrieved clean examples per noisy row, cached in relabel/neighbours.json."""
    s, encoder = ctx.settings, ctx.encoder
    path = ctx.out_dir / "relabel" / NEIGHBOURS_FILE
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        nb = {int(k): v for k, v in saved["neighbours"].items()}
        if set(nb) == set(noisy["idx"]):
            return noisy.add_column(
                "neighbours", [nb[i]["idx"] for i in noisy["idx"]]
            ).add_column("neighbour_sims", [nb[i]["sims"] for i in noisy["idx"]])
        LOG.warning("robustft: %s does not match the noisy rows; recomputing", path)
    if len(clean) and encoder is None:
        encoder = load_encoder(s.encoder)
    noisy = retrieve_examples(
        noisy, clean, encoder, k=s.k, batch_size=s.encoder_batch_size
    )
    atomic_write_json(
        path,
        {
            "neighbours": {
                str(r["idx"]): {"idx": r["neighbours"], "sims": r["neighbour_sims"]}
                for r in noisy
            }
        },
    )
    return noisy
