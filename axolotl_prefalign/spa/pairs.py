"""Preference pairs for DPO: SPA-judged or labelled, rendered as the trainer sees them.

A row is `{prompt, chosen, rejected}` (plain text; the prompt is one user turn) plus,
for pairs that SPA judged itself, `judge_prob`, `margin` and `iteration`. The
transform renders the prompt with the tokenizer's chat template (TRL's DPO trainer
does not template plain-text rows) and each response as the assistant turn's text up
to and including the end-of-turn token, with EOS appended where TRL would append it,
so SPA's judge (`judge.py`) scores exactly the tokens that DPO later trains on.

Plain labelled seed rows load through the same type: `judge_prob = 1.0` (a human
label is certain), `margin = NaN` (nothing was judged), `iteration = 0`,
`pair_id = -1` (no SPA prompt row).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..core.generation import render_prompt
from ..core.rows import RowChecker, check_text_fields

PAIR_FIELDS = ("prompt", "chosen", "rejected")
# Columns the transform returns; everything else in the source file is dropped.
# `pair_id` is a judged pair's `index` (its prompt's source row; -1 without one):
# the SPA loss records its noise flags by it for the gold report.
OUTPUT_COLUMNS = (
    "prompt",
    "chosen",
    "rejected",
    "judge_prob",
    "margin",
    "iteration",
    "pair_id",
)
_DUMMY_USER = {"role": "user", "content": "[[prefalign dummy turn]]"}


def user_turn(prompt: str) -> list[dict[str, str]]:
    """A prompt text as a one-message chat."""
    return [{"role": "user", "content": prompt}]


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model sees it: the user turn plus the generation prompt."""
    return render_prompt(tokenizer, user_turn(prompt))


def completion_text(tokenizer: Any, response: str) -> str:
    """The response as the assistant turn's text, ending with the end-of-turn token
    and (as TRL's DPO trainer does for plain text) with EOS."""
    text = response
    if getattr(tokenizer, "chat_template", None):
        prefix = tokenizer.apply_chat_template(
            [_DUMMY_USER], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            [_DUMMY_USER, {"role": "assistant", "content": response}], tokenize=False
        )
        # The assistant turn = what the template adds after the generation prompt;
        # templates that restructure earlier turns fall back to response + EOS.
        if full.startswith(prefix) and full[len(prefix) :].startswith(response):
            text = full[len(prefix) :].rstrip()
    eos = tokenizer.eos_token or ""
    if eos and not text.endswith(eos):
        text += eos
    return text


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def normalize_pair(
    row: Mapping[str, Any], idx: int, checker: RowChecker
) -> dict[str, Any] | None:
    """Validate one pair row and fill the judge fields; None when skipped."""
    if not check_text_fields(checker, idx, row, PAIR_FIELDS):
        return None
    prompt, chosen, rejected = (row[f].strip() for f in PAIR_FIELDS)
    if chosen == rejected:
        checker.bad(idx, "rejected", "chosen and rejected are identical")
        return None
    judge_prob = row.get("judge_prob")
    if judge_prob is None:
        judge_prob = 1.0
    else:
        p = _number(judge_prob)
        if p is None or not 0.0 <= p <= 1.0:
            checker.bad(
                idx, "judge_prob", f"must be a number in [0, 1], got {judge_prob!r}"
            )
            return None
        judge_prob = p
    margin = row.get("margin")
    if margin is None:
        margin = math.nan
    else:
        m = _number(margin)
        if m is None or math.isinf(m):
            checker.bad(idx, "margin", f"must be a finite number, got {margin!r}")
            return None
        margin = m
    iteration = row.get("iteration")
    if iteration is None:
        iteration = 0
    elif isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        checker.bad(idx, "iteration", f"must be an integer >= 0, got {iteration!r}")
        return None
    # Bookkeeping only (never a bad row): a judged pair's prompt row, else -1.
    index = row.get("index")
    pair_id = index if isinstance(index, int) and not isinstance(index, bool) else -1
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "judge_prob": judge_prob,
        "margin": margin,
        "iteration": iteration,
        "pair_id": max(pair_id, -1),
    }
