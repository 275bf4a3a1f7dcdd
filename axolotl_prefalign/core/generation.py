"""Batched generation with a KV cache, shared by SPA expansion and RobustFT.

Prompts are chat messages (rendered with the tokenizer's chat template) or plain
strings. Batches are left-padded so every row continues from its own last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

Prompt = str | list[dict[str, str]]


@dataclass
class Generation:
    """One sampled continuation: text, token ids and their log-probs."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float] = field(default_factory=list)

    @property
    def mean_nll(self) -> float:
        """H = -(1/N) Σ log p(y_j | ...): RobustFT's confidence score."""
        if not self.token_logprobs:
            return float("inf")
        return -sum(self.token_logprobs) / len(self.token_logprobs)


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """Chat messages through the chat template (with the generation prompt)."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True
        )
    return "\n".join(m["content"] for m in prompt) + "\n"


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 300,
    temperature: float = 0.7,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int = 8,
    seed: int = 42,
    return_logprobs: bool = False,
    desc: str = "generating",
) -> list[list[Generation]]:
    """Sample `num_return_sequences` continuations per prompt (greedy at T=0)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [render_prompt(tokenizer, p) for p in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    do_sample = temperature > 0
    stop_ids = eos_token_ids(model, tokenizer)
    results: list[list[Generation]] = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
            # One seed per batch position keeps a resumed run identical.
            torch.manual_seed(seed + start)
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=top_p if do_sample else None,
                top_k=0 if do_sample else None,
                num_return_sequences=num_return_sequences,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids,
                use_cache=True,
                return_dict_in_generate=True,
                output_logits=return_logprobs,
            )
            new = out.sequences[:, batch["input_ids"].shape[1] :]
            logps = None
            if return_logprobs:
                # Raw step logits (not the temperature/top-p warped scores): the
                # model's own probabilities of the tokens it produced.
                steps = torch.stack(out.logits, dim=1).float().log_softmax(-1)
                logps = steps.gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for row in range(new.shape[0]):
                ids = new[row].tolist()
                n = _length(ids, stop_ids, tokenizer.pad_token_id)
                gen = Generation(
                    text=tokenizer.decode(ids[:n], skip_special_tokens=True).strip(),
                    token_ids=ids[:n],
                    token_logprobs=logps[row, :n].tolist() if logps is not None else [],
                )
                if row % num_return_sequences == 0:
                    results.append([])
                results[-1].append(gen)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return results


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and the model's own list.

    Chat models often end turns with a token that is not the tokenizer's EOS
    (Gemma's <end_of_turn>, Llama-3's <|eot_id|>); their generation_config lists it.
    """
    ids = [tokenizer.eos_token_id]
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _length(ids: list[int], stop_ids: list[int], pad_id: int | None) -> int:
    """Tokens up to and including the first stop token; trailing padding dropped."""
    stops = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return i + 1
    n = len(ids)
    while n and ids[n - 1] == pad_id:
        n -= 1
    return n
