"""The DPO dataset type `axolotl_prefalign.spa_pairs`: SPA-judged or labelled pairs.

A row is `{prompt, chosen, rejected}` (plain text; the prompt is one user turn) plus,
for pairs that SPA judged itself, `judge_prob`, `margin` and `iteration`. The
transform renders the prompt with the tokenizer's chat template (TRL's DPO trainer
does not template plain-text rows) and each response as the assistant turn's text up
to and including the end-of-turn token, with EOS appended where TRL would append it,
so SPA's judge (`judge.py`) scores exactly the tokens that DPO later trains on.

Plain labelled seed rows load through the same type: `judge_prob = 1.0` (a human
label is certain), `margin = NaN` (nothing was judged), `iteration = 0`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..generation import render_prompt
from ..rows import RowChecker, check_text_fields

PAIR_FIELDS = ("prompt", "chosen", "rejected")
# Columns the transform returns; everything else in the source file is dropped.
OUTPUT_COLUMNS = ("prompt", "chosen", "rejected", "judge_prob", "margin", "iteration")
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
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "judge_prob": judge_prob,
        "margin": margin,
        "iteration": iteration,
    }


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
    from ..plugin import prefalign_config

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
