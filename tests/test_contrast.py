"""Plaintext contrast SFT: rendering, the loss mask token by token, truncation, bad
rows, the inference prompt, collation, the unlikelihood term and the preview."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import REPO

from axolotl_prefalign.contrast import (
    ContrastFormat,
    build_inference_prompt,
    is_positive_only,
    load,
    render_marked,
)
from axolotl_prefalign.core.config import ContrastConfig, PrefAlignConfig
from axolotl_prefalign.core.rows import BadRowError
from axolotl_prefalign.integrations.axolotl.contrast import collator_for

IGNORE = -100
EXAMPLE = REPO / "axolotl_prefalign" / "data" / "contrast_example.jsonl"
ROWS = {
    "en": {
        "prompt": "What is the capital of France?",
        "chosen": "Paris is the capital of France.",
        "rejected": "The capital of France is Berlin.",
    },
    "zh": {
        "prompt": "法国的首都是哪里？",
        "chosen": "巴黎是法国的首都。",
        "rejected": "柏林。",
    },
}
MARKER = {"en": "Positive answer:", "zh": "积极回答："}
NEG_MARKER = {"en": "Negative answer:", "zh": "消极回答："}
# What the preset puts between a marker and its text; in raw mode it belongs to
# the text (the answer's first token is ` Paris`, not a lone ` ` then `Paris`).
SEP = {"en": " ", "zh": ""}


@pytest.fixture(params=["tiny_tokenizer", "smollm2_tokenizer"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def fmt_for(tok, **contrast) -> ContrastFormat:
    seq = contrast.pop("sequence_len", 2048)
    policy = contrast.pop("on_bad_row", "error")
    source = contrast.pop("source", "pairs.jsonl")
    return ContrastFormat(
        tok,
        ContrastConfig(**contrast),
        sequence_len=seq,
        source=source,
        on_bad_row=policy,
    )


def loss_span(feats) -> tuple[int, int]:
    """[a, b) of the labelled tokens; asserts they are one run equal to input_ids."""
    pos = [j for j, label in enumerate(feats["labels"]) if label != IGNORE]
    assert pos, "no token carries loss"
    assert pos == list(range(pos[0], pos[-1] + 1)), "loss span is not contiguous"
    for j in pos:
        assert feats["labels"][j] == feats["input_ids"][j]
    assert len(feats["labels"]) == len(feats["input_ids"])
    assert feats["attention_mask"] == [1] * len(feats["input_ids"])
    return pos[0], pos[-1] + 1


def decode(tok, ids) -> str:
    return tok.decode(
        ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def im_end(tok) -> int:
    return tok.convert_tokens_to_ids("<|im_end|>")


ZH_FIELDS = {"prompt": "prompt_zh", "chosen": "chosen_zh", "rejected": "rejected_zh"}


def example_rows() -> list[dict]:
    return [json.loads(line) for line in EXAMPLE.read_text().splitlines()]


# ---------------------------------------------------------------------------
# The loss mask, token by token


@pytest.mark.parametrize("mode", ["raw", "chat"])
@pytest.mark.parametrize("order", ["negative_first", "positive_first"])
@pytest.mark.parametrize("preset", ["en", "zh"])
def test_only_positive_answer_and_end_token_carry_loss(tokenizer, preset, order, mode):
    row = ROWS[preset]
    fmt = fmt_for(tokenizer, preset=preset, order=order, mode=mode)
    feats = fmt.tokenize_row(row, 0)
    ids = feats["input_ids"]
    a, b = loss_span(feats)
    # Labelled tokens: exactly the positive answer (with the separator space that
    # precedes it in raw mode), then the end token.
    sep = SEP[preset] if mode == "raw" else ""
    assert decode(tokenizer, ids[a : b - 1]) == sep + row["chosen"]
    end = tokenizer.eos_token_id if mode == "raw" else im_end(tokenizer)
    assert ids[b - 1] == end
    before, after = decode(tokenizer, ids[:a]), decode(tokenizer, ids[b:])
    if mode == "raw":
        assert before.endswith(MARKER[preset])
    else:
        assert before.endswith(MARKER[preset] + "<|im_end|>\n<|im_start|>assistant\n")
    negative = NEG_MARKER[preset] + SEP[preset] + row["rejected"]
    if order == "negative_first":
        assert negative in before and row["rejected"] not in after
    else:
        assert negative in after and NEG_MARKER[preset] not in before
    assert row["prompt"] in before


def test_answer_starts_with_the_tokenizers_own_space_prefixed_token(
    smollm2_tokenizer,
):
    tok = smollm2_tokenizer
    row = {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Berlin"}
    whole = tok("Positive answer: Paris", add_special_tokens=False)["input_ids"]
    # SmolLM2 merges the separator space into the answer's first token.
    assert [decode(tok, [i]) for i in whole[-2:]] == [":", " Paris"]
    feats = fmt_for(tok, unlikelihood_weight=0.5).tokenize_row(row, 0)
    ids = feats["input_ids"]
    a, b = loss_span(feats)
    assert ids[a:b] == [whole[-1], tok.eos_token_id]
    assert decode(tok, ids[a : a + 1]) == " Paris"
    assert ids[:a] == tok(decode(tok, ids[:a]), add_special_tokens=False)["input_ids"]
    assert decode(tok, ids[:a]).endswith("\nPositive answer:")
    neg = [j for j, t in enumerate(feats["negative_labels"]) if t != IGNORE]
    assert [decode(tok, [ids[j]]) for j in neg] == [" Berlin"]


@pytest.mark.parametrize(
    "contrast",
    [
        {},
        {"order": "positive_first"},
        {"mode": "chat"},
        {"mode": "chat", "order": "positive_first"},
        {"preset": "zh", "fields": ZH_FIELDS},
        {"preset": "zh", "fields": ZH_FIELDS, "mode": "chat"},
    ],
)
def test_by_part_tokenization_equals_tokenizing_the_whole_text(tokenizer, contrast):
    # Parts meet where a byte-level BPE's pre-tokenizer splits anyway (before the
    # separator space, before a newline, at a special token), so for ordinary rows
    # the parts give exactly the tokenizer's own tokenization of the row's text.
    fmt = fmt_for(tokenizer, positive_only_ratio=0.5, **contrast)
    for index, row in enumerate(example_rows()):
        ids = fmt.tokenize_row(row, index)["input_ids"]
        text = decode(tokenizer, ids)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, index


def test_by_part_tokenization_differs_only_where_punctuation_is_glued(
    smollm2_tokenizer,
):
    # Without a separator, a marker ending in ASCII punctuation and an answer
    # starting with it form one pre-token that BPE may merge (`:"`); the parts keep
    # the marker's own `:` so the prompt is the same token sequence at inference.
    tok = smollm2_tokenizer
    fmt = fmt_for(tok, instruction="", template={"positive": "A:{positive}"})
    row = {"prompt": "Q?", "chosen": '"Paris"', "rejected": "Berlin"}
    ids = fmt.tokenize_row(row, 0)["input_ids"]
    text = decode(tok, ids)
    assert text == 'Question: Q?\nNegative answer: Berlin\nA:"Paris"<|im_end|>'
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert [decode(tok, [i]) for i in whole[-4:]] == [':"', "Paris", '"', "<|im_end|>"]
    a, b = loss_span(fmt.tokenize_row(row, 0))
    assert [decode(tok, [i]) for i in ids[a - 1 : b]] == [
        ":",
        '"',
        "Paris",
        '"',
        "<|im_end|>",
    ]
    assert ids != whole
    # The zh preset's full-width colon does not merge with full-width punctuation.
    zh = fmt_for(tok, preset="zh", instruction="")
    for answer in ("（甲）巴黎", "“巴黎”"):
        row = {"prompt": "首都？", "chosen": answer, "rejected": "柏林"}
        ids = zh.tokenize_row(row, 0)["input_ids"]
        assert tok(decode(tok, ids), add_special_tokens=False)["input_ids"] == ids


def test_chat_mode_ends_on_the_templates_end_of_turn_token_not_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, eos_token="<|endoftext|>")
    row = ROWS["en"]
    raw = fmt_for(tok).tokenize_row(row, 0)
    chat = fmt_for(tok, mode="chat").tokenize_row(row, 0)
    assert raw["input_ids"][loss_span(raw)[1] - 1] == tok.eos_token_id
    b = loss_span(chat)[1]
    assert chat["input_ids"][b - 1] == im_end(tok) != tok.eos_token_id
    # The newline the template writes after <|im_end|> carries no loss.
    assert decode(tok, chat["input_ids"][b:]) == "\n"


def test_positive_first_puts_eos_right_after_the_answer(tokenizer):
    row = ROWS["en"]
    feats = fmt_for(tokenizer, order="positive_first").tokenize_row(row, 0)
    a, b = loss_span(feats)
    assert (
        decode(tokenizer, feats["input_ids"][b:])
        == "\nNegative answer: " + row["rejected"]
    )


def test_negative_labels_column_only_when_unlikelihood_weight_is_positive(tokenizer):
    row = ROWS["en"]
    plain = fmt_for(tokenizer).tokenize_row(row, 0)
    assert set(plain) == {"input_ids", "attention_mask", "labels"}
    feats = fmt_for(tokenizer, unlikelihood_weight=0.3).tokenize_row(row, 0)
    assert feats["input_ids"] == plain["input_ids"]
    assert feats["labels"] == plain["labels"]
    neg = [j for j, t in enumerate(feats["negative_labels"]) if t != IGNORE]
    assert neg == list(range(neg[0], neg[-1] + 1))
    negative = decode(tokenizer, [feats["input_ids"][j] for j in neg])
    assert negative == " " + row["rejected"]
    assert all(feats["labels"][j] == IGNORE for j in neg)
    only = fmt_for(tokenizer, unlikelihood_weight=0.3, positive_only_ratio=1.0)
    assert set(only.tokenize_row(row, 0)["negative_labels"]) == {IGNORE}


# ---------------------------------------------------------------------------
# Positive-only rows and the inference prompt


def test_positive_only_choice_is_deterministic_by_seed_and_index():
    picks = [is_positive_only(i, 0.3, seed=7) for i in range(4000)]
    assert picks == [is_positive_only(i, 0.3, seed=7) for i in range(4000)]
    assert abs(sum(picks) / len(picks) - 0.3) < 0.03
    assert picks != [is_positive_only(i, 0.3, seed=8) for i in range(4000)]
    assert not any(is_positive_only(i, 0.0, 1) for i in range(100))
    assert all(is_positive_only(i, 1.0, 1) for i in range(100))


@pytest.mark.parametrize("mode", ["raw", "chat"])
def test_positive_only_rows_have_no_negative_slot(tokenizer, mode):
    row = ROWS["en"]
    fmt = fmt_for(tokenizer, positive_only_ratio=0.5, seed=3, mode=mode)
    for index in range(12):
        text = decode(tokenizer, fmt.tokenize_row(row, index)["input_ids"])
        has_negative = "Negative answer" in text
        assert has_negative == (not is_positive_only(index, 0.5, 3))
        assert (row["rejected"] in text) == has_negative


@pytest.mark.parametrize("mode", ["raw", "chat"])
@pytest.mark.parametrize("preset", ["en", "zh"])
def test_inference_prompt_equals_the_prefix_of_a_positive_only_row(
    tokenizer, preset, mode
):
    row = {**ROWS[preset], "instruction": "Be exact.", "system": "You are terse."}
    config = ContrastConfig(preset=preset, mode=mode, positive_only_ratio=1.0)
    feats = ContrastFormat(tokenizer, config).tokenize_row(row, 5)
    a, _ = loss_span(feats)
    prompt = build_inference_prompt(
        row["prompt"],
        tokenizer=tokenizer,
        config=config,
        instruction="Be exact.",
        system="You are terse.",
    )
    assert (
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
        == feats["input_ids"][:a]
    )
    if mode == "raw":
        # It ends on the marker: the model writes the separator space itself.
        assert prompt.endswith("\n" + MARKER[preset])
    if mode == "chat":
        user = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        messages = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": user},
        ]
        assert prompt == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_raw_mode_keeps_the_bos_a_tokenizer_adds_in_the_prompt_text(tiny_model_dir):
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bos = tok.bos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)]
    )
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id
    feats = fmt_for(tok, positive_only_ratio=1.0).tokenize_row(GOOD, 0)
    assert feats["input_ids"][0] == tok.bos_token_id
    assert feats["input_ids"][1] != tok.bos_token_id
    prompt = build_inference_prompt(GOOD["prompt"], tokenizer=tok)
    assert prompt.startswith(bos + "Instruction: ")
    a, _ = loss_span(feats)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == feats["input_ids"][:a]


def test_inference_prompt_accepts_the_config_forms_and_a_message_list():
    question = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Capital of France?"},
    ]
    expected = (
        "Be brief.\nInstruction: Answer the question accurately. A negative answer, "
        "when one is given, is an example of a wrong answer.\nUser: Hi\n"
        "Assistant: Hello\nQuestion: Capital of France?\nPositive answer:"
    )
    assert build_inference_prompt(question) == expected
    pa = PrefAlignConfig.from_raw({"contrast": {"preset": "zh", "instruction": ""}})
    zh = "问题：Capital of France?\n积极回答："
    assert build_inference_prompt("Capital of France?", config=pa) == zh
    assert build_inference_prompt("Capital of France?", config={"prefalign": pa}) == zh


# ---------------------------------------------------------------------------
# Truncation to sequence_len


def test_truncation_shortens_the_negative_answer_first(tokenizer):
    row = {
        "prompt": "What is the capital of France?",
        "chosen": "Paris.",
        "rejected": "Berlin is the capital of France and has been for centuries.",
    }
    full = fmt_for(tokenizer, unlikelihood_weight=1.0).tokenize_row(row, 0)
    n_neg = sum(t != IGNORE for t in full["negative_labels"])
    limit = len(full["input_ids"]) - 3
    fmt = fmt_for(tokenizer, unlikelihood_weight=1.0, sequence_len=limit)
    encoded = fmt.encode_row(row, 0)
    feats = fmt.features(encoded)
    assert len(feats["input_ids"]) == limit
    assert encoded.truncation == ("negative_shortened",)
    assert sum(t != IGNORE for t in feats["negative_labels"]) == n_neg - 3
    a, b = loss_span(feats)
    assert decode(tokenizer, feats["input_ids"][a : b - 1]) == " " + row["chosen"]
    text = decode(tokenizer, feats["input_ids"])
    assert row["prompt"] in text and "Negative answer: Berlin" in text


def test_truncation_then_drops_the_negative_and_keeps_the_questions_end(tokenizer):
    row = {
        "prompt": "Some long preamble that can go. " * 6 + "What is the capital?",
        "chosen": "Paris.",
        "rejected": "Berlin.",
    }
    positive_only = fmt_for(tokenizer, positive_only_ratio=1.0).tokenize_row(row, 0)
    limit = len(positive_only["input_ids"]) - 4
    fmt = fmt_for(tokenizer, sequence_len=limit)
    encoded = fmt.encode_row(row, 0)
    assert encoded.truncation == ("negative_removed", "question_shortened")
    assert encoded.positive_only
    assert len(encoded.ids) == limit
    text = decode(tokenizer, encoded.ids)
    assert "Negative answer" not in text and "Berlin" not in text
    assert "What is the capital?\nPositive answer: " in text
    assert row["prompt"] not in text and "Question: Some long" not in text
    a, b = loss_span(fmt.features(encoded))
    assert decode(tokenizer, encoded.ids[a : b - 1]) == " " + row["chosen"]


def test_positive_answer_that_cannot_fit_is_an_error_naming_row_and_field(
    tiny_tokenizer,
):
    row = {"prompt": "Q?", "chosen": "Paris is the capital. " * 20, "rejected": "No."}
    fmt = fmt_for(tiny_tokenizer, sequence_len=64, source="data/pairs.jsonl")
    with pytest.raises(
        BadRowError,
        match=r"data/pairs\.jsonl, row 5, field 'chosen': the positive answer "
        r"\(\d+ tokens with its end token\) does not fit in sequence_len=64",
    ):
        fmt.encode_row(row, 4)


# ---------------------------------------------------------------------------
# Bad rows through the Axolotl dataset hook


GOOD = {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Berlin"}


@pytest.mark.parametrize(
    "bad, field, problem",
    [
        ({"chosen": None}, "chosen", "missing"),
        ({"rejected": "   "}, "rejected", "empty"),
        ({"rejected": "Paris"}, "rejected", "identical to the chosen answer"),
        ({"prompt": None}, "prompt", "missing \\(and no 'messages' message list\\)"),
    ],
)
def test_bad_row_is_an_error_naming_dataset_row_and_field(
    tiny_tokenizer, bad, field, problem
):
    from datasets import Dataset

    ds = Dataset.from_list([GOOD, {**GOOD, **bad}, GOOD])
    fmt = fmt_for(tiny_tokenizer, source="data/pairs.jsonl")
    with pytest.raises(
        BadRowError, match=rf"data/pairs\.jsonl, row 2, field '{field}': {problem}"
    ):
        fmt.wrap_dataset(ds)


@pytest.mark.parametrize("columns", [{}, {"prompt": [], "chosen": [], "rejected": []}])
def test_empty_dataset_is_an_error_naming_the_source(tiny_tokenizer, columns):
    from datasets import Dataset

    fmt = fmt_for(tiny_tokenizer, source="data/pairs.jsonl")
    with pytest.raises(ValueError, match=r"^data/pairs\.jsonl has no rows"):
        fmt.wrap_dataset(Dataset.from_dict(columns))


def test_non_text_answer_is_a_bad_row(tiny_tokenizer):
    with pytest.raises(
        BadRowError, match="row 3, field 'chosen': must be text, got int"
    ):
        fmt_for(tiny_tokenizer).encode_row({**GOOD, "chosen": 42}, 2)


def test_skip_policy_drops_and_counts_bad_rows(tiny_tokenizer, caplog):
    from datasets import Dataset

    rows = [
        GOOD,
        {**GOOD, "rejected": "Paris"},
        GOOD,
        {**GOOD, "chosen": ""},
        {**GOOD, "chosen": "Paris is the capital. " * 30},  # cannot fit
    ]
    fmt = fmt_for(tiny_tokenizer, on_bad_row="skip", sequence_len=128)
    with caplog.at_level(logging.INFO, logger="axolotl_prefalign"):
        out = fmt.wrap_dataset(Dataset.from_list(rows))
    assert len(out) == 2
    assert set(out.column_names) == {"input_ids", "attention_mask", "labels"}
    assert out[0]["input_ids"] == fmt.tokenize_row(GOOD, 0)["input_ids"]
    assert "skipped 3 bad row(s)" in caplog.text
    assert "identical to the chosen answer" in caplog.text
    assert "does not fit in sequence_len=128" in caplog.text
    assert "rows shortened" not in caplog.text


def test_wrap_dataset_keeps_row_indices_for_positive_only_choice(tiny_tokenizer):
    from datasets import Dataset

    fmt = fmt_for(tiny_tokenizer, positive_only_ratio=0.5, unlikelihood_weight=1.0)
    out = fmt.wrap_dataset(Dataset.from_list([GOOD] * 16))
    for index, feats in enumerate(out):
        assert feats == fmt.tokenize_row(GOOD, index)
    assert "negative_labels" in out.column_names


# ---------------------------------------------------------------------------
# Row shapes: chat messages, field map, optional fields, templates


def test_messages_rows_use_last_user_turn_as_question(tiny_tokenizer):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Capital of France?"},
        ],
        "chosen": [{"role": "assistant", "content": "Paris"}],
        "rejected": [{"role": "assistant", "content": "Berlin"}],
    }
    raw = fmt_for(tiny_tokenizer).tokenize_row(row, 0)
    text = decode(tiny_tokenizer, raw["input_ids"])
    assert text.startswith("Be brief.\nInstruction: ")
    assert "\nUser: Hi\nAssistant: Hello\nQuestion: Capital of France?\n" in text
    chat = fmt_for(tiny_tokenizer, mode="chat").tokenize_row(row, 0)
    text = decode(tiny_tokenizer, chat["input_ids"])
    assert text.startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nInstruction: "
    )
    a, b = loss_span(chat)
    assert decode(tiny_tokenizer, chat["input_ids"][a:b]) == "Paris<|im_end|>"


def test_messages_ending_with_an_assistant_turn_is_a_bad_row(tiny_tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A"},
        ],
        "chosen": "x",
        "rejected": "y",
    }
    with pytest.raises(
        BadRowError, match="row 1, field 'messages': must end with the user message"
    ):
        fmt_for(tiny_tokenizer).encode_row(row, 0)


def test_field_map_and_per_row_instruction_and_system(tiny_tokenizer):
    fields = {"prompt": "q", "chosen": "good", "rejected": "bad", "instruction": "ins"}
    fmt = fmt_for(tiny_tokenizer, fields=fields)
    row = {"q": "2+2?", "good": "4", "bad": "5", "ins": "Add.", "system": "Math."}
    text = decode(tiny_tokenizer, fmt.tokenize_row(row, 0)["input_ids"])
    assert text == (
        "Math.\nInstruction: Add.\nQuestion: 2+2?\nNegative answer: 5\n"
        "Positive answer: 4<|im_end|>"
    )
    with pytest.raises(BadRowError, match="field 'q': missing"):
        fmt.encode_row({"prompt": "2+2?", "good": "4", "bad": "5"}, 0)


def test_custom_template_and_empty_instruction(tiny_tokenizer):
    fmt = fmt_for(
        tiny_tokenizer,
        instruction="",
        template={"question": "Q: {question}", "positive": "Good => {positive}"},
    )
    feats = fmt.tokenize_row(GOOD, 0)
    assert decode(tiny_tokenizer, feats["input_ids"]) == (
        "Q: Capital of France?\nNegative answer: Berlin\nGood => Paris<|im_end|>"
    )
    a, b = loss_span(feats)
    assert decode(tiny_tokenizer, feats["input_ids"][a:b]) == " Paris<|im_end|>"
    assert decode(tiny_tokenizer, feats["input_ids"][:a]).endswith("Good =>")
    # Spaces and tabs after a marker go with the answer, a newline stays with it.
    fmt = fmt_for(
        tiny_tokenizer,
        instruction="",
        template={"negative": "Bad:\t{negative}", "positive": "Good:\n {positive}"},
    )
    feats = fmt.tokenize_row(GOOD, 0)
    ids = feats["input_ids"]
    assert decode(tiny_tokenizer, ids) == (
        "Question: Capital of France?\nBad:\tBerlin\nGood:\n Paris<|im_end|>"
    )
    a, b = loss_span(feats)
    assert decode(tiny_tokenizer, ids[a:b]) == " Paris<|im_end|>"
    prompt = build_inference_prompt(
        GOOD["prompt"],
        config=ContrastConfig(
            instruction="", template={"positive": "Good:\n {positive}"}
        ),
    )
    assert prompt == "Question: Capital of France?\nGood:\n"
    only = fmt_for(
        tiny_tokenizer,
        instruction="",
        unlikelihood_weight=1.0,
        template={"negative": "Bad:\t{negative}"},
    ).tokenize_row(GOOD, 0)
    neg = [j for j, t in enumerate(only["negative_labels"]) if t != IGNORE]
    assert decode(tiny_tokenizer, [only["input_ids"][j] for j in neg]) == "\tBerlin"


def test_template_validation_names_the_bad_part():
    from axolotl_prefalign.core.config import PrefAlignConfigError

    with pytest.raises(PrefAlignConfigError, match="template.question must contain"):
        PrefAlignConfig.from_raw({"contrast": {"template": {"question": "Q:"}}})
    with pytest.raises(PrefAlignConfigError, match="must end with \\{positive\\}"):
        PrefAlignConfig.from_raw(
            {"contrast": {"template": {"positive": "A: {positive}."}}}
        )


def test_bundled_example_rows_are_all_valid(smollm2_tokenizer):
    rows = example_rows()
    assert len(rows) == 40
    for fmt in (
        fmt_for(smollm2_tokenizer),
        fmt_for(smollm2_tokenizer, preset="zh", mode="chat", fields=ZH_FIELDS),
    ):
        for index, row in enumerate(rows):
            loss_span(fmt.tokenize_row(row, index))


# ---------------------------------------------------------------------------
# Axolotl glue: load, collator


def test_axolotl_resolves_the_type_to_a_dataset_wrapping_strategy(tiny_tokenizer):
    from axolotl.prompt_strategies import load as load_strategy
    from axolotl.prompt_tokenizers import DatasetWrappingStrategy
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(
        sequence_len=300,
        prefalign={"on_bad_row": "skip", "contrast": {"preset": "zh"}},
    )
    ds_cfg = DictDefault(path="data/pairs.jsonl", type="axolotl_prefalign.contrast")
    strategy = load_strategy("axolotl_prefalign.contrast", tiny_tokenizer, cfg, ds_cfg)
    assert isinstance(strategy, ContrastFormat)
    assert isinstance(strategy, DatasetWrappingStrategy)
    assert (strategy.sequence_len, strategy.source) == (300, "data/pairs.jsonl")
    assert (strategy.on_bad_row, strategy.config.preset) == ("skip", "zh")
    assert load(tiny_tokenizer, cfg).source == "contrast dataset"


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_negative_labels_like_labels(tiny_tokenizer, side):
    from axolotl_prefalign.integrations.axolotl.trainers.contrast_sft import (
        ContrastDataCollator,
    )

    fmt = fmt_for(tiny_tokenizer, unlikelihood_weight=1.0)
    rows = [
        fmt.tokenize_row(GOOD, 0),
        fmt.tokenize_row({**GOOD, "prompt": "A much longer question?" * 3}, 1),
    ]
    tiny_tokenizer.padding_side = side
    try:
        batch = ContrastDataCollator(tiny_tokenizer, pad_to_multiple_of=16)(
            [dict(r) for r in rows]
        )
    finally:
        tiny_tokenizer.padding_side = "right"
    assert batch["negative_labels"].shape == batch["labels"].shape
    assert batch["labels"].shape[1] % 16 == 0
    for j, row in enumerate(rows):
        n = len(row["input_ids"])
        keep = slice(0, n) if side == "right" else slice(-n, None)
        pad = slice(n, None) if side == "right" else slice(0, -n)
        assert batch["negative_labels"][j, keep].tolist() == row["negative_labels"]
        assert set(batch["negative_labels"][j, pad].tolist()) <= {IGNORE}
        assert batch["labels"][j, keep].tolist() == row["labels"]


def test_packing_collator_concatenates_negative_labels(tiny_tokenizer):
    from axolotl_prefalign.integrations.axolotl.trainers.contrast_sft import (
        ContrastV2BatchSamplerCollator,
    )

    fmt = fmt_for(tiny_tokenizer, unlikelihood_weight=1.0)
    rows = [fmt.tokenize_row(GOOD, 0), fmt.tokenize_row(GOOD, 1)]
    for r in rows:
        r["position_ids"] = list(range(len(r["input_ids"])))
    batch = ContrastV2BatchSamplerCollator(tiny_tokenizer, pad_to_multiple_of=8)(
        [[dict(r) for r in rows]]
    )
    n = sum(len(r["input_ids"]) for r in rows)
    expected = rows[0]["negative_labels"] + rows[1]["negative_labels"]
    assert batch["negative_labels"][0, :n].tolist() == expected
    assert batch["negative_labels"].shape == batch["labels"].shape


def test_collator_for_follows_sample_packing():
    from axolotl_prefalign.integrations.axolotl.trainers.contrast_sft import (
        ContrastDataCollator,
        ContrastV2BatchSamplerCollator,
    )

    assert collator_for({"sample_packing": False}) == (ContrastDataCollator, {})
    packed = {"sample_packing": True, "model_config_type": "llama"}
    assert collator_for(packed)[0] is ContrastV2BatchSamplerCollator
    assert collator_for(packed, is_eval=True)[0] is ContrastDataCollator


# ---------------------------------------------------------------------------
# The unlikelihood term and the trainer


def test_unlikelihood_loss_matches_its_formula():
    from axolotl_prefalign.integrations.axolotl.trainers.contrast_sft import (
        unlikelihood_loss,
    )

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64) * 3
    logits[1, 3, 7] = 60.0  # p ≈ 1: -log(1 - p) is large but finite
    neg = torch.full((2, 6), IGNORE)
    neg[0, 2], neg[0, 3], neg[1, 4] = 5, 9, 7
    p = logits.softmax(-1)
    expected = -torch.stack(
        [
            torch.log1p(-p[0, 1, 5]),
            torch.log1p(-p[0, 2, 9]),
            # 1 - p = Σ_{v≠y} p_v, avoiding the cancellation of 1 - p in fp64
            torch.log(torch.cat([p[1, 3, :7], p[1, 3, 8:]]).sum()),
        ]
    ).mean()
    got = unlikelihood_loss(logits.float(), neg)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    assert got > 10
    assert unlikelihood_loss(logits, torch.full((2, 6), IGNORE)) == 0


def _trainer(model, tokenizer, weight, tmp_path):
    from axolotl.core.training_args import AxolotlTrainingArguments

    from axolotl_prefalign.integrations.axolotl.trainers.contrast_sft import (
        ContrastSFTTrainer,
    )

    args = AxolotlTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[]
    )
    return ContrastSFTTrainer(
        model=model, args=args, processing_class=tokenizer, unlikelihood_weight=weight
    )


def test_trainer_loss_is_ce_plus_weighted_unlikelihood(
    tiny_model, tiny_tokenizer, tmp_path
):
    from axolotl_prefalign.integrations.axolotl.trainers.contrast_sft import (
        ContrastDataCollator,
    )

    fmt = fmt_for(tiny_tokenizer, unlikelihood_weight=1.0)
    rows = [
        fmt.tokenize_row(GOOD, 0),
        fmt.tokenize_row(
            {"prompt": "1 2 3?", "chosen": "yes it is", "rejected": "no"}, 1
        ),
    ]
    batch = ContrastDataCollator(tiny_tokenizer, pad_to_multiple_of=8)(rows)
    tiny_model.eval()
    with torch.no_grad():
        out = tiny_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        logits = out.logits[:, :-1].double()
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE
        )
        targets = batch["negative_labels"][:, 1:]
        mask = targets != IGNORE
        p = logits.softmax(-1)[mask].gather(-1, targets[mask][:, None]).squeeze(-1)
        ul = -torch.log1p(-p).mean()
    torch.testing.assert_close(out.loss.double(), ce, rtol=1e-5, atol=1e-5)
    n_neg = sum(len(tiny_tokenizer(t)["input_ids"]) for t in ("Berlin", "no"))
    assert mask.sum() == n_neg > 0

    losses = {}
    for weight in (0.0, 0.7):
        trainer = _trainer(tiny_model, tiny_tokenizer, weight, tmp_path)
        with torch.no_grad():
            losses[weight] = trainer.compute_loss(tiny_model, dict(batch)).double()
    torch.testing.assert_close(losses[0.0], ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[0.7], ce + 0.7 * ul, rtol=1e-5, atol=1e-5)
    assert losses[0.7] > losses[0.0]
    stored = trainer._stored_metrics["eval"]["unlikelihood"]["values"]
    assert stored == pytest.approx([ul.item()], rel=1e-4)


def test_trainer_scales_the_term_when_ce_is_normalised_over_accumulation(
    tiny_model, tiny_tokenizer, tmp_path
):
    from axolotl_prefalign.integrations.axolotl.trainers.contrast_sft import (
        ContrastDataCollator,
        unlikelihood_loss,
    )

    fmt = fmt_for(tiny_tokenizer, unlikelihood_weight=1.0)
    batch = ContrastDataCollator(tiny_tokenizer)([fmt.tokenize_row(GOOD, 0)])
    n_items = int((batch["labels"][:, 1:] != IGNORE).sum())
    trainer = _trainer(tiny_model, tiny_tokenizer, 0.5, tmp_path)
    # As in training_step with a model whose loss takes num_items_in_batch: the
    # trainer does not divide by the accumulation steps, so the term must.
    trainer.model_accepts_loss_kwargs = True
    trainer.current_gradient_accumulation_steps = 4
    tiny_model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        out = tiny_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        ul = unlikelihood_loss(out.logits, batch["negative_labels"])
        loss = trainer.compute_loss(tiny_model, dict(batch), num_items_in_batch=n_items)
    torch.testing.assert_close(loss, out.loss + 0.5 * ul / 4, rtol=1e-5, atol=1e-6)


def test_trainer_keeps_the_negative_labels_column(tiny_model, tiny_tokenizer, tmp_path):
    from datasets import Dataset

    trainer = _trainer(tiny_model, tiny_tokenizer, 0.5, tmp_path)
    fmt = fmt_for(tiny_tokenizer, unlikelihood_weight=0.5)
    ds = fmt.wrap_dataset(Dataset.from_list([GOOD, GOOD]))
    kept = trainer._remove_unused_columns(ds.add_column("junk", [0, 1]))
    assert set(kept.column_names) == {
        "input_ids",
        "attention_mask",
        "labels",
        "negative_labels",
    }


# ---------------------------------------------------------------------------
# Preview


def test_preview_marks_the_loss_span(
    tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch
):
    import yaml

    from axolotl_prefalign.cli import load_config
    from axolotl_prefalign.integrations.axolotl.contrast import preview_config
    from axolotl_prefalign.integrations.axolotl.dataset_check import deferred

    data = tmp_path / "pairs.jsonl"
    rows = [GOOD, {**GOOD, "rejected": "Paris"}, {**GOOD, "chosen": "Lyon? No: Paris"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "base_model": str(tiny_model_dir),
        "plugins": ["axolotl_prefalign.PrefAlignPlugin"],
        "prefalign": {"contrast": {"unlikelihood_weight": 0.2}},
        "datasets": [
            {
                "path": "pairs.jsonl",
                "ds_type": "json",
                "type": "axolotl_prefalign.contrast",
            }
        ],
        "sequence_len": 256,
        "micro_batch_size": 1,
        "num_epochs": 1,
        "learning_rate": 1e-4,
        "output_dir": str(tmp_path / "out"),
        "bf16": False,
        "fp16": False,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    with deferred():  # as the contrast-preview command loads it
        cfg = load_config(path)
    preview_config(cfg, num_rows=5, echo=lines.append)
    text = "\n".join(lines)
    assert "pairs.jsonl: 3 rows · preset en · mode raw" in text
    assert "Negative answer:⟨ Berlin⟩\nPositive answer:⟦ Paris<|im_end|>⟧" in text
    assert "row 2: BAD ROW: pairs.jsonl, row 2, field 'rejected': identical" in text
    assert "Positive answer:⟦ Lyon? No: Paris<|im_end|>⟧" in text
    fmt = fmt_for(tiny_tokenizer, unlikelihood_weight=0.2)
    feats = fmt.tokenize_row(GOOD, 0)
    n, (a, b) = len(feats["input_ids"]), loss_span(feats)
    n_neg = sum(t != IGNORE for t in feats["negative_labels"])
    header = (
        f"── row 1 ── {n} tokens, {b - a} with loss, {n_neg} in the negative answer"
    )
    assert header in text


def test_render_marked_colours_when_asked(tiny_tokenizer):
    fmt = fmt_for(tiny_tokenizer)
    text = render_marked(fmt, fmt.encode_row(GOOD, 0), color=True)
    assert text.endswith("Positive answer:\x1b[1;32m Paris<|im_end|>\x1b[0m")
