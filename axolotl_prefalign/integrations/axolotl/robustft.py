"""Axolotl's side of `type: axolotl_prefalign.robustft`: denoise, then tokenize.

Axolotl hands the loaded input rows to `wrap_dataset`; the strategy finds the
denoised output for exactly these rows and settings (or runs the pipeline once) and
returns the training set tokenized by `robustft.sft`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from axolotl.prompt_tokenizers import DatasetWrappingStrategy
from datasets import Dataset

from ...core.config import prefalign_config
from ...core.rows import RowChecker
from ...robustft.pipeline import denoise_entry, format_report
from ...robustft.sft import tokenize_rows

LOG = logging.getLogger("axolotl_prefalign")


class RobustFTStrategy(DatasetWrappingStrategy):
    """Denoise Axolotl's loaded input rows (or reuse the output) and tokenize them."""

    def __init__(
        self, tokenizer: Any, cfg: Mapping[str, Any], ds_cfg: Mapping[str, Any]
    ):
        self.tokenizer, self.cfg, self.ds_cfg = tokenizer, cfg, ds_cfg

    def wrap_dataset(
        self,
        dataset: Dataset,
        process_count: int | None = None,
        keep_in_memory: bool | None = False,
        **kwargs: Any,
    ) -> Dataset:
        pa = prefalign_config(self.cfg)
        result = denoise_entry(self.cfg, self.ds_cfg, dataset)
        LOG.info("%s", format_report(result.report))
        fields = pa.robustft.fields
        return tokenize_rows(
            result.train,
            self.tokenizer,
            question_field=fields.question,
            answer_field=fields.answer,
            options_field=fields.options,
            sequence_len=int(self.cfg.get("sequence_len") or 2048),
            train_on_inputs=bool(self.cfg.get("train_on_inputs")),
            checker=RowChecker(str(result.out_dir / "denoised.jsonl"), pa.on_bad_row),
        )
