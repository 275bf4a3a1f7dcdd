"""The denoised set as SFT rows: the question (with lettered options) as the user
turn, the answer as the assistant turn, loss on the answer tokens only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from datasets import Dataset

from ..core.logprobs import IGNORE_INDEX
from ..core.rows import RowChecker
from .answers import letters
from .errors import RobustFTError

LOG = logging.getLogger("axolotl_prefalign")


def user_turn(question: str, options: Sequence[str] | None) -> str:
    """The question as the user asks it at training time."""
    text = question.strip()
    if options:
        text += "\n\n" + "\n".join(
            f"{letter}. {opt}"
            for letter, opt in zip(letters(len(options)), options, strict=True)
        )
    return text


def render_example(tokenizer: Any, prompt: str, answer: str) -> tuple[str, str]:
    """(prompt text, completion text) through the chat template; the completion
    ends with the template's end-of-turn (or the EOS token without a template)."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(
            user, tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(head):
            raise RobustFTError(
                "the chat template does not render the prompt as a prefix of the "
                "conversation; cannot mask the prompt tokens"
            )
        return head, full[len(head) :]
    return f"Question: {prompt}\nAnswer: ", answer + (tokenizer.eos_token or "")


def tokenize_example(
    tokenizer: Any,
    prompt: str,
    answer: str,
    *,
    sequence_len: int,
    train_on_inputs: bool = False,
) -> dict[str, list[int]] | None:
    """input_ids / attention_mask / labels with the prompt masked; None if too long."""
    head, tail = render_example(tokenizer, prompt, answer)
    prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + answer_ids
    if len(ids) > sequence_len:
        return None
    masked = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": masked + list(answer_ids),
    }


def tokenize_rows(
    rows: Dataset,
    tokenizer: Any,
    *,
    question_field: str,
    answer_field: str,
    options_field: str | None,
    sequence_len: int,
    train_on_inputs: bool = False,
    checker: RowChecker | None = None,
) -> Dataset:
    """Tokenize a denoised set; rows longer than `sequence_len` go to the checker."""
    checker = checker or RowChecker("robustft training set")
    out = []
    for i, row in enumerate(rows):
        options = row.get(options_field) if options_field else None
        enc = tokenize_example(
            tokenizer,
            user_turn(row[question_field], options),
            str(row[answer_field]),
            sequence_len=sequence_len,
            train_on_inputs=train_on_inputs,
        )
        if enc is None:
            checker.bad(i, None, f"longer than sequence_len ({sequence_len} tokens)")
            continue
        out.append(enc)
    checker.report()
    if not out:
        raise RobustFTError("RobustFT left no training rows (see the report above)")
    return Dataset.from_list(out)
