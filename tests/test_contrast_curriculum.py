"""Curriculum order for contrast SFT: the measures, the margin cache, Axolotl's side."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from datasets import Dataset

from axolotl_prefalign.contrast import ContrastFormat, build_inference_prompt
from axolotl_prefalign.contrast import curriculum as cur
from axolotl_prefalign.core.config import ContrastConfig, PrefAlignConfigError

# Answers of clearly different lengths, so the length order has no ties but one.
ROWS = [
    {
        "prompt": "What is the capital of France?",
        "chosen": "Paris",
        "rejected": "Berlin",
    },
    {
        "prompt": "Count to three.",
        "chosen": "1 2 3",
        "rejected": "1 2 3 4 5 6 7 8 9 10 42",
    },
    {"prompt": "Is the fox quick?", "chosen": "yes", "rejected": "no"},
    {
        "prompt": "Say something.",
        "chosen": "The quick brown fox jumps over the lazy dog.",
        "rejected": "hello world",
    },
    {"prompt": "Which letter?", "chosen": "The answer is C.", "rejected": "B"},
    {"prompt": "True?", "chosen": "true", "rejected": "The answer is false."},
]


def fmt_for(tok, **contrast) -> ContrastFormat:
    return ContrastFormat(tok, ContrastConfig(**contrast), sequence_len=256)


def reference_margins(model, tok, rows) -> list[float]:
    """Plain: the inference prompt + " answer" + EOS through model(...).logits."""
    out = []
    for row in rows:
        prompt = build_inference_prompt(row["prompt"], tokenizer=tok)
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        total = []
        for answer in (row["chosen"], row["rejected"]):
            tail = tok(" " + answer, add_special_tokens=False)["input_ids"]
            tail = tail + [tok.eos_token_id]
            ids = torch.tensor([head + tail])
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            picked = logp[torch.arange(len(head) - 1, ids.shape[1] - 1), tail]
            total.append(float(picked.sum()))
        out.append(total[0] - total[1])
    return out


class Interrupted(Exception):
    """A crash in the middle of scoring."""


class Loader:
    """load_model for `margins`: counts loads and forward calls, may fail."""

    def __init__(self, model, fail_after: int | None = None):
        self.model, self.loads, self.calls, self.fail_after = model, 0, 0, fail_after
        self.hook = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            self.hook.remove()  # the model scores on after the restart
            raise Interrupted("stopped by the test")

    def __call__(self):
        self.loads += 1
        return self.model


def never_loaded():
    raise AssertionError("the model was loaded although the cache holds every margin")


def score(fmt, rows, load_model, cache, model_key="m", settings=None, batch_size=2):
    encoded = cur.encode_pairs(fmt, rows, range(len(rows)))
    return cur.margins(
        encoded,
        load_model=load_model,
        pad_id=fmt.tokenizer.pad_token_id,
        cache_dir=cache,
        model_key=model_key,
        settings=settings,
        batch_size=batch_size,
    )


def test_margins_equal_a_plain_logits_reference_and_order_large_first(
    tiny_model, tiny_tokenizer, tmp_path
):
    fmt = fmt_for(tiny_tokenizer, curriculum="margin")
    got = score(fmt, ROWS, Loader(tiny_model), tmp_path)
    want = reference_margins(tiny_model, tiny_tokenizer, ROWS)
    assert got == pytest.approx(want, abs=1e-4)
    order = cur.order_rows(
        fmt, ROWS, range(len(ROWS)), load_model=never_loaded, model_key="m",
        cache_dir=tmp_path,
    )  # fmt: skip
    assert order == sorted(range(len(ROWS)), key=lambda i: -want[i])
    assert [want[i] for i in order] == sorted(want, reverse=True)


def test_length_order_counts_both_answers_shortest_first(tiny_tokenizer):
    fmt = fmt_for(tiny_tokenizer, curriculum="length")
    lengths = [
        sum(
            len(tiny_tokenizer(" " + r[k], add_special_tokens=False)["input_ids"])
            for k in ("chosen", "rejected")
        )
        for r in ROWS
    ]
    encoded = cur.encode_pairs(fmt, ROWS, range(len(ROWS)))
    assert cur.answer_lengths(encoded) == lengths
    order = cur.order_rows(fmt, ROWS, range(len(ROWS)))
    assert [lengths[i] for i in order] == sorted(lengths)
    hard = fmt_for(tiny_tokenizer, curriculum="length", curriculum_order="hard_first")
    assert [lengths[i] for i in cur.order_rows(hard, ROWS, range(len(ROWS)))] == sorted(
        lengths, reverse=True
    )


def test_ties_keep_file_order_in_both_directions():
    scores = [1.0, 3.0, 1.0, 2.0]
    assert cur.curriculum_positions(scores, measure="margin") == [1, 3, 0, 2]
    assert cur.curriculum_positions(scores, measure="margin", order="hard_first") == [
        0,
        2,
        3,
        1,
    ]
    assert cur.curriculum_positions(scores, measure="length") == [0, 2, 3, 1]


def test_second_scoring_reads_the_cache_without_loading_the_model(
    tiny_model, tiny_tokenizer, tmp_path
):
    fmt = fmt_for(tiny_tokenizer, curriculum="margin")
    loader = Loader(tiny_model)
    first = score(fmt, ROWS, loader, tmp_path)
    assert (loader.loads, loader.calls) == (1, 3)  # 6 pairs, 2 per forward
    assert score(fmt, ROWS, never_loaded, tmp_path) == first


@pytest.mark.parametrize("change", ["data", "format", "model", "settings"])
def test_the_cache_is_not_reused_when_model_data_or_settings_change(
    tiny_model, tiny_tokenizer, tmp_path, change
):
    fmt = fmt_for(tiny_tokenizer, curriculum="margin")
    score(fmt, ROWS, Loader(tiny_model), tmp_path)
    rows, key, settings = ROWS, "m", None
    if change == "data":
        rows = [{**ROWS[0], "chosen": "Lyon"}, *ROWS[1:]]
    elif change == "format":
        fmt = fmt_for(tiny_tokenizer, curriculum="margin", preset="zh")
    elif change == "model":
        key = "another model"
    else:
        settings = {"dtype": "bfloat16"}
    loader = Loader(tiny_model)
    score(fmt, rows, loader, tmp_path, model_key=key, settings=settings)
    assert loader.loads == 1 and loader.calls == 3


def test_an_interrupted_scoring_resumes_with_the_unscored_pairs(
    tiny_model, tiny_tokenizer, tmp_path
):
    fmt = fmt_for(tiny_tokenizer, curriculum="margin")
    with pytest.raises(Interrupted):
        score(fmt, ROWS, Loader(tiny_model, fail_after=2), tmp_path)
    (folder,) = tmp_path.iterdir()
    assert not (folder / "shard-00002.jsonl").exists()
    loader = Loader(tiny_model)
    got = score(fmt, ROWS, loader, tmp_path)
    assert loader.calls == 1  # only the third batch of two pairs
    assert got == pytest.approx(
        reference_margins(tiny_model, tiny_tokenizer, ROWS), abs=1e-4
    )


def test_model_files_key_changes_when_the_weights_are_rewritten(tmp_path):
    from conftest import build_tiny_llama

    build_tiny_llama(tmp_path, vocab_size=64, seed=0)
    before = cur.model_files_key(tmp_path)
    assert cur.model_files_key(tmp_path) == before
    build_tiny_llama(tmp_path, vocab_size=64, seed=1)
    assert cur.model_files_key(tmp_path) != before
    assert cur.model_files_key("org/model", "v2") == "org/model@v2"


# ---------------------------------------------------------------------------
# Axolotl: the check at register, and a dataset built by Axolotl


def _cfg(model_dir, tmp_path, **extra) -> dict:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = {
        "base_model": str(model_dir),
        "plugins": ["axolotl_prefalign.PrefAlignPlugin"],
        "datasets": [
            {
                "path": str(data),
                "ds_type": "json",
                "split": "train",
                "type": "axolotl_prefalign.contrast",
            }
        ],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "prefalign": {"contrast": {"curriculum": "margin"}},
        "curriculum_sampling": True,
        "sequence_len": 256,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "num_epochs": 1,
        "bf16": False,
        "fp16": False,
        "val_set_size": 0,
    }
    cfg.update(extra)
    return cfg


def _register(cfg: dict) -> None:
    from axolotl_prefalign.integrations.axolotl.plugin import PrefAlignPlugin

    PrefAlignPlugin().register(cfg)


@pytest.mark.parametrize(
    "extra, wanted",
    [
        ({"curriculum_sampling": None}, "set curriculum_sampling: true"),
        (
            {"datasets": "two"},
            "set shuffle_merged_datasets: false (the 2 datasets are merged and "
            "shuffled; Axolotl's default is true)",
        ),
        (
            {
                "datasets": "two",
                "shuffle_merged_datasets": False,
                "shuffle_before_merging_datasets": True,
            },
            "set shuffle_before_merging_datasets: false",
        ),  # fmt: skip
        ({"sample_packing": True}, "set sample_packing_sequentially: true"),
    ],
)
def test_register_stops_when_axolotl_would_shuffle_the_curriculum_away(
    tiny_model_dir, tmp_path, extra, wanted
):
    cfg = _cfg(tiny_model_dir, tmp_path)
    if extra.pop("datasets", None) == "two":
        cfg["datasets"] = cfg["datasets"] * 2
    cfg.update(extra)
    with pytest.raises(PrefAlignConfigError) as err:
        _register(cfg)
    message = str(err.value)
    assert message.startswith(
        "prefalign.contrast.curriculum: margin puts the rows in order, but this "
        "config would shuffle them; "
    )
    assert wanted in message and "\n" not in message


def test_register_accepts_an_order_keeping_config_and_needs_a_contrast_dataset(
    tiny_model_dir, tmp_path
):
    ok = _cfg(
        tiny_model_dir,
        tmp_path,
        sample_packing=True,
        sample_packing_sequentially=True,
    )
    ok["datasets"] = ok["datasets"] * 2
    ok["shuffle_merged_datasets"] = False
    _register(ok)
    alpaca = _cfg(tiny_model_dir, tmp_path)
    alpaca["datasets"][0]["type"] = "alpaca"
    with pytest.raises(PrefAlignConfigError, match="no entry of datasets has that"):
        _register(alpaca)


@pytest.mark.parametrize("curriculum", ["margin", "length"])
def test_axolotl_builds_the_contrast_dataset_in_curriculum_order(
    tiny_model_dir, tiny_model, tiny_tokenizer, tmp_path, curriculum
):
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets

    cfg = _cfg(tiny_model_dir, tmp_path)
    cfg["prefalign"]["contrast"]["curriculum"] = curriculum
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    train = load_datasets(cfg=load_cfg(str(path))).train_dataset
    fmt = fmt_for(tiny_tokenizer)
    expected_rows = [fmt.tokenize_row(r, i)["input_ids"] for i, r in enumerate(ROWS)]
    if curriculum == "margin":
        margins = reference_margins(tiny_model, tiny_tokenizer, ROWS)
        order = sorted(range(len(ROWS)), key=lambda i: -margins[i])
    else:
        lengths = cur.answer_lengths(cur.encode_pairs(fmt, ROWS, range(len(ROWS))))
        order = sorted(range(len(ROWS)), key=lambda i: lengths[i])
    assert order != sorted(order)  # not the file order
    assert train["input_ids"] == [expected_rows[i] for i in order]
    assert isinstance(train, Dataset)
