"""Option log-likelihoods: the expert's multiple-choice prediction without generating.

For a question x with options o_1..o_K, each option's text is scored as the
assistant reply to the question (with its lettered options, the training-time user
turn `sft.user_turn`), rendered with the chat template and ending with its
end-of-turn token, exactly as the SFT step would train it:

    ll_i = logp(o_i | x) = Σ_t log p(o_i,t | x, o_i,<t)      (a SUM: no length norm)
    p_i  = softmax(ll)_i                                     (option probabilities)

ŷ = argmax_i ll_i (ties: the first option). The same score is the experiments' test
metric (benchmarks/quality). Log-probs go through the fused chunked path (core/
logprobs.py), so a Llama-3 vocabulary never materialises [batch, T, V] logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# torch is imported where it is used: the pipeline imports this module for the
# softmax below even when no model runs (fakes in tests, a finished stage).
IGNORE_INDEX = -100


def encode_reply(tokenizer: Any, prompt: str, reply: str) -> tuple[list[int], int]:
    """(token ids of prompt + reply, number of prompt tokens), as SFT renders them."""
    from .sft import render_example

    head, tail = render_example(tokenizer, prompt, reply)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    return list(head_ids) + list(tail_ids), len(head_ids)


def padded_batch(
    encoded: Sequence[tuple[list[int], int]], pad_id: int
) -> dict[str, Any]:
    """Right-padded input_ids / attention_mask, and labels: the ids with -100 on the
    prompt and the padding (unshifted; `labels[:, 1:]` lines up with hidden[:, :-1])."""
    import torch

    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, (seq, n_prompt) in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reply_logliks(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    replies: Sequence[str],
    *,
    batch_size: int = 8,
) -> list[float]:
    """Σ_t log p(reply_t | prompt, reply_<t) of each (user prompt, reply) pair."""
    import torch

    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                enc = [
                    encode_reply(tokenizer, p, r)
                    for p, r in zip(
                        prompts[start : start + batch_size],
                        replies[start : start + batch_size],
                        strict=True,
                    )
                ]
                out.extend(sequence_logliks(model, padded_batch(enc, pad)))
    finally:
        model.train(was_training)
    return out


def sequence_logliks(model: Any, batch: dict[str, Any]) -> list[float]:
    """Σ of the labelled tokens' log-probs per row of a `padded_batch`."""
    lp = answer_token_logprobs(model, batch)
    return [float(x) for x in lp.sum(-1).cpu()]


def answer_token_logprobs(model: Any, batch: dict[str, Any]) -> Any:
    """log p of every labelled token of a `padded_batch`, [B, T-1] (0 elsewhere);
    differentiable, so the cross-fitting SFT loss is its negative mean."""
    from ..core.heads import causal_lm, lm_head_weights, through_output
    from ..core.logprobs import token_logprobs
    from ..core.preference import HiddenCapture

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with HiddenCapture(causal_lm(model).get_decoder()) as cap:
        # Only one position reaches the lm_head: the fused path does the rest.
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
            logits_to_keep=1,
        )
    with lm_head_weights(model) as (weight, bias):
        labels = batch["labels"][:, 1:]
        hidden = through_output(model, cap.hidden, out)  # FSDP2's backward hooks
        return token_logprobs(hidden[:, :-1], weight, labels, bias=bias)


def option_probs(logliks: Sequence[float]) -> list[float]:
    """softmax over the options' summed log-likelihoods."""
    top = max(logliks)
    exp = [math.exp(x - top) for x in logliks]
    total = sum(exp)
    return [e / total for e in exp]


def best_option(logliks: Sequence[float]) -> int:
    """Position of the highest log-likelihood (ties: the first option)."""
    return max(range(len(logliks)), key=lambda i: (logliks[i], -i))
