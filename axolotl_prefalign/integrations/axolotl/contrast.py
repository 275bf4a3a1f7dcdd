"""Axolotl's side of contrast SFT: the `type:` hook, collator choice and preview."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...contrast import curriculum
from ...contrast.format import TYPE_NAME, ContrastFormat
from ...contrast.preview import print_preview
from ...core.config import prefalign_config
from ...core.local_data import entry_get, read_entry
from ...core.models import cache_dir


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
    fmt = ContrastFormat(
        tokenizer,
        pa.contrast,
        sequence_len=int(cfg.get("sequence_len") or 2048),
        source=_source_name(ds_cfg),
        on_bad_row=pa.on_bad_row,
    )
    if pa.contrast.curriculum:
        fmt.order_rows = lambda rows, indices: curriculum.order_rows(
            fmt,
            rows,
            indices,
            load_model=lambda: load_scoring_model(cfg),
            model_key=scoring_model_key(cfg),
            cache_dir=curriculum_cache_dir(cfg),
        )
    return fmt


def curriculum_cache_dir(cfg: Any) -> Path:
    """prefalign.contrast.curriculum_cache_dir, else beside the prepared data, else
    the package cache."""
    own = prefalign_config(cfg).contrast.curriculum_cache_dir
    if own:
        return Path(own).expanduser()
    prepared = cfg.get("dataset_prepared_path")
    if prepared:
        return Path(prepared) / "prefalign_curriculum"
    return cache_dir() / "curriculum"


def _scoring_dtype(cfg: Any) -> Any:
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    if cfg.get("bf16") in (True, "auto") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if cfg.get("fp16") else torch.float32


def scoring_model_key(cfg: Any) -> str:
    """The base model's files and the way it is loaded for scoring."""
    files = curriculum.model_files_key(
        cfg.get("base_model"), cfg.get("revision_of_model")
    )
    return f"{files}:{_scoring_dtype(cfg)}:4bit={bool(cfg.get('load_in_4bit'))}"


def load_scoring_model(cfg: Any) -> Any:
    """The base model (no adapter) that scores the curriculum margins: the config's
    dtype on the first GPU (4-bit with load_in_4bit), fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = _scoring_dtype(cfg)
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
        if cfg.get("load_in_4bit"):
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype,
            )
    return AutoModelForCausalLM.from_pretrained(
        cfg.get("base_model"),
        trust_remote_code=cfg.get("trust_remote_code") is True,
        revision=cfg.get("revision_of_model"),
        **kwargs,
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
