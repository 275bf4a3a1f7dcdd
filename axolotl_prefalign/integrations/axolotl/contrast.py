"""Axolotl's side of contrast SFT: the `type:` hook, collator choice and preview."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...contrast.format import TYPE_NAME, ContrastFormat
from ...contrast.preview import print_preview
from ...core.config import prefalign_config
from ...core.local_data import entry_get, read_entry


def _source_name(ds_cfg: Any) -> str:
    if not ds_cfg:
        return "contrast dataset"
    path = entry_get(ds_cfg, "path") or "contrast dataset"
    files = entry_get(ds_cfg, "data_files")
    return f"{path} ({files})" if files else str(path)


def load(tokenizer: Any, cfg: Any, ds_cfg: Any = None) -> ContrastFormat:
    """Axolotl SFT dataset type `axolotl_prefalign.contrast`."""
    from axolotl.prompt_tokenizers import DatasetWrappingStrategy

    # A virtual subclass: Axolotl then hands us the whole dataset (wrap_dataset),
    # while the format itself stays free of Axolotl.
    DatasetWrappingStrategy.register(ContrastFormat)
    pa = prefalign_config(cfg)
    return ContrastFormat(
        tokenizer,
        pa.contrast,
        sequence_len=int(cfg.get("sequence_len") or 2048),
        source=_source_name(ds_cfg),
        on_bad_row=pa.on_bad_row,
    )


def collator_for(cfg: Any, is_eval: bool = False) -> tuple[type, dict[str, Any]]:
    """(collator class, kwargs) for Axolotl's SFT builder: pads negative_labels too."""
    from .trainers.contrast_sft import (
        ContrastBatchSamplerCollator,
        ContrastDataCollator,
        ContrastV2BatchSamplerCollator,
    )

    packed = cfg.get("eval_sample_packing") if is_eval else cfg.get("sample_packing")
    if not packed:
        return ContrastDataCollator, {}
    # The same choice Axolotl's builder makes between its two packing collators.
    from axolotl.monkeypatch.multipack import SUPPORTED_MULTIPACK_MODEL_TYPES

    attn = cfg.get("attn_implementation")
    model_type = cfg.get("model_config_type")
    if (
        attn == "flex_attention"
        or model_type in SUPPORTED_MULTIPACK_MODEL_TYPES
        or (model_type == "llama" and attn != "flash_attention_2")
    ):
        return ContrastV2BatchSamplerCollator, {}
    return ContrastBatchSamplerCollator, {}


def preview_config(
    cfg: Any, num_rows: int = 3, echo: Callable[[str], Any] = print
) -> None:
    """`prefalign contrast-preview CONFIG`: the first rows of the config's contrast
    dataset as training sees them."""
    from axolotl.loaders import load_tokenizer

    ds_cfg = next(
        (d for d in cfg.get("datasets") or [] if d.get("type") == TYPE_NAME), None
    )
    if ds_cfg is None:
        raise ValueError(f"the config has no dataset with `type: {TYPE_NAME}`")
    rows = read_entry(ds_cfg).rows
    fmt = load(load_tokenizer(cfg), cfg, ds_cfg)
    print_preview(fmt, rows, num_rows, echo)
