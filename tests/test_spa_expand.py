"""SPA expansion: sampling + judging into resumable shards, counts, prompt checks."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from axolotl_prefalign.core.config import SpaConfig
from axolotl_prefalign.core.rows import BadRowError
from axolotl_prefalign.core.shards import read_shards
from axolotl_prefalign.spa import expand as expand_mod
from axolotl_prefalign.spa.expand import expand, prepare_prompts

SPA = SpaConfig(
    max_new_tokens=6,
    shard_size=3,
    generation_batch_size=2,
    judge_batch_size=2,
)


@pytest.fixture()
def lora_model(tiny_model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(tiny_model, cfg)


def _prompts(n=8):
    return Dataset.from_dict(
        {
            "index": list(range(10, 10 + n)),
            "prompt": [f"What is {i} plus {i}?" for i in range(n)],
        }
    )


def _outputs(out):
    return (
        list(read_shards(out / "pairs")),
        list(read_shards(out / "dropped")),
        json.loads((out / "summary.json").read_text()),
    )


def test_expansion_writes_judged_pairs_and_a_summary(
    lora_model, tiny_tokenizer, tmp_path
):
    summary = expand(_prompts(), lora_model, tiny_tokenizer, None, SPA, tmp_path, 1)
    pairs, dropped, stored = _outputs(tmp_path)
    assert stored == summary
    assert summary["prompts"] == 8 == len(pairs) + len(dropped)
    assert summary["pairs"] == len(pairs)
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["summary"] == summary
    assert len(manifest["shards"]) == 3  # 8 prompts in blocks of 3
    gens = {r["index"]: r["responses"] for r in read_shards(tmp_path / "generations")}
    for row in pairs:
        assert row["iteration"] == 1
        assert {row["chosen"], row["rejected"]} <= {
            g.strip() for g in gens[row["index"]]
        }
        assert row["margin"] == pytest.approx(max(row["rewards"]) - min(row["rewards"]))
        assert 0.5 < row["judge_prob"] < 1
    assert summary["mean_abs_margin"] == pytest.approx(
        sum(abs(r["margin"]) for r in pairs) / len(pairs)
    )


def _fail_on_call(real, n):
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("phase", ["sampling", "judging"])
def test_resumed_expansion_equals_an_uninterrupted_one(
    phase, lora_model, tiny_tokenizer, tmp_path, monkeypatch
):
    clean = tmp_path / "clean"
    expand(_prompts(), lora_model, tiny_tokenizer, None, SPA, clean, 1)

    broken = tmp_path / "broken"
    if phase == "sampling":
        gen = expand_mod.hf_generator(lora_model, tiny_tokenizer, SPA)
        kwargs = {"generator": _fail_on_call(gen, 2)}  # dies after the first shard
    else:
        monkeypatch.setattr(
            expand_mod, "judge_pairs", _fail_on_call(expand_mod.judge_pairs, 2)
        )
        kwargs = {}
    with pytest.raises(RuntimeError, match="injected failure"):
        expand(_prompts(), lora_model, tiny_tokenizer, None, SPA, broken, 1, **kwargs)
    stage = "generations" if phase == "sampling" else "pairs"
    partial = json.loads((broken / stage / "manifest.json").read_text())
    assert len(partial["shards"]) == 1 and not partial["complete"]
    monkeypatch.undo()

    expand(_prompts(), lora_model, tiny_tokenizer, None, SPA, broken, 1)
    assert _outputs(broken) == _outputs(clean)


def test_finished_expansion_is_not_redone_and_other_settings_are_refused(
    lora_model, tiny_tokenizer, tmp_path, monkeypatch
):
    first = expand(_prompts(), lora_model, tiny_tokenizer, None, SPA, tmp_path, 1)
    monkeypatch.setattr(expand_mod, "judge_pairs", None)  # would crash if called
    assert (
        expand(_prompts(), lora_model, tiny_tokenizer, None, SPA, tmp_path, 1) == first
    )
    hotter = SPA.model_copy(update={"temperature": 1.0})
    with pytest.raises(ValueError, match="other settings"):
        expand(_prompts(), lora_model, tiny_tokenizer, None, hotter, tmp_path, 1)


def test_ties_and_empty_responses_are_dropped_and_counted(
    lora_model, tiny_tokenizer, tmp_path
):
    canned = {
        "What is 0 plus 0?": ["zero", "zero"],  # identical text
        "What is 1 plus 1?": ["", "two"],  # one empty response: no pair
        "What is 2 plus 2?": ["four", "4"],
    }

    def generator(texts, seed):
        out = []
        for text in texts:
            prompt = next(p for p in canned if p in text)
            out.append(canned[prompt])
        return out

    summary = expand(
        _prompts(3),
        lora_model,
        tiny_tokenizer,
        None,
        SPA,
        tmp_path,
        2,
        generator=generator,
    )
    pairs, dropped, _ = _outputs(tmp_path)
    assert summary["pairs"] == 1 and summary["ties_dropped"] == 1
    assert summary["dropped_identical_text"] == 1 and summary["dropped_empty"] == 1
    assert {(d["index"], d["reason"]) for d in dropped} == {
        (10, "identical_text"),
        (11, "empty"),
    }
    assert pairs[0]["index"] == 12 and {pairs[0]["chosen"], pairs[0]["rejected"]} == {
        "four",
        "4",
    }
    # Equal rewards (π_init = π) for distinct texts: a tie as well.
    plain = lora_model.get_base_model()
    out = tmp_path / "same"
    with lora_model.disable_adapter():
        s = expand(
            _prompts(3), plain, tiny_tokenizer, plain, SPA, out, 2, generator=generator
        )
    assert s["pairs"] == 0 and s["dropped_equal_reward"] == 1


def test_malformed_and_overlong_prompts_raise_or_are_counted(tiny_tokenizer):
    rows = [
        {"index": 0, "prompt": "fine"},
        {"index": 1, "prompt": "   "},
        {"index": 2, "prompt": None},
        {"index": 3, "prompt": "word " * 200},
    ]
    with pytest.raises(BadRowError, match="p.jsonl, row 2, field 'prompt': empty"):
        prepare_prompts(rows, tiny_tokenizer, max_prompt_tokens=64, source="p.jsonl")
    kept, checker = prepare_prompts(
        rows, tiny_tokenizer, max_prompt_tokens=64, on_bad_row="skip", source="p.jsonl"
    )
    assert kept == [(0, "fine")]
    assert checker.n_skipped == 3
    assert any("max_prompt_tokens (64)" in why for why in checker.skipped)
    with pytest.raises(
        BadRowError, match="row 4, field 'prompt': .* tokens > prefalign"
    ):
        prepare_prompts(rows[3:], tiny_tokenizer, max_prompt_tokens=64)


def test_no_usable_prompts_is_an_error(lora_model, tiny_tokenizer, tmp_path):
    empty = Dataset.from_dict({"index": [0], "prompt": [" "]})
    with pytest.raises(ValueError, match="no usable prompts"):
        expand(
            empty, lora_model, tiny_tokenizer, None, SPA, tmp_path, 1, on_bad_row="skip"
        )
