"""From an Axolotl YAML to RobustFT runs: its `type: axolotl_prefalign.robustft`
entries, each entry's keyed output folder, and the finished run's report."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..core.config import PrefAlignConfig, prefalign_config
from ..core.shards import main_process_only
from .errors import RobustFTError
from .folder import REPORT_FILE, cache_key, default_parent, output_folder
from .inputs import Rows, load_input
from .outputs import DenoiseResult
from .predict import Predictor
from .relabel import Encoder
from .report import format_report

DATASET_TYPE = "axolotl_prefalign.robustft"


def robustft_entries(cfg: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The `datasets:` entries with `type: axolotl_prefalign.robustft`."""
    return [d for d in (cfg.get("datasets") or []) if d.get("type") == DATASET_TYPE]


def entry_folder(
    cfg: Mapping[str, Any], pa: PrefAlignConfig, ds_cfg: Mapping[str, Any], ds: Rows
) -> Path:
    """The keyed output folder of one `datasets:` entry whose rows are `ds`."""
    key = cache_key(
        pa.robustft, ds, base_model=cfg.get("base_model"), on_bad_row=pa.on_bad_row
    )
    source = str(ds_cfg.get("path", "dataset"))
    return output_folder(default_parent(cfg, pa.robustft), source, key)


def find_report(
    cfg: Mapping[str, Any], ds_cfg: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The report.json of a finished run on this `datasets:` entry (the folder
    `denoise_entry` would use), or None when it has not run."""
    pa = prefalign_config(cfg)
    try:
        ds = load_input(ds_cfg, pa.on_bad_row).rows
    except (RobustFTError, ValueError):  # unreadable input: no run to report
        return None
    path = entry_folder(cfg, pa, ds_cfg, ds) / REPORT_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def denoise_entry(
    cfg: Mapping[str, Any],
    ds_cfg: Mapping[str, Any],
    ds: Rows | None = None,
    *,
    load_predictor: Callable[[str], Predictor] | None = None,
    encoder: Encoder | None = None,
) -> DenoiseResult:
    """Denoise one `datasets:` entry into its keyed output folder (or reuse it)."""
    # Deferred: pipeline re-exports this module's functions as its public API.
    from .pipeline import denoise_dataset

    pa = prefalign_config(cfg)
    settings = pa.robustft
    lines = None
    if ds is None:
        data = load_input(ds_cfg, pa.on_bad_row)
        ds, lines = data.rows, data.lines
    return denoise_dataset(
        ds,
        settings,
        entry_folder(cfg, pa, ds_cfg, ds),
        base_model=cfg.get("base_model"),
        source=str(ds_cfg.get("path", "dataset")),
        on_bad_row=pa.on_bad_row,
        load_predictor=load_predictor,
        encoder=encoder,
        load_in_4bit=bool(cfg.get("load_in_4bit")),
        lines=lines,
    )


def denoise_from_config(
    cfg: Mapping[str, Any],
    *,
    load_predictor: Callable[[str], Predictor] | None = None,
    encoder: Encoder | None = None,
    echo: Callable[[str], Any] = print,
) -> list[DenoiseResult]:
    """`axolotl prefalign denoise CONFIG`: denoise every RobustFT dataset entry."""
    entries = robustft_entries(cfg)
    if not entries:
        raise RobustFTError(
            f"no `datasets:` entry has `type: {DATASET_TYPE}`; RobustFT denoises "
            "those entries only"
        )
    if not main_process_only("axolotl prefalign denoise"):
        return []
    results = []
    for ds_cfg in entries:
        result = denoise_entry(
            cfg, ds_cfg, load_predictor=load_predictor, encoder=encoder
        )
        echo(format_report(result.report))
        results.append(result)
    return results
