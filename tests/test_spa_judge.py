"""SPA's implicit-reward judgment against a hand computation from full logits."""

from __future__ import annotations

import math

import pytest
import torch

from axolotl_prefalign.spa import judge as judge_mod
from axolotl_prefalign.spa.judge import (
    EMPTY_RESPONSE,
    EQUAL_REWARD,
    IDENTICAL_TEXT,
    choose_pair,
    implicit_rewards,
    judge_pairs,
)
from axolotl_prefalign.spa.pairs import completion_text, prompt_text

PROMPTS = ["What is the capital of France?", "Say yes or no.", "Count to three."]
RESPONSES = [
    ["Paris is the capital.", "Berlin", "The capital of France is Paris, I think."],
    ["yes", "no", "yes or no"],
    ["1 2 3", "one two three four five", "3"],
]


def _with_random_lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj"],
        init_lora_weights=False,  # random B: the adapter really changes the model
    )
    return get_peft_model(model, cfg)


def plain_logp(model, tokenizer, prompt: str, response: str) -> float:
    """Σ log p(response tokens): full logits → log_softmax → gather."""
    p_text = prompt_text(tokenizer, prompt)
    c_text = completion_text(tokenizer, response)
    p_ids = tokenizer(p_text)["input_ids"]
    full = tokenizer(p_text + c_text)["input_ids"]
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(p_ids) - 1 :].sum().item()


def hand_rewards(current, init, tokenizer, beta):
    out = []
    for prompt, resps in zip(PROMPTS, RESPONSES, strict=True):
        row = []
        for resp in resps:
            cur = plain_logp(current, tokenizer, prompt, resp)
            if init is None:
                with current.disable_adapter():
                    ref = plain_logp(current, tokenizer, prompt, resp)
            else:
                ref = plain_logp(init, tokenizer, prompt, resp)
            row.append(beta * (cur - ref))
        out.append(row)
    return out


def _assert_judgments_match(judgments, expected):
    for j, rewards, resps in zip(judgments, expected, RESPONSES, strict=True):
        assert j.rewards == pytest.approx(rewards, abs=2e-5)
        best = max(range(3), key=lambda k: rewards[k])
        worst = min(range(3), key=lambda k: rewards[k])
        assert (j.chosen, j.rejected) == (resps[best], resps[worst])
        margin = rewards[best] - rewards[worst]
        assert j.margin == pytest.approx(margin, abs=4e-5)
        assert j.judge_prob == pytest.approx(1 / (1 + math.exp(-margin)), abs=1e-5)
        assert j.dropped is None


def test_judgment_with_disabled_adapter_equals_hand_computation(
    tiny_model, tiny_tokenizer
):
    model = _with_random_lora(tiny_model)
    beta = 0.5
    # batch_size=2: one padded forward holds prompts of different lengths.
    judgments = judge_pairs(
        model, tiny_tokenizer, PROMPTS, RESPONSES, beta=beta, batch_size=2
    )
    expected = hand_rewards(model, None, tiny_tokenizer, beta)
    assert any(abs(r) > 1e-3 for row in expected for r in row)  # the adapter matters
    _assert_judgments_match(judgments, expected)


def test_judgment_with_separate_init_model_equals_hand_computation(
    tiny_model, tiny_tokenizer, tiny_model_dir
):
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # a different π_init: perturb every weight a little
        gen = torch.Generator().manual_seed(1)
        for p in init.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    judgments = judge_pairs(
        tiny_model, tiny_tokenizer, PROMPTS, RESPONSES, init_model=init, beta=0.1
    )
    _assert_judgments_match(
        judgments, hand_rewards(tiny_model, init, tiny_tokenizer, 0.1)
    )


def test_token_counts_are_the_trained_completion_lengths(tiny_model, tiny_tokenizer):
    model = _with_random_lora(tiny_model)
    j = judge_pairs(model, tiny_tokenizer, PROMPTS[:1], RESPONSES[:1])[0]
    n = len(
        tiny_tokenizer(
            completion_text(tiny_tokenizer, j.chosen), add_special_tokens=False
        )["input_ids"]
    )
    assert j.chosen_tokens == n


def test_identical_texts_and_equal_rewards_are_ties(tiny_model, tiny_tokenizer):
    model = _with_random_lora(tiny_model)
    judgments = judge_pairs(
        model,
        tiny_tokenizer,
        ["Q", "Q2", "Q3"],
        [["same", " same "], ["a", ""], ["x", "y"]],
    )
    assert judgments[0].dropped == IDENTICAL_TEXT
    assert judgments[1].dropped == EMPTY_RESPONSE  # one non-empty response: no pair
    assert judgments[1].rewards[1] is None
    assert judgments[2].dropped is None
    # π_init = π: every reward is 0, so distinct texts tie on reward.
    same = judge_pairs(
        tiny_model, tiny_tokenizer, ["Q"], [["x", "y"]], init_model=tiny_model
    )
    assert same[0].dropped == EQUAL_REWARD
    assert same[0].rewards == [0.0, 0.0]


def test_choose_pair_picks_extremes_and_flags_near_ties():
    assert choose_pair([0.1, 0.9, -0.3], ["a", "b", "c"]) == (1, 2, None)
    assert choose_pair([0.5, 0.5 + 5e-7], ["a", "b"])[2] == EQUAL_REWARD
    assert choose_pair([0.5, 0.6], ["a ", "a"])[2] == IDENTICAL_TEXT


def test_length_normalisation_flips_a_length_driven_choice():
    # A long answer gains more in total (+3 over 30 tokens), a short one more per
    # token (+1 over 2 tokens): the summed reward prefers the long one.
    policy = torch.tensor([-30.0, -4.0])
    init = torch.tensor([-33.0, -5.0])
    n = torch.tensor([30, 2])
    texts = ["long answer", "short"]
    summed = implicit_rewards(policy, init, n, beta=0.1).tolist()
    per_token = implicit_rewards(
        policy, init, n, beta=0.1, length_normalized=True
    ).tolist()
    assert summed == pytest.approx([0.3, 0.1])
    assert per_token == pytest.approx([0.01, 0.05])
    assert choose_pair(summed, texts)[:2] == (0, 1)
    assert choose_pair(per_token, texts)[:2] == (1, 0)


def test_length_normalised_judge_divides_by_response_tokens(tiny_model, tiny_tokenizer):
    model = _with_random_lora(tiny_model)
    plain = judge_pairs(model, tiny_tokenizer, PROMPTS, RESPONSES)
    norm = judge_pairs(
        model, tiny_tokenizer, PROMPTS, RESPONSES, length_normalized=True
    )
    for a, b, resps in zip(plain, norm, RESPONSES, strict=True):
        for resp, ra, rb in zip(resps, a.rewards, b.rewards, strict=True):
            n = len(
                tiny_tokenizer(
                    completion_text(tiny_tokenizer, resp), add_special_tokens=False
                )["input_ids"]
            )
            assert rb == pytest.approx(ra / n, rel=1e-6)


def test_non_finite_logprobs_stop_the_run(tiny_model, tiny_tokenizer):
    model = _with_random_lora(tiny_model)
    with torch.no_grad():
        model.get_base_model().model.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN|non-finite"):
        judge_pairs(model, tiny_tokenizer, PROMPTS[:1], RESPONSES[:1])


def test_plain_model_without_init_is_refused(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="needs π_init"):
        judge_pairs(tiny_model, tiny_tokenizer, PROMPTS[:1], RESPONSES[:1])


def test_one_forward_per_model_per_batch_and_reference_cache(
    tiny_model, tiny_tokenizer, monkeypatch
):
    model = _with_random_lora(tiny_model)
    calls = []
    real = judge_mod.sequence_logprobs

    def counting(m, encoded, pad_id, **kw):
        calls.append(len(encoded))
        return real(m, encoded, pad_id, **kw)

    monkeypatch.setattr(judge_mod, "sequence_logprobs", counting)
    cache = {}
    first = judge_pairs(
        model, tiny_tokenizer, PROMPTS, RESPONSES, batch_size=2, reference_cache=cache
    )
    # 2 batches × (policy + π_init), each holding all K responses of its prompts.
    assert calls == [6, 6, 3, 3]
    assert len(cache) == 9
    calls.clear()
    again = judge_pairs(
        model, tiny_tokenizer, PROMPTS, RESPONSES, batch_size=2, reference_cache=cache
    )
    assert calls == [6, 3]  # π_init comes from the cache
    for a, b in zip(again, first, strict=True):
        assert a.rewards == pytest.approx(b.rewards, abs=1e-6)


class _BosTokenizer:
    """Adds BOS to every encoding; '\\x01' in the text also encodes to BOS (id 1),
    as a chat template that writes BOS itself does."""

    bos_token_id = 1

    def __call__(self, text):
        return {"input_ids": [1] + [ord(c) for c in text]}


def test_encode_like_trl_drops_a_doubled_bos_as_axolotl_does():
    from axolotl_prefalign.spa.judge import encode_like_trl

    prompt_ids, completion_ids = encode_like_trl(_BosTokenizer(), "\x01ab", "cd")
    assert prompt_ids == [1, 97, 98]
    assert completion_ids == [99, 100]
    # no doubled BOS: nothing removed
    prompt_ids, completion_ids = encode_like_trl(_BosTokenizer(), "ab", "cd")
    assert prompt_ids == [1, 97, 98]
    assert completion_ids == [99, 100]
