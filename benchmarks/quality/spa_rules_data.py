"""The data of spa_rules.py: prompts, the base model's own samples, and pairs a
rule labels (chosen keeps it, rejected breaks it)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import common
from preferences_arms import listed_prompt

# Each candidate: how a question becomes the prompt, and the rule gold checks.
CANDIDATES = {
    "max_words": "the question alone; preferred: an answer of at most N words",
    "answer_line": "the question with its lettered options and the request to end "
    "with a line 'Answer: <letter>'; preferred: the answer keeps that format",
}
ANSWER_LINE_ASK = "End your reply with a line of the form 'Answer: <letter>'."


def prompt_text(candidate: str, row: dict[str, Any]) -> str:
    """The user turn of one ARC-Easy question for `candidate`."""
    if candidate == "max_words":
        return row["question"]
    return listed_prompt(row["question"], row["options"], ANSWER_LINE_ASK)


def split_rows(n_test: int, n_pool: int) -> tuple[list[dict], list[dict]]:
    """(test, pool) ARC-Easy questions in a fixed order (the same for every seed)."""
    rows = common.arc_easy_rows()
    random.Random(1234).shuffle(rows)
    if n_test + n_pool > len(rows):
        raise SystemExit(f"ARC-Easy has {len(rows)} questions: fewer than asked")
    return rows[:n_test], rows[n_test : n_test + n_pool]


def generate(
    model: Any,
    tok: Any,
    prompts: list[str],
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float | None,
    seed: int,
    batch_size: int = 32,
    desc: str = "generating",
) -> list[list[str]]:
    """`samples` replies per prompt through the chat template (greedy when
    temperature is None); left-padded batches with the KV cache."""
    import torch
    from tqdm import tqdm

    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    heads = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    flat = [h for h in heads for _ in range(samples)]
    out: list[str] = []
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(flat), batch_size), desc=desc, leave=False):
        batch = tok(
            flat[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": 1.0}
            if temperature
            else {"do_sample": False}
        )
        with torch.no_grad():
            ids = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                **sampling,
            )
        new = ids[:, batch["input_ids"].shape[1] :]
        out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return [out[k * samples : (k + 1) * samples] for k in range(len(prompts))]


def base_samples(args: Any, candidate: str, work: Path) -> dict[str, Any]:
    """The base model's samples of every test and pool prompt (cached: the same
    for every seed and seed size)."""
    path = work / f"samples_{candidate}.json"
    if path.exists():
        return json.loads(path.read_text())
    test, pool = split_rows(args.n_test, args.n_pool)
    model, tok = common.load_model(None)
    rows = test + pool
    prompts = [prompt_text(candidate, r) for r in rows]
    replies = generate(
        model,
        tok,
        prompts,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        seed=1234,
        desc=f"base samples ({candidate})",
    )
    rule = f"max_words: {args.max_words}" if candidate == "max_words" else "answer_line"
    data = {
        "candidate": candidate,
        "rule": rule,
        "test": [
            {"prompt": p, "samples": s}
            for p, s in zip(prompts[: len(test)], replies[: len(test)], strict=True)
        ],
        "pool": [
            {"prompt": p, "samples": s}
            for p, s in zip(prompts[len(test) :], replies[len(test) :], strict=True)
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def rule_pair(row: dict[str, Any], rule: str) -> dict[str, str] | None:
    """(chosen, rejected) = (first sample keeping the rule, first breaking it),
    or None when the samples do not differ on it."""
    from axolotl_prefalign.spa.gold import keeps_rule

    keep = [s for s in row["samples"] if keeps_rule(s, rule)]
    broken = [s for s in row["samples"] if not keeps_rule(s, rule)]
    if not keep or not broken:
        return None
    return {"prompt": row["prompt"], "chosen": keep[0], "rejected": broken[0]}


def make_sets(data: dict[str, Any], seed: int, seed_size: int, spa_prompts: int):
    """(seed pairs, every pool pair, SPA prompts with the rule as gold, test pairs,
    test prompts). The pool's pairs are shuffled by the seed; the SPA prompts are
    pool prompts outside the seed (labelled or not: SPA never reads a label)."""
    rule = data["rule"]
    pool = list(data["pool"])
    random.Random(seed).shuffle(pool)
    pairs = [(k, rule_pair(r, rule)) for k, r in enumerate(pool)]
    labelled = [(k, p) for k, p in pairs if p is not None]
    if seed_size > len(labelled):
        raise SystemExit(f"seed size {seed_size} > {len(labelled)} labelled pairs")
    seed_pairs = labelled[:seed_size]
    used = {k for k, _ in seed_pairs}
    rest = [r for k, r in enumerate(pool) if k not in used][:spa_prompts]
    spa = [{"prompt": r["prompt"], "gold": rule} for r in rest]
    test_pairs = [p for r in data["test"] if (p := rule_pair(r, rule))]
    return (
        [p for _, p in seed_pairs],
        [p for _, p in labelled],
        spa,
        test_pairs,
        [r["prompt"] for r in data["test"]],
    )


def sample_stats(data: dict[str, Any]) -> dict[str, Any]:
    """How often the base model's samples keep the rule, and how many prompts
    yield a pair."""
    from axolotl_prefalign.spa.gold import keeps_rule

    rule = data["rule"]
    out = {}
    for part in ("test", "pool"):
        rows = data[part]
        kept = [keeps_rule(s, rule) for r in rows for s in r["samples"]]
        out[part] = {
            "prompts": len(rows),
            "samples": len(kept),
            "samples_keeping_rule": sum(kept),
            "prompts_with_pair": sum(rule_pair(r, rule) is not None for r in rows),
        }
    return out
