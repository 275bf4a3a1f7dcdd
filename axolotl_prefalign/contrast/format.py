"""Plaintext contrast SFT: a preference pair as one SFT example.

The method: docs/methods.md#contrast.

`type: axolotl_prefalign.contrast` in an Axolotl SFT config renders each pair
(x, y_w, y_l) as

    Instruction: <instruction>
    Question: <x>
    Negative answer: <y_l>
    Positive answer: <y_w><eos>

and masks the labels so that only the positive answer and its end token carry
loss. Rows are tokenized by parts (prefix | answer | end token), so the label
boundary is exact whatever the tokenizer merges across the marker, and the prefix
of a positive-only row is byte for byte what `build_inference_prompt` returns.
Spaces between a marker and its text belong to the text (" Paris" stays one BPE
token; the prompt ends on "Positive answer:" with no trailing space).

The pieces live beside this module: `rows` reads and checks a row, `template`
renders it as text, `encoding` tokenizes and labels it; `ContrastFormat` here
puts them together for one row or a whole dataset.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..core.config import ContrastConfig, PrefAlignConfig
from ..core.rows import BadRowError, RowChecker
from .encoding import IGNORE_INDEX, NEGATIVE_LABELS, EncodedRow, fit_pair
from .rows import ContrastPair, RowProblem, parse_messages, parse_row
from .template import _SENTINELS, PRESETS, ContrastTemplate, Piece, is_positive_only

__all__ = [
    "IGNORE_INDEX",
    "NEGATIVE_LABELS",
    "PRESETS",
    "TYPE_NAME",
    "_SENTINELS",
    "ContrastFormat",
    "ContrastPair",
    "EncodedRow",
    "Piece",
    "RowProblem",
    "build_inference_prompt",
    "count_rows",
    "is_positive_only",
    "parse_row",
]

LOG = logging.getLogger("axolotl_prefalign")

TYPE_NAME = "axolotl_prefalign.contrast"
_STATUS = "_prefalign_contrast_status"
# The source row of each rendered row, kept while the rows are put in training order.
_ROW = "_prefalign_contrast_row"


def _contrast_config(config: Any) -> ContrastConfig:
    """The contrast settings from a settings object, a whole config, or defaults."""
    if config is None:
        return ContrastConfig()
    if isinstance(config, ContrastConfig):
        return config
    if isinstance(config, PrefAlignConfig):
        return config.contrast
    from ..core.config import prefalign_config

    return prefalign_config(config).contrast


def count_rows(rows: Iterable[Mapping[str, Any]], config: Any = None) -> dict[str, int]:
    """Rows of a contrast set by how the format renders them: bad rows, rows with
    the negative answer, positive-only rows (by `positive_only_ratio`). Counted
    without tokenizing; rows shortened to fit sequence_len are in the run's log."""
    config = _contrast_config(config)
    n = bad = positive_only = 0
    for index, row in enumerate(rows):
        n += 1
        try:
            parse_row(row, config.fields)
        except RowProblem:
            bad += 1
            continue
        positive_only += is_positive_only(
            index, config.positive_only_ratio, config.seed
        )
    return {
        "rows": n,
        "bad_rows": bad,
        "contrast_rows": n - bad - positive_only,
        "positive_only_rows": positive_only,
    }


class ContrastFormat(ContrastTemplate):
    """Renders and tokenizes preference rows as contrast SFT examples.

    Axolotl gets it from `load` and calls `wrap_dataset` (it is registered as a
    `DatasetWrappingStrategy`): the whole dataset is seen at once, so row indices
    are known (positive-only choice, error messages) and skipped rows are counted.
    """

    def __init__(
        self,
        tokenizer: Any,
        config: ContrastConfig | None = None,
        *,
        sequence_len: int = 2048,
        source: str = "contrast dataset",
        on_bad_row: str = "error",
        order_rows: Callable[[Any, list[int]], list[int]] | None = None,
    ):
        # (raw dataset, source rows of the rendered rows) -> their training order
        # as positions in the rendered rows; None keeps file order.
        self.order_rows = order_rows
        self.sequence_len = sequence_len
        self.source = source
        self.on_bad_row = on_bad_row
        RowChecker(source, on_bad_row)  # validates the policy name
        super().__init__(tokenizer, config)

    # -- tokenization ------------------------------------------------------

    def encode_pair(self, pair: ContrastPair, index: int) -> EncodedRow:
        """Tokenize a pair, shortening negative then question to fit sequence_len."""
        c = self.config
        pos_only = is_positive_only(index, c.positive_only_ratio, c.seed)
        return fit_pair(self, pair, pos_only, self.sequence_len)

    def encode_row(self, row: Mapping[str, Any], index: int) -> EncodedRow:
        """Validate and tokenize one raw row; a bad row raises `BadRowError`."""
        try:
            return self.encode_pair(parse_row(row, self.config.fields), index)
        except RowProblem as err:
            raise BadRowError(self.source, index, err.field, err.problem) from None

    def features(self, encoded: EncodedRow) -> dict[str, list[int]]:
        """input_ids / attention_mask / labels (+ negative_labels when used)."""
        out = {
            "input_ids": encoded.ids,
            "attention_mask": [1] * len(encoded.ids),
            "labels": encoded.labels,
        }
        if self.config.unlikelihood_weight > 0:
            out[NEGATIVE_LABELS] = encoded.negative_labels
        return out

    def tokenize_row(self, row: Mapping[str, Any], index: int) -> dict[str, list[int]]:
        """One row's training features; a bad row raises `BadRowError`."""
        return self.features(self.encode_row(row, index))

    # -- Axolotl dataset hook ------------------------------------------------

    def _map_row(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        try:
            encoded = self.encode_pair(parse_row(row, self.config.fields), index)
        except RowProblem as err:
            empty = self.features(EncodedRow([], [], False))
            bad = f"bad\t{err.field or ''}\t{err.problem}"
            return {**empty, _STATUS: bad, _ROW: index}
        status = list(encoded.truncation) + (["positive_only"] * encoded.positive_only)
        return {**self.features(encoded), _STATUS: ",".join(status), _ROW: index}

    def wrap_dataset(
        self,
        dataset: Any,
        process_count: int | None = None,
        keep_in_memory: bool | None = False,
        **kwargs: Any,
    ) -> Any:
        """Tokenize a whole dataset; bad rows raise, or are dropped and counted."""
        from datasets import Dataset

        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"{self.source}: the contrast format needs a map-style dataset "
                "(streaming datasets are not supported)"
            )
        if len(dataset) == 0:
            # map() over no rows adds no status column; say so before it fails later.
            raise ValueError(
                f"{self.source} has no rows: the contrast format needs at least one "
                "row (check the dataset path, split and any filtering)"
            )
        # Bad rows are recorded in a status column rather than raised inside map():
        # that works with num_proc > 1 and lets the error name the FIRST bad row.
        mapped = dataset.map(
            self._map_row,
            with_indices=True,
            remove_columns=dataset.column_names,
            num_proc=process_count,
            keep_in_memory=bool(keep_in_memory),
            desc="Rendering contrast rows",
        )
        statuses = mapped[_STATUS]
        bad = [(j, s) for j, s in enumerate(statuses) if s.startswith("bad\t")]
        checker = RowChecker(self.source, self.on_bad_row)
        if bad and self.on_bad_row == "error" and len(bad) > 1:
            LOG.error("%s: %d bad rows; the first one:", self.source, len(bad))
        for j, status in bad:
            _, fld, problem = status.split("\t", 2)
            checker.bad(j, fld or None, problem)
        checker.report()
        if bad:
            mapped = mapped.filter(
                lambda s: not s.startswith("bad\t"), input_columns=_STATUS
            )
        counts = Counter(
            tag
            for s in statuses
            if s and not s.startswith("bad\t")
            for tag in s.split(",")
        )
        self._log_counts(len(statuses) - len(bad), counts)
        if self.order_rows is not None:
            # After rendering: the positive-only choice and the row numbers of
            # error messages stay those of the file.
            mapped = mapped.select(self.order_rows(dataset, mapped[_ROW]))
        return mapped.remove_columns([_STATUS, _ROW])

    def _log_counts(self, n_rows: int, counts: Counter) -> None:
        if n_rows:
            LOG.info(
                "%s: %d contrast rows (%d positive-only)",
                self.source,
                n_rows,
                counts["positive_only"],
            )
        cut = {k: v for k, v in counts.items() if k != "positive_only"}
        if cut:
            LOG.warning(
                "%s: rows shortened to fit sequence_len=%d: %s",
                self.source,
                self.sequence_len,
                ", ".join(
                    f"{k.replace('_', ' ')}: {v}" for k, v in sorted(cut.items())
                ),
            )


# ---------------------------------------------------------------------------
# Inference


def build_inference_prompt(
    question: str | Sequence[Mapping[str, str]],
    *,
    tokenizer: Any = None,
    config: Any = None,
    instruction: str | None = None,
    system: str | None = None,
    context: Sequence[Mapping[str, str]] = (),
) -> str:
    """The training prefix of a positive-only row, up to the positive-answer marker.

    It ends on the marker itself ("…Positive answer:"): the space before the answer
    belongs to the answer's first token, which the model generates (" Paris").
    Tokenize the result with `add_special_tokens=False` (any BOS is in the text).
    `question` may be a chat message list (last user message = the question). Chat
    mode and the raw-mode BOS need the tokenizer.
    """
    contrast = _contrast_config(config)
    if contrast.mode == "chat" and tokenizer is None:
        raise ValueError("mode: chat renders through the tokenizer's chat template")
    fmt = ContrastFormat(tokenizer, contrast, sequence_len=sys.maxsize)
    turns = tuple((m["role"], m["content"]) for m in context)
    if not isinstance(question, str):
        try:
            question, more, msg_system = parse_messages(list(question), "question")
        except RowProblem as err:
            raise ValueError(f"question: {err.problem}") from None
        turns += more
        system = system if system is not None else msg_system
    pair = ContrastPair(question.strip(), "", "", instruction, system, turns)
    return fmt.prompt_text(pair)
