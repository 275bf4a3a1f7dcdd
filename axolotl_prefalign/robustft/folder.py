"""A run's output folder: its keyed name and the files it holds.

The folder name holds a hash of the `prefalign.robustft` settings, the models and
the input rows, so the `axolotl prefalign denoise` command and the
`axolotl_prefalign.robustft` dataset type find the same output.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.config import RobustFTConfig
from .inputs import Rows

TRAIN_FILE, ALL_FILE, REPORT_FILE = "denoised.jsonl", "all.jsonl", "report.json"
NEIGHBOURS_FILE = "neighbours.json"
# Settings added after the first release: left out of the cache key at their
# defaults, so folders written before them keep their names.
# What the cross-fitted folds depend on besides the model and the rows.
FOLD_SETTINGS = (
    "crossfit_folds",
    "crossfit_epochs",
    "crossfit_learning_rate",
    "crossfit_lora_r",
    "crossfit_batch_size",
    "seed",
)
KEY_DEFAULTS_OMITTED = (
    "expert_scoring",
    "expert_training",
    *FOLD_SETTINGS,
    "detection",
    "selection",
    "relabel",
)


def cache_key(
    settings: RobustFTConfig,
    ds: Rows,
    *,
    base_model: str | None,
    on_bad_row: str,
) -> str:
    """Hash of the settings, models and input rows that name an output folder."""
    h = hashlib.sha256()
    dumped = settings.model_dump(mode="json", exclude={"output_dir"})
    for name in KEY_DEFAULTS_OMITTED:
        if dumped[name] == RobustFTConfig.model_fields[name].default:
            del dumped[name]
    meta = {
        "robustft": dumped,
        "base_model": base_model,
        "on_bad_row": on_bad_row,
        "version": 1,
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    # Only the columns RobustFT reads, missing ones as None: the rows of a file
    # read line by line and the same file loaded by datasets (Axolotl's dataset
    # type) then give the same key.
    f = settings.fields
    used = [f.question, f.answer, f.options, settings.gold_field]
    used = sorted({c for c in used if c})
    for row in ds:
        h.update(json.dumps([row.get(c) for c in used], default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def output_folder(parent: str | Path, source: str, key: str) -> Path:
    """`<parent>/<input stem>-<key[:12]>`."""
    stem = Path(source).name.split(".")[0] or "dataset"
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem)
    return Path(parent).expanduser() / f"{stem}-{key[:12]}"


def default_parent(cfg: Mapping[str, Any], settings: RobustFTConfig) -> Path:
    """`prefalign.robustft.output_dir`, else `<output_dir>/robustft`."""
    if settings.output_dir:
        return Path(settings.output_dir).expanduser()
    return Path(cfg.get("output_dir") or "./model-out") / "robustft"
