"""SPA's direct preference judgment with the implicit reward (docs/methods.md#spa).

    r(y) = β · [logp_π(y|x) − logp_init(y|x)]        (÷ |y| when length-normalised)
    p(y_w ≻ y_l | x) = σ(r(y_w) − r(y_l))

π is the current model π_{i−1}; π_init is the SFT model (the base with the adapter
disabled, or a separate model). Of K responses the highest reward is chosen and the
lowest rejected. Each model sees all K responses of a batch of prompts in ONE padded
forward, and log-probs come from the backbone's hidden states through the fused
`token_logprobs` (never full [B, T, V] logits). Responses are scored as the exact
token sequences DPO will train on (`pairs.prompt_text` / `pairs.completion_text`,
tokenised the way TRL's DPO trainer tokenises them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.heads import causal_lm, lm_head_weights
from ..core.logprobs import IGNORE_INDEX
from ..core.losses import implicit_rewards as dpo_implicit_rewards
from .pairs import completion_text, prompt_text

TIE_TOLERANCE = 1e-6
# Why a prompt yields no pair.
EQUAL_REWARD, IDENTICAL_TEXT, EMPTY_RESPONSE = "equal_reward", "identical_text", "empty"

RefCache = dict[tuple[str, str], tuple[float, int]]


@dataclass
class Judgment:
    """The judged pair of one prompt (or why there is none: `dropped`)."""

    chosen: str | None
    rejected: str | None
    judge_prob: float
    margin: float
    rewards: list[float | None] = field(default_factory=list)
    chosen_tokens: int = 0
    rejected_tokens: int = 0
    dropped: str | None = None


def implicit_rewards(
    logp_policy: torch.Tensor,
    logp_init: torch.Tensor,
    n_tokens: torch.Tensor,
    beta: float,
    length_normalized: bool = False,
) -> torch.Tensor:
    """r(y) = β·[logp_π(y|x) − logp_init(y|x)], optionally per response token."""
    reward = dpo_implicit_rewards(logp_policy.double(), logp_init.double(), beta)
    if length_normalized:
        reward = reward / n_tokens.double().clamp(min=1)
    return reward


def choose_pair(
    rewards: Sequence[float], texts: Sequence[str]
) -> tuple[int, int, str | None]:
    """(chosen, rejected, tie reason): highest vs lowest reward; ties are flagged."""
    chosen = max(range(len(rewards)), key=lambda k: rewards[k])
    # The LAST lowest: when every reward is equal, chosen != rejected still.
    rejected = min(reversed(range(len(rewards))), key=lambda k: rewards[k])
    if texts[chosen].strip() == texts[rejected].strip():
        return chosen, rejected, IDENTICAL_TEXT
    if rewards[chosen] - rewards[rejected] <= TIE_TOLERANCE:
        return chosen, rejected, EQUAL_REWARD
    return chosen, rejected, None


def encode_like_trl(
    tokenizer: Any, prompt: str, completion: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) exactly as Axolotl's DPO trainer has them: TRL's
    `_prepare_dataset` tokenization, then Axolotl's removal of a doubled BOS (a chat
    template that writes BOS, plus the tokenizer adding one)."""
    bos = tokenizer.bos_token_id

    def encode(text: str) -> list[int]:
        ids = list(tokenizer(text)["input_ids"])
        # As Axolotl's `remove_double_bos_token`: one BOS of two leading ones goes.
        if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids

    prompt_ids = encode(prompt)
    full_ids = encode(prompt + completion)
    return prompt_ids, full_ids[len(prompt_ids) :]


def _batch(
    encoded: list[tuple[list[int], list[int]]], pad_id: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and next-token labels (-100 on prompt/pad)."""
    width = max(len(p) + len(c) for p, c in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width - 1), IGNORE_INDEX, dtype=torch.long)
    for row, (p, c) in enumerate(encoded):
        seq = p + c
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        # hidden[t] predicts token t+1: the completion's tokens sit at t+1 >= len(p).
        labels[row, len(p) - 1 : len(seq) - 1] = torch.tensor(c)
    return ids.to(device), mask.to(device), labels.to(device)


@torch.no_grad()
def sequence_logprobs(
    model: Any,
    encoded: list[tuple[list[int], list[int]]],
    pad_id: int,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probs and the completion length, per sequence,
    from ONE padded forward of the backbone and the fused lm_head log-softmax."""
    from ..core.logprobs import token_logprobs

    causal = causal_lm(model)
    device = causal.get_input_embeddings().weight.device
    ids, mask, labels = _batch(encoded, pad_id, device)
    out = causal.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    with lm_head_weights(causal) as (weight, bias):
        per_token = token_logprobs(
            hidden[:, :-1], weight, labels, bias=bias, chunk_size=chunk_size
        )
    return per_token.double().sum(-1).cpu(), (labels != IGNORE_INDEX).sum(-1).cpu()


def _reference_context(model: Any, init_model: Any):
    if init_model is not None:
        return contextlib.nullcontext(init_model)
    if not hasattr(model, "disable_adapter"):
        raise ValueError(
            "SPA judging needs π_init: pass init_model, or a PEFT model whose "
            "disabled adapter is π_init"
        )

    @contextlib.contextmanager
    def disabled():
        with model.disable_adapter():
            yield model

    return disabled()


def _check_finite(values: torch.Tensor, which: str, first_prompt: int) -> None:
    if not torch.isfinite(values).all():
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"SPA judge: non-finite log-probs from the {which} model for sequences "
            f"{bad[:5]} of the batch starting at prompt {first_prompt}; check the "
            "model weights and dtype (fp16 overflow?)"
        )


def judge_pairs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    init_model: Any = None,
    beta: float = 0.1,
    length_normalized: bool = False,
    batch_size: int = 8,
    chunk_size: int | None = None,
    reference_cache: RefCache | None = None,
    desc: str = "judging",
) -> list[Judgment]:
    """Label each prompt's K responses by implicit reward: one `Judgment` per prompt.

    `init_model=None` takes π_init from `model` with its adapter disabled. Identical
    (prompt, response) sequences are scored once; `reference_cache` keeps π_init's
    scores across calls."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
    cache: RefCache = {} if reference_cache is None else reference_cache
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id or 0
    was_training = model.training
    model.eval()
    if init_model is not None:
        init_model.eval()
    results: list[Judgment] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
            results.extend(
                _judge_batch(
                    model,
                    tokenizer,
                    prompts[start : start + batch_size],
                    responses[start : start + batch_size],
                    init_model=init_model,
                    beta=beta,
                    length_normalized=length_normalized,
                    chunk_size=chunk_size,
                    cache=cache,
                    pad_id=pad_id,
                    first=start,
                )
            )
    finally:
        model.train(was_training)
    return results


def _judge_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    init_model: Any,
    beta: float,
    length_normalized: bool,
    chunk_size: int | None,
    cache: RefCache,
    pad_id: int,
    first: int,
) -> list[Judgment]:
    # Render each distinct (prompt, response) once; empty responses are no candidates.
    slot_of: dict[tuple[str, str], int] = {}
    slots: list[list[int | None]] = []
    for prompt, resps in zip(prompts, responses, strict=True):
        p_text = prompt_text(tokenizer, prompt)
        row: list[int | None] = []
        for resp in resps:
            if not resp.strip():
                row.append(None)
                continue
            key = (p_text, completion_text(tokenizer, resp.strip()))
            row.append(slot_of.setdefault(key, len(slot_of)))
        slots.append(row)
    keys = list(slot_of)
    encoded = [encode_like_trl(tokenizer, p, c) for p, c in keys]

    policy = torch.zeros(len(keys), dtype=torch.float64)
    init = torch.zeros(len(keys), dtype=torch.float64)
    lengths = torch.zeros(len(keys), dtype=torch.long)
    if keys:
        policy, lengths = sequence_logprobs(
            model, encoded, pad_id, chunk_size=chunk_size
        )
        _check_finite(policy, "current", first)
        missing = [k for k, key in enumerate(keys) if key not in cache]
        if missing:
            with _reference_context(model, init_model) as ref:
                ref_logps, ref_lengths = sequence_logprobs(
                    ref, [encoded[k] for k in missing], pad_id, chunk_size=chunk_size
                )
            _check_finite(ref_logps, "π_init", first)
            for k, lp, n in zip(
                missing, ref_logps.tolist(), ref_lengths.tolist(), strict=True
            ):
                cache[keys[k]] = (lp, n)
        init = torch.tensor([cache[key][0] for key in keys], dtype=torch.float64)
    rewards = implicit_rewards(policy, init, lengths, beta, length_normalized).tolist()

    out: list[Judgment] = []
    for resps, row in zip(responses, slots, strict=True):
        per_resp = [None if s is None else rewards[s] for s in row]
        cand = [k for k, s in enumerate(row) if s is not None]
        if len(cand) < 2:
            out.append(
                Judgment(
                    None, None, math.nan, math.nan, per_resp, dropped=EMPTY_RESPONSE
                )
            )
            continue
        c, r, tie = choose_pair([per_resp[k] for k in cand], [resps[k] for k in cand])
        c, r = cand[c], cand[r]
        margin = per_resp[c] - per_resp[r]
        out.append(
            Judgment(
                chosen=resps[c].strip(),
                rejected=resps[r].strip(),
                judge_prob=1.0 / (1.0 + math.exp(-margin)),
                margin=margin,
                rewards=per_resp,
                chosen_tokens=int(lengths[row[c]]),
                rejected_tokens=int(lengths[row[r]]),
                dropped=tie,
            )
        )
    return out
