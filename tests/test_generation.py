"""Batched generation shared by SPA expansion and RobustFT."""

from __future__ import annotations

import torch

from axolotl_prefalign.core.generation import (
    _length,
    eos_token_ids,
    generate,
    render_prompt,
)

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Say yes."}],
    "Question: 1 2 3",
]


def test_token_logprobs_equal_teacher_forcing(tiny_model, tiny_tokenizer):
    out = generate(
        tiny_model,
        tiny_tokenizer,
        PROMPTS,
        max_new_tokens=6,
        temperature=0.7,
        num_return_sequences=2,
        batch_size=2,
        return_logprobs=True,
        seed=3,
    )
    assert [len(g) for g in out] == [2, 2, 2]
    for prompt, gens in zip(PROMPTS, out, strict=True):
        text = render_prompt(tiny_tokenizer, prompt)
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        for g in gens:
            assert 1 <= len(g.token_ids) <= 6
            full = torch.tensor([ids + g.token_ids])
            with torch.no_grad():
                logits = tiny_model(full).logits[0, len(ids) - 1 : -1].float()
            ref = logits.log_softmax(-1).gather(-1, torch.tensor(g.token_ids)[:, None])
            torch.testing.assert_close(
                torch.tensor(g.token_logprobs), ref.squeeze(-1), rtol=1e-4, atol=1e-4
            )
            assert g.mean_nll == -sum(g.token_logprobs) / len(g.token_logprobs)


def test_same_seed_same_samples_and_greedy_is_deterministic(tiny_model, tiny_tokenizer):
    def run(seed, temperature=0.7):
        out = generate(
            tiny_model,
            tiny_tokenizer,
            PROMPTS,
            max_new_tokens=5,
            temperature=temperature,
            seed=seed,
            batch_size=3,
        )
        return [g[0].token_ids for g in out]

    assert run(1) == run(1)
    assert run(1, temperature=0) == run(2, temperature=0)


def test_stop_ids_are_the_tokenizer_and_model_eos(tiny_model, tiny_tokenizer):
    tiny_model.generation_config.eos_token_id = [2, 7]
    assert eos_token_ids(tiny_model, tiny_tokenizer) == [2, 7]
    tiny_model.generation_config.eos_token_id = 2
    assert eos_token_ids(tiny_model, tiny_tokenizer) == [2]


def test_length_stops_at_any_stop_token_and_drops_padding():
    assert _length([5, 6, 7, 8, 2], [2, 7], 0) == 3
    assert _length([5, 6, 0, 0], [2], 0) == 2
    assert _length([5, 6, 8], [2], 0) == 3


def test_generation_ends_at_a_model_only_stop_token(tiny_model, tiny_tokenizer):
    greedy = generate(
        tiny_model, tiny_tokenizer, PROMPTS[:1], max_new_tokens=8, temperature=0
    )[0][0].token_ids
    assert len(greedy) >= 3
    stop = greedy[1]  # make the model's second greedy token a stop token
    tiny_model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, stop]
    cut = generate(
        tiny_model, tiny_tokenizer, PROMPTS[:1], max_new_tokens=8, temperature=0
    )[0][0].token_ids
    assert cut == greedy[: greedy.index(stop) + 1]
