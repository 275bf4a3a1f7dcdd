"""Scoring the arms of preferences_little_data.py: preference and task accuracy on
the test set, and SPA's gold reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import common
from preferences_arms import CONTRAST_PROMPT


def prompt_and_tails(tok: Any, arm: str, question: str, options: list[str]):
    """(head, tails) as the arm was trained: chat turns, or the contrast prefix."""
    from axolotl_prefalign.robustft.sft import render_example

    if arm in CONTRAST_PROMPT:
        from axolotl_prefalign.contrast import build_inference_prompt

        head = build_inference_prompt(question, tokenizer=tok)
        return head, [" " + o + (tok.eos_token or "") for o in options]
    head = render_example(tok, question, "x")[0]
    return head, [render_example(tok, question, o)[1] for o in options]


# the base model's reply log-probs, by (head, tails): the same for every arm and seed
_REF_LOGP: dict[tuple[str, tuple[str, ...]], list[float]] = {}


def evaluate(arm: str, model_dir: Path | None, merged: bool, test: list[dict]) -> dict:
    """Preference accuracy (implicit reward vs the base) and task accuracy."""
    from tqdm import tqdm

    if merged:
        import torch
        from transformers import AutoModelForCausalLM

        _, tok = common.load_model(None)
        policy = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32
        ).eval()
    else:
        policy, tok = common.load_model(model_dir)
    ref = None
    pref = task = 0
    for r in tqdm(test, desc=f"scoring {arm}", leave=False):
        head, tails = prompt_and_tails(tok, arm, r["question"], r["options"])
        key = (head, tuple(tails))
        if model_dir is None:  # the policy is the base model
            if key not in _REF_LOGP:
                _REF_LOGP[key] = common.reply_logprobs(policy, tok, head, tails)
            lp = _REF_LOGP[key]
        else:
            lp = common.reply_logprobs(policy, tok, head, tails)
        if key not in _REF_LOGP:
            if ref is None:
                ref, _ = common.load_model(None)
            _REF_LOGP[key] = common.reply_logprobs(ref, tok, head, tails)
        lr = _REF_LOGP[key]
        ci, ri = r["options"].index(r["gold"]), r["options"].index(r["rejected"])
        pref += (lp[ci] - lr[ci]) > (lp[ri] - lr[ri])
        task += max(range(len(lp)), key=lp.__getitem__) == ci
    # the base model's implicit reward against itself is 0 for every answer
    pref_acc = None if model_dir is None else pref / len(test)
    return {"preference_accuracy": pref_acc, "task_accuracy": task / len(test)}


def gold_reports(spa_dir: Path, iterations: int = 2) -> dict[str, dict]:
    """Each iteration's iter_<i>/gold_report.json, with its summary numbers."""
    out = {}
    for i in range(1, iterations + 1):
        path = spa_dir / f"iter_{i}" / "gold_report.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        try:
            from axolotl_prefalign.spa.gold import gold_summary

            summary = gold_summary(report)
        except (ImportError, KeyError, TypeError):
            summary = None
        out[str(i)] = {"summary": summary, "report": report}
    return out
