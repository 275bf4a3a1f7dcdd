"""Rendered contrast rows as token ids, labels and the cuts that fit sequence_len.

Rows are tokenized by parts (prefix | answer | end token), so the label boundary
is exact whatever the tokenizer merges across the marker. Labels keep the ids of
the positive answer and its end token; -100 (`IGNORE_INDEX`) everywhere else
(docs/methods.md#contrast). A row too long for `sequence_len` loses the end of the
negative answer, then the whole negative slot, then the start of the question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .rows import ContrastPair, RowProblem
from .template import ContrastTemplate, Piece

IGNORE_INDEX = -100
NEGATIVE_LABELS = "negative_labels"


@dataclass
class EncodedRow:
    """Token ids with one kind per token, plus what truncation did to the row."""

    ids: list[int]
    kinds: list[str]
    positive_only: bool
    truncation: tuple[str, ...] = ()

    @property
    def labels(self) -> list[int]:
        """Loss on the positive answer and its end token only."""
        return [
            i if k in ("positive", "end") else IGNORE_INDEX
            for i, k in zip(self.ids, self.kinds, strict=True)
        ]

    @property
    def negative_labels(self) -> list[int]:
        """The negative answer's ids (for the unlikelihood term); -100 elsewhere."""
        return [
            i if k == "negative" else IGNORE_INDEX
            for i, k in zip(self.ids, self.kinds, strict=True)
        ]


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to end the answer with")
    return eos


def encode_pieces(
    tokenizer: Any, pieces: list[Piece], split_question: bool
) -> tuple[list[int], list[str]]:
    """(ids, kinds): runs of context are tokenized as one text, so a
    positive-only prefix tokenizes exactly like the inference prompt."""
    units: list[Piece] = []
    for p in pieces:
        joinable = p.kind == "context" or (p.kind == "question" and not split_question)
        if joinable and units and units[-1].kind == "context":
            units[-1] = Piece("context", units[-1].text + p.text)
        elif joinable:
            units.append(Piece("context", p.text))
        else:
            units.append(p)
    ids: list[int] = []
    kinds: list[str] = []
    for u in units:
        if u.kind == "end" and not u.text:
            part = [_eos_id(tokenizer)]
        elif u.text:
            part = tokenizer(u.text, add_special_tokens=False)["input_ids"]
        else:
            continue
        if u.kind == "end":
            # Only the first token (the end-of-turn token) carries loss.
            kinds += ["end"] + ["context"] * (len(part) - 1)
        else:
            kinds += [u.kind] * len(part)
        ids += part
    return ids, kinds


def _drop(
    ids: list[int], kinds: list[str], positions: set[int]
) -> tuple[list[int], list[str]]:
    """The row without the tokens at `positions`."""
    keep = [j for j in range(len(ids)) if j not in positions]
    return [ids[j] for j in keep], [kinds[j] for j in keep]


def fit_pair(
    template: ContrastTemplate, pair: ContrastPair, positive_only: bool, limit: int
) -> EncodedRow:
    """Tokenize a pair, shortening negative then question to fit `limit` tokens."""
    tokenizer = template.tokenizer
    done: list[str] = []
    pieces = template.render(pair, positive_only)
    ids, kinds = encode_pieces(tokenizer, pieces, split_question=False)
    if len(ids) > limit and not positive_only:
        excess = len(ids) - limit
        negative_at = [j for j, k in enumerate(kinds) if k == "negative"]
        if excess < len(negative_at):
            # Keep the start of the negative answer.
            ids, kinds = _drop(ids, kinds, set(negative_at[-excess:]))
            done.append("negative_shortened")
        else:
            positive_only = True
            pieces = template.render(pair, True)
            ids, kinds = encode_pieces(tokenizer, pieces, split_question=False)
            done.append("negative_removed")
    if len(ids) > limit:
        pieces = template.render(pair, positive_only)
        ids, kinds = encode_pieces(tokenizer, pieces, split_question=True)
        excess = len(ids) - limit
        question_at = [j for j, k in enumerate(kinds) if k == "question"]
        if excess >= len(question_at):
            n_answer = sum(k in ("positive", "end") for k in kinds)
            rest = len(ids) - len(question_at)
            raise RowProblem(
                template.config.fields.chosen,
                f"the positive answer ({n_answer} tokens with its end token) "
                f"does not fit in sequence_len={limit}: {rest} tokens remain "
                "without the negative answer and the question",
            )
        # Keep the end of the question (where the actual ask usually is).
        ids, kinds = _drop(ids, kinds, set(question_at[:excess]))
        done.append("question_shortened")
    return EncodedRow(ids, kinds, positive_only, tuple(done))
