"""`prefalign llamafactory denoise CONFIG.yaml [key=value ...]`: RobustFT on
LLaMA-Factory datasets.

CONFIG is a LLaMA-Factory SFT YAML plus a `prefalign:` block with `robustft:`
settings. Every dataset named by `dataset:` (alpaca or sharegpt in `dataset_dir`'s
dataset_info.json) is read in prefalign's column names (`prompt` → the question,
`response` → the answer, unless `prefalign.robustft.fields` says otherwise),
denoised into its keyed output folder (resumable, as `axolotl prefalign denoise`),
and written back into `dataset_dir` as the LLaMA-Factory dataset
`<name>_robustft` (D_clean ∪ D_select) with its dataset_info.json entry; train it
with `dataset: <name>_robustft`. Alpaca rows are written; a row's system prompt (a
sharegpt system turn or an alpaca system column) is kept in a `system` column.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...core.config import PrefAlignConfig, RobustFTConfig
from ...core.dataset_info import INFO_FILE
from ...core.local_data import DataFileError, read_local
from ...core.rows import RowChecker
from ...core.shards import main_process_only
from ...robustft.pipeline import (
    DenoiseResult,
    RobustFTError,
    cache_key,
    default_parent,
    denoise_dataset,
    format_report,
    output_folder,
)
from .export import SFT_COLUMNS, ExportedSet, robustft_rows, write_llamafactory
from .launcher import dataset_names, read_raw

# The column of a row's system prompt (a sharegpt system turn, an alpaca system
# column): kept in the rows written back.
SYSTEM = "system"
# LLaMA-Factory SFT rows read as prefalign rows: the prompt is RobustFT's question,
# the response its (possibly noisy) answer; free text, no option list.
LLAMAFACTORY_FIELDS = {"question": "prompt", "answer": "response", "options": None}


def denoise_key(
    settings: RobustFTConfig, rows: list[dict[str, Any]], base_model, on_bad_row: str
) -> str:
    """RobustFT's cache key of `rows`, changed by their system prompts: the
    output folder's rows carry them into the written dataset."""
    key = cache_key(settings, rows, base_model=base_model, on_bad_row=on_bad_row)
    systems = [row.get(SYSTEM) for row in rows]
    if not any(systems):
        return key  # the key alpaca rows without a system column always had
    h = hashlib.sha256(key.encode())
    h.update(json.dumps(systems).encode())
    return h.hexdigest()


def settings_for(block: dict[str, Any] | None, pa: PrefAlignConfig) -> PrefAlignConfig:
    """The block with RobustFT's fields set to LLaMA-Factory's rows, unless the
    config names them itself."""
    if "fields" in ((block or {}).get("robustft") or {}):
        return pa
    robustft = {**pa.robustft.model_dump(), "fields": LLAMAFACTORY_FIELDS}
    return PrefAlignConfig.from_raw({**pa.model_dump(), "robustft": robustft})


def denoise(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    load_predictor: Callable[[str], Any] | None = None,
    encoder: Any = None,
    echo: Callable[[str], Any] = print,
) -> list[DenoiseResult]:
    """Denoise every dataset of a LLaMA-Factory config (with `key=value`
    overrides, as llamafactory-cli); write `<name>_robustft`."""
    config_path = Path(config_path)
    args = read_raw(config_path, overrides)
    block = args.pop("prefalign", None)
    pa = settings_for(block, PrefAlignConfig.from_raw(block))
    names = dataset_names(args)
    if not names:
        raise RobustFTError(f"{config_path} names no `dataset:` to denoise")
    if not main_process_only("prefalign llamafactory denoise"):
        return []
    dataset_dir = Path(args.get("dataset_dir") or "data")
    info = dataset_dir / INFO_FILE
    settings, f = pa.robustft, pa.robustft.fields
    base_model = args.get("model_name_or_path")
    results = []
    for name in names:
        try:
            data = read_local(info, name=name, on_bad_row=pa.on_bad_row)
        except DataFileError as err:
            raise RobustFTError(f"dataset {name!r}: {err}") from None
        key = denoise_key(settings, data.rows, base_model, pa.on_bad_row)
        out_dir = output_folder(default_parent(args, settings), name, key)
        result = denoise_dataset(
            data.rows,
            settings,
            out_dir,
            base_model=base_model,
            source=data.source,
            on_bad_row=pa.on_bad_row,
            load_predictor=load_predictor,
            encoder=encoder,
            load_in_4bit=args.get("quantization_bit") == 4,
            lines=data.lines,
        )
        echo(format_report(result.report))
        checker = RowChecker(str(out_dir), pa.on_bad_row)
        rows = robustft_rows(
            result.train.to_list(),
            f.question,
            f.answer,
            f.options,
            checker,
            system=SYSTEM,
        )
        checker.report()
        if not rows:
            raise RobustFTError(
                f"RobustFT left no training rows of dataset {name!r} (report above; "
                f"{out_dir}): nothing written; the experts may be too weak for it"
            )
        out_name = f"{name}_robustft"
        columns = dict(SFT_COLUMNS)
        if any(SYSTEM in row for row in rows):
            columns[SYSTEM] = SYSTEM  # LLaMA-Factory reads alpaca's system column
        written = ExportedSet(
            out_name,
            f"{out_name}.jsonl",
            rows,
            False,
            columns,
            data.source,
            checker.n_skipped,
        )
        write_llamafactory(dataset_dir, [written])
        echo(
            f"LLaMA-Factory dataset {out_name!r}: {len(rows)} rows in "
            f"{dataset_dir / (out_name + '.jsonl')} (entry added to {info}); "
            f"train it with `dataset: {out_name}`"
        )
        results.append(result)
    return results
