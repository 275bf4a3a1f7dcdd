"""Check RobustFT's premise on your data before a run (`prefalign
robustft-premise`).

RobustFT replaces the labels its experts disagree with (docs/methods.md#robustft).
That helps only when an expert is right more often than the labels. On a sample
of rows with a gold column, `check_premise` runs only the expert-prediction stage
(`stages.predict_stage`, and the cross-fitted expert when configured), reads the
experts' answers as detection does (`detect.detect_noise`), and sets each expert's
accuracy against the gold (`report.vote_hits`) beside the labels'
(`report.label_hits`), with 95% intervals. Nothing is relabelled.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from ..core.accuracy import Accuracy, binomial_accuracy
from ..core.config import PrefAlignConfig, prefalign_config
from ..core.rows import RowChecker
from ..core.shards import atomic_write_json
from .detect import detect_noise
from .errors import RobustFTError
from .experts import ModelSlot, default_loader, expert_list
from .folder import cache_key, default_parent, output_folder
from .inputs import load_input, prepare_rows
from .options import pick_options
from .predict import Predictor
from .report import label_hits, vote_hits
from .resolve import DATASET_TYPE, robustft_entries
from .stages import RunContext, predict_stage

PREMISE_DIR = "premise"  # under the RobustFT output parent: the experts' replies
PREMISE_FILE = "premise.json"  # under the RobustFT output parent: the result


def _has_gold(row: Any, field: str) -> bool:
    value = row.get(field) if isinstance(row, Mapping) else None
    return value is not None and not (isinstance(value, str) and not value.strip())


def gold_sample(
    pa: PrefAlignConfig, ds_cfg: Mapping[str, Any], n: int
) -> tuple[list[Any], list[int | None], int]:
    """(`n` rows with a gold answer drawn with the settings' seed, their lines,
    how many had one); an error naming the file and field when none has."""
    settings, source = pa.robustft, str(ds_cfg.get("path", "dataset"))
    field = settings.gold_field
    if not field:
        raise RobustFTError(
            "prefalign.robustft.gold_field is not set: the premise check compares "
            "the experts and the labels with each row's correct answer; add it to "
            f"{source} as a field (e.g. 'gold') and set prefalign.robustft."
            "gold_field: gold"
        )
    data = load_input(ds_cfg, pa.on_bad_row)
    lines = data.lines or [None] * len(data.rows)
    kept = [
        (r, ln) for r, ln in zip(data.rows, lines, strict=True) if _has_gold(r, field)
    ]
    if not kept:
        present = sorted({k for r in data.rows if isinstance(r, Mapping) for k in r})
        raise RobustFTError(
            f"{source}: no row has the field {field!r} (prefalign.robustft."
            f"gold_field); add each row's correct answer as {field!r}; the rows' "
            f"fields: {', '.join(present) or 'none'}"
        )
    rng = random.Random(settings.seed)
    picked = sorted(rng.sample(range(len(kept)), min(n, len(kept))))
    return [kept[k][0] for k in picked], [kept[k][1] for k in picked], len(kept)


def verdicts(experts: Mapping[str, Accuracy], labels: Accuracy) -> dict[str, str]:
    """Per expert/prompt: "premise holds" only when its accuracy is above the
    labels'."""
    out = {}
    for name, acc in experts.items():
        versus = f"{acc.rate:.1%} right vs labels {labels.rate:.1%}"
        if acc.rate is not None and acc.rate > labels.rate:
            line = f"premise holds for expert {name}: {versus}"
            if acc.low <= labels.high:
                line += "; the intervals overlap (a larger --rows tells more)"
        else:
            line = f"premise not shown for expert {name}: {versus}"
        out[name] = line
    return out


def entry_premise(
    cfg: Mapping[str, Any],
    ds_cfg: Mapping[str, Any],
    n: int,
    load_predictor: Callable[[str], Predictor] | None = None,
) -> dict[str, Any]:
    """The experts' and the labels' accuracy against gold on `n` rows of one
    `datasets:` entry, after the prediction stage only."""
    pa = prefalign_config(cfg)
    settings, source = pa.robustft, str(ds_cfg.get("path", "dataset"))
    ds, lines, with_gold = gold_sample(pa, ds_cfg, n)
    rows, skipped = prepare_rows(
        ds, settings, RowChecker(source, pa.on_bad_row, lines=lines)
    )
    if not len(rows):
        raise RobustFTError(f"{source}: none of the {len(ds)} sampled rows is usable")
    base, four_bit = cfg.get("base_model"), bool(cfg.get("load_in_4bit"))
    experts, options = expert_list(settings, base), pick_options(settings)
    notes = {**options.training.check(rows), **options.scoring.check(rows)}
    key = cache_key(settings, ds, base_model=base, on_bad_row=pa.on_bad_row)
    ctx = RunContext(
        settings,
        output_folder(default_parent(cfg, settings) / PREMISE_DIR, source, key),
        options,
        ModelSlot(load_predictor or default_loader(settings, four_bit)),
        base_path=base or experts[0][1],
        load_in_4bit=four_bit,
        # the denoise run on the same rows reuses the folds trained here
        crossfit_root=default_parent(cfg, settings),
    )
    try:
        predictions = predict_stage(rows, experts, ctx)
        predictions |= options.training.train(ctx, rows)
    finally:
        ctx.models.release()
    # The votes as detection reads them; which rows it would call noisy is moot.
    voted = detect_noise(
        rows,
        predictions,
        agreement=settings.agreement,
        rel_tol=settings.number_rel_tol,
        probs_expert=options.training.probs_expert,
    ).to_list()
    tol = settings.number_rel_tol
    labels = binomial_accuracy(*label_hits(voted, tol))
    accs = {k: binomial_accuracy(*h) for k, h in vote_hits(voted, tol).items()}
    lines_out = verdicts(accs, labels)
    return {
        "source": source,
        "gold_field": settings.gold_field,
        "rows_with_gold": with_gold,
        "rows_sampled": len(ds),
        "rows_checked": len(rows),
        "bad_rows_skipped": len(skipped),
        "labels": labels.as_dict(),
        "experts": {k: a.as_dict() for k, a in accs.items()},
        "premise_holds": [k for k, a in accs.items() if a.rate > labels.rate],
        "verdicts": list(lines_out.values()),
        "predictions_dir": str(ctx.out_dir),
        **{k: v for k, v in notes.items() if v},
    }


def check_premise(
    cfg: Mapping[str, Any],
    rows: int,
    load_predictor: Callable[[str], Predictor] | None = None,
    config: str = "CONFIG",
) -> dict[str, Any]:
    """Each RobustFT entry's premise check on `rows` gold rows (also written to
    `<robustft output parent>/premise.json`)."""
    if rows < 1:
        raise RobustFTError(f"--rows must be at least 1, got {rows}")
    entries = robustft_entries(cfg)
    if not entries:
        raise RobustFTError(
            f"{config}: no `datasets:` entry has `type: {DATASET_TYPE}`; the "
            "premise check reads those entries only"
        )
    result = {
        "method": "robustft",
        "config": config,
        "entries": [entry_premise(cfg, e, rows, load_predictor) for e in entries],
    }
    path = default_parent(cfg, prefalign_config(cfg).robustft) / PREMISE_FILE
    atomic_write_json(path, result)
    return {**result, "file": str(path)}


def format_premise(result: Mapping[str, Any]) -> str:
    """The result as the lines `prefalign robustft-premise` prints."""

    def acc(d: Mapping[str, Any]) -> str:
        return Accuracy(
            d["correct"], d["total"], d["interval_low"], d["interval_high"]
        ).text()

    lines = [f"RobustFT premise check: {result['config']}"]
    for e in result["entries"]:
        lines += [
            f"  {e['source']}: {e['rows_checked']} rows checked of "
            f"{e['rows_with_gold']} with gold column {e['gold_field']!r}",
            f"    labels           {acc(e['labels'])}",
        ]
        for name, d in e["experts"].items():
            lines.append(f"    expert {name:<22} {acc(d)}")
        lines += [f"    verdict: {line}" for line in e["verdicts"]]
    lines.append(f"  written: {result['file']}")
    return "\n".join(lines)
