"""The DPO dataset type `axolotl_prefalign.spa_pairs` for Axolotl's RL data loader.

Rows are normalised and rendered by `spa.pairs` (so SPA's judge scores exactly the
tokens DPO trains on); this module builds the (transform, map kwargs) pair Axolotl
expects, with the shim for how each Axolotl release calls the transform.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...core.config import prefalign_config
from ...core.rows import RowChecker
from ...spa.pairs import OUTPUT_COLUMNS, completion_text, normalize_pair, prompt_text


def _features():
    from datasets import Features, Value

    return Features(
        {
            "prompt": Value("string"),
            "chosen": Value("string"),
            "rejected": Value("string"),
            "judge_prob": Value("float64"),
            "margin": Value("float64"),
            "iteration": Value("int64"),
            "pair_id": Value("int64"),
        }
    )


def _source_name(cfg: Any, dataset_idx: int) -> str:
    try:
        path = cfg["datasets"][dataset_idx]["path"]
    except (KeyError, IndexError, TypeError):
        path = None
    return str(path) if path else f"spa_pairs dataset #{dataset_idx}"


def _axolotl_passes_indices() -> bool:
    """Shim (Axolotl 0.19 vs 0.20+): from 0.20 a DPO transform that returns
    `remove_columns` is wrapped in a one-argument function (`_with_source_columns`
    in `axolotl.utils.data.rl`), so `with_indices=True` breaks the map there."""
    try:
        from axolotl.utils.data import rl
    except ImportError:  # no Axolotl: a plain datasets.map passes indices
        return True
    return not hasattr(rl, "_with_source_columns")


def spa_pairs(cfg: Any, dataset_idx: int = 0, **kwargs: Any):
    """DPO dataset type `axolotl_prefalign.spa_pairs`: (transform, map kwargs) for
    Axolotl's RL data loader. Bad rows raise or are skipped and counted
    (`prefalign.on_bad_row`); a batched map lets skipped rows leave the dataset.

    Local files were already checked line by line at `register` (dataset_check),
    so a bad row found here comes from a source without lines; on Axolotl >= 0.20
    the map gives no row numbers, and the error quotes the row's prompt instead.
    """
    policy = prefalign_config(cfg).on_bad_row
    source = _source_name(cfg, dataset_idx)
    with_indices = _axolotl_passes_indices()

    def transform_fn(batch: dict[str, list], *args: Any, tokenizer=None):
        if tokenizer is None:
            raise ValueError("axolotl_prefalign.spa_pairs needs the tokenizer")
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        indices = list(args[0]) if args else None
        checker = RowChecker(source, policy)
        out: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
        for pos in range(n):
            row = {k: batch[k][pos] for k in keys}
            if indices is not None:
                pair = normalize_pair(row, indices[pos], checker)
            else:
                checker.source = f"{source} (the row with prompt {_quote(row)})"
                pair = normalize_pair(row, -1, checker)
            if pair is None:
                continue
            pair["prompt"] = prompt_text(tokenizer, pair["prompt"])
            pair["chosen"] = completion_text(tokenizer, pair["chosen"])
            pair["rejected"] = completion_text(tokenizer, pair["rejected"])
            for name in OUTPUT_COLUMNS:
                out[name].append(pair[name])
        if checker.n_skipped:
            checker.source = source
            if indices:
                checker.source += f" (rows {indices[0] + 1}-{indices[-1] + 1})"
            checker.report()
        return out

    return transform_fn, {
        "batched": True,
        "with_indices": with_indices,
        "remove_columns": "__all__",
        "features": _features(),
    }


def _quote(row: Mapping[str, Any]) -> str:
    prompt = row.get("prompt")
    text = prompt if isinstance(prompt, str) else repr(prompt)
    return repr(text[:40] + ("…" if len(text) > 40 else ""))
