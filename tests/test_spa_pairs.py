"""`type: axolotl_prefalign.spa_pairs`: rendering, validation, and Axolotl's RL path."""

from __future__ import annotations

import json
import math
import types

import pytest
import yaml

from axolotl_prefalign.core.rows import BadRowError, RowChecker
from axolotl_prefalign.integrations.axolotl.spa_pairs import (
    _axolotl_passes_indices,
    spa_pairs,
)
from axolotl_prefalign.spa.pairs import (
    OUTPUT_COLUMNS,
    completion_text,
    normalize_pair,
    prompt_text,
)

PLUGIN = "axolotl_prefalign.PrefAlignPlugin"


def test_prompt_and_completion_follow_the_chat_template(tiny_tokenizer):
    assert prompt_text(tiny_tokenizer, "Why?") == (
        "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    )
    # The assistant turn's own end token, no trailing newline, no second EOS.
    assert completion_text(tiny_tokenizer, "Because.") == "Because.<|im_end|>"


def test_without_chat_template_the_prompt_is_plain_and_eos_is_appended(
    tiny_tokenizer,
):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = None
    assert prompt_text(tok, "Why?") == "Why?\n"
    assert completion_text(tok, "Because.") == "Because." + tok.eos_token


def test_seed_rows_get_certain_label_and_no_margin():
    checker = RowChecker("seed.jsonl")
    row = {"prompt": " Q ", "chosen": "good ", "rejected": "bad", "extra": 1}
    pair = normalize_pair(row, 0, checker)
    assert pair["prompt"] == "Q" and pair["chosen"] == "good"
    assert pair["judge_prob"] == 1.0
    assert math.isnan(pair["margin"])
    assert pair["iteration"] == 0


def test_judged_rows_keep_their_fields():
    row = {
        "prompt": "Q",
        "chosen": "a",
        "rejected": "b",
        "judge_prob": 0.73,
        "margin": 0.99,
        "iteration": 2,
    }
    pair = normalize_pair(row, 0, RowChecker("pairs"))
    assert (pair["judge_prob"], pair["margin"], pair["iteration"]) == (0.73, 0.99, 2)


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"chosen": "a", "rejected": "b"}, "prompt", "missing"),
        ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, "chosen", "empty"),
        ({"prompt": "Q", "chosen": "a", "rejected": 3}, "rejected", "must be text"),
        ({"prompt": "Q", "chosen": "a ", "rejected": " a"}, "rejected", "identical"),
        (
            {"prompt": "Q", "chosen": "a", "rejected": "b", "judge_prob": 1.5},
            "judge_prob",
            r"number in \[0, 1\]",
        ),
        (
            {"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "big"},
            "margin",
            "finite number",
        ),
        (
            {"prompt": "Q", "chosen": "a", "rejected": "b", "iteration": -1},
            "iteration",
            "integer >= 0",
        ),
    ],
)
def test_bad_rows_name_source_row_and_field(row, field, problem):
    with pytest.raises(
        BadRowError, match=rf"pairs.jsonl, row 5, field '{field}': .*{problem}"
    ):
        normalize_pair(row, 4, RowChecker("pairs.jsonl"))
    skip = RowChecker("pairs.jsonl", "skip")
    assert normalize_pair(row, 4, skip) is None
    assert skip.n_skipped == 1


def _cfg(policy="error", path="seed.jsonl"):
    return {
        "datasets": [{"path": path, "type": "axolotl_prefalign.spa_pairs"}],
        "prefalign": {"on_bad_row": policy},
    }


def test_transform_renders_and_drops_bad_rows_under_skip(tiny_tokenizer):
    fn, kwargs = spa_pairs(_cfg("skip"))
    # Axolotl >= 0.20 wraps the transform in a one-argument function.
    assert kwargs["batched"] and kwargs["with_indices"] is _axolotl_passes_indices()
    assert kwargs["remove_columns"] == "__all__"
    batch = {
        "prompt": ["Q1", "Q2", "Q3"],
        "chosen": ["a", "", "c"],
        "rejected": ["b", "x", "d"],
        "margin": [0.5, None, None],
    }
    out = fn(batch, [0, 1, 2], tokenizer=tiny_tokenizer)
    assert list(out) == list(OUTPUT_COLUMNS)
    assert out["prompt"] == [prompt_text(tiny_tokenizer, q) for q in ("Q1", "Q3")]
    assert out["chosen"] == ["a<|im_end|>", "c<|im_end|>"]
    assert out["margin"][0] == 0.5 and math.isnan(out["margin"][1])
    strict, _ = spa_pairs(_cfg("error"))
    with pytest.raises(BadRowError, match="seed.jsonl, row 2, field 'chosen': empty"):
        strict(batch, [0, 1, 2], tokenizer=tiny_tokenizer)


def test_transform_without_indices_quotes_the_rows_prompt(tiny_tokenizer):
    """Axolotl >= 0.20 gives the map no indices: the error quotes the prompt."""
    batch = {"prompt": ["Q1", "Q2"], "chosen": ["a", "b"], "rejected": ["b", "b"]}
    strict, _ = spa_pairs(_cfg("error"))
    with pytest.raises(
        BadRowError,
        match=r"seed.jsonl \(the row with prompt 'Q2'\), field 'rejected': chosen "
        "and rejected are identical",
    ):
        strict(batch, tokenizer=tiny_tokenizer)
    lenient, _ = spa_pairs(_cfg("skip"))
    assert lenient(batch, tokenizer=tiny_tokenizer)["chosen"] == ["a<|im_end|>"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def loaded_pairs(tmp_path, tiny_model_dir):
    """Seed + judged rows through Axolotl's own RL data loader (load_cfg → rl.py)."""
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.data.rl import prepare_preference_datasets

    from axolotl_prefalign.cli import load_config

    data = tmp_path / "pairs.jsonl"
    _write_jsonl(
        data,
        [
            {"prompt": "Q1", "chosen": "yes", "rejected": "no"},
            {"prompt": "Q2", "chosen": "", "rejected": "no"},  # skipped, counted
            {
                "prompt": "Q3",
                "chosen": "good",
                "rejected": "bad",
                "judge_prob": 0.6,
                "margin": 0.4,
                "iteration": 1,
            },
        ],
    )
    raw = {
        "base_model": str(tiny_model_dir),
        "plugins": [PLUGIN],
        "prefalign": {"on_bad_row": "skip"},
        "rl": "dpo",
        "datasets": [
            {
                "path": str(data),
                "ds_type": "json",
                "split": "train",
                "type": "axolotl_prefalign.spa_pairs",
            }
        ],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "num_epochs": 1,
        "sequence_len": 128,
        "bf16": False,
        "fp16": False,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    tokenizer = load_tokenizer(cfg)
    train, _ = prepare_preference_datasets(cfg, tokenizer)
    return train, tokenizer


def test_axolotl_rl_loader_keeps_judge_fields(loaded_pairs):
    train, tok = loaded_pairs
    assert train.column_names == list(OUTPUT_COLUMNS)
    # Axolotl shuffles merged datasets; order by prompt.
    rows = sorted(train.to_list(), key=lambda r: r["prompt"])
    assert [r["prompt"] for r in rows] == [
        prompt_text(tok, "Q1"),
        prompt_text(tok, "Q3"),
    ]
    assert rows[0]["judge_prob"] == 1.0 and math.isnan(rows[0]["margin"])
    assert (rows[1]["judge_prob"], rows[1]["margin"], rows[1]["iteration"]) == (
        0.6,
        0.4,
        1,
    )


def test_trl_tokenization_keeps_judge_columns_and_adds_no_second_eos(loaded_pairs):
    from trl import DPOConfig, DPOTrainer

    train, tok = loaded_pairs
    args = DPOConfig(
        output_dir="unused", max_length=128, report_to=[], bf16=False, use_cpu=True
    )
    fake = types.SimpleNamespace(_tokenizer=tok)
    ready = DPOTrainer._prepare_dataset(fake, train, tok, args, "train")
    for name in ("judge_prob", "margin", "iteration", "prompt_ids", "chosen_ids"):
        assert name in ready.column_names
    row = next(r for r in ready if r["iteration"] == 1)
    assert row["judge_prob"] == 0.6 and row["iteration"] == 1
    eos = tok.eos_token_id
    assert row["chosen_ids"][-1] == eos and row["chosen_ids"][-2] != eos
    assert tok.decode(row["chosen_ids"]) == "good<|im_end|>"
