"""`axolotl prefalign export --to llamafactory`: rows, dataset_info.json, bad rows,
and (slow, when a LLaMA-Factory environment exists) LLaMA-Factory's own loader on the
exported files and the sample YAMLs in yaml_examples/llamafactory/."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import llamafactory_python

from axolotl_prefalign.contrast import (
    IGNORE_INDEX,
    ContrastFormat,
    build_inference_prompt,
    is_positive_only,
    parse_row,
)
from axolotl_prefalign.core.config import ContrastConfig
from axolotl_prefalign.core.rows import BadRowError, RowChecker
from axolotl_prefalign.integrations.llamafactory.export import (
    CONTRAST_NAME,
    ROBUSTFT_NAME,
    SPA_SEED_NAME,
    ExportError,
    contrast_rows,
    export_from_config,
    robustft_rows,
    spa_iter_name,
    spa_rows,
)

REPO = Path(__file__).resolve().parent.parent
LF_SAMPLES = REPO / "yaml_examples" / "llamafactory"
PLUGIN = "axolotl_prefalign.PrefAlignPlugin"

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris", "rejected": "Rome"},
    {"prompt": "How many legs has a spider?", "chosen": "Eight", "rejected": "Six"},
    {"prompt": "Is fire hot?", "chosen": "Yes, it is hot.", "rejected": "No."},
    {"prompt": "Say hello.", "chosen": "hello world", "rejected": "good bye"},
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "22"},
    {"prompt": "Colour of grass?", "chosen": "green", "rejected": "blue"},
]


# ---------------------------------------------------------------- contrast rows


def test_raw_contrast_rows_are_the_formats_text_split_at_the_positive_marker(
    tiny_tokenizer,
):
    config = ContrastConfig(positive_only_ratio=0.5, seed=3)
    rows = contrast_rows(PAIRS, config, tiny_tokenizer, RowChecker("pairs.jsonl"))
    fmt = ContrastFormat(tiny_tokenizer, config)
    eos = tiny_tokenizer.eos_token
    kinds = set()
    for index, (pair, row) in enumerate(zip(PAIRS, rows, strict=True)):
        pos_only = is_positive_only(index, 0.5, 3)
        kinds.add(pos_only)
        assert row["input"] == ""
        prompt, output = row["instruction"], row["output"]
        assert prompt.endswith("Positive answer:")
        assert ("Negative answer: " + pair["rejected"] in prompt) is not pos_only
        assert f"Question: {pair['prompt']}\n" in prompt
        assert output.strip() == pair["chosen"] + eos
        # The whole row is what the contrast format renders (EOS as text).
        encoded = fmt.encode_row(pair, index)
        assert encoded.positive_only is pos_only
        text = tiny_tokenizer.decode(encoded.ids, skip_special_tokens=False)
        assert prompt + output == text
        # LLaMA-Factory tokenizes the output on its own: exactly our loss tokens.
        out_ids = tiny_tokenizer(output, add_special_tokens=False)["input_ids"]
        assert out_ids == [t for t in encoded.labels if t != IGNORE_INDEX]
        if pos_only:
            assert prompt == build_inference_prompt(
                pair["prompt"], tokenizer=tiny_tokenizer, config=config
            )
    assert kinds == {True, False}  # both kinds of row were exported


def test_chat_contrast_rows_keep_system_and_history_as_messages(tiny_tokenizer):
    config = ContrastConfig(mode="chat")
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "chosen": "Paris",
        "rejected": "Rome",
    }
    (out,) = contrast_rows([row], config, tiny_tokenizer, RowChecker("chat.jsonl"))
    assert out["system"] == "Be brief."
    assert out["history"] == [["Hi.", "Hello."]]
    assert out["output"] == "Paris"
    assert out["instruction"].startswith("Instruction: Answer the question")
    assert out["instruction"].endswith(
        "Question: Capital of France?\nNegative answer: Rome\nPositive answer:"
    )
    # The same messages through the chat template give the format's own row.
    messages = [
        {"role": "system", "content": out["system"]},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": out["instruction"]},
        {"role": "assistant", "content": out["output"]},
    ]
    pieces = ContrastFormat(tiny_tokenizer, config).render(
        parse_row(row, config.fields), positive_only=False
    )
    text = "".join(p.text for p in pieces)
    assert tiny_tokenizer.apply_chat_template(messages, tokenize=False) == text


def test_chat_history_that_does_not_alternate_is_a_bad_row(tiny_tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
        ],
        "chosen": "x",
        "rejected": "y",
    }
    with pytest.raises(BadRowError, match=r"c.jsonl, row 1: earlier chat turns"):
        contrast_rows(
            [row], ContrastConfig(mode="chat"), tiny_tokenizer, RowChecker("c.jsonl")
        )


def test_positive_first_order_cannot_be_exported(tiny_tokenizer):
    with pytest.raises(ExportError, match="order: positive_first"):
        contrast_rows(
            PAIRS,
            ContrastConfig(order="positive_first"),
            tiny_tokenizer,
            RowChecker("p.jsonl"),
        )


def test_bad_contrast_rows_error_or_are_counted(tiny_tokenizer):
    rows = [PAIRS[0], {**PAIRS[1], "rejected": "Eight"}, {**PAIRS[2], "chosen": ""}]
    with pytest.raises(
        BadRowError, match=r"bad.jsonl, row 2, field 'rejected': identical"
    ):
        contrast_rows(rows, ContrastConfig(), tiny_tokenizer, RowChecker("bad.jsonl"))
    checker = RowChecker("bad.jsonl", "skip")
    out = contrast_rows(rows, ContrastConfig(), tiny_tokenizer, checker)
    assert len(out) == 1 and out[0]["output"].startswith(" Paris")
    assert checker.n_skipped == 2
    assert checker.skipped == {
        "rejected: identical to the chosen answer": 1,
        "chosen: empty": 1,
    }


# ---------------------------------------------------------------- SPA / RobustFT


def test_spa_rows_fill_judge_fields_and_write_nan_margin_as_null():
    rows = [
        {"prompt": " Q1 ", "chosen": "a", "rejected": "b"},
        {
            "prompt": "Q2",
            "chosen": "c",
            "rejected": "d",
            "judge_prob": 0.62,
            "margin": 0.49,
            "iteration": 2,
        },
    ]
    out = spa_rows(rows, RowChecker("pairs"))
    assert out == [
        {
            "instruction": "Q1",
            "input": "",
            "chosen": "a",
            "rejected": "b",
            "judge_prob": 1.0,
            "margin": None,
            "iteration": 0,
        },
        {
            "instruction": "Q2",
            "input": "",
            "chosen": "c",
            "rejected": "d",
            "judge_prob": 0.62,
            "margin": 0.49,
            "iteration": 2,
        },
    ]
    json.dumps(out, allow_nan=False)  # valid JSON for LLaMA-Factory's loader


def test_bad_spa_rows_name_source_row_and_field():
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "a"}]
    with pytest.raises(BadRowError, match=r"seed.jsonl, row 1, field 'rejected'"):
        spa_rows(rows, RowChecker("seed.jsonl"))
    checker = RowChecker("seed.jsonl", "skip")
    assert spa_rows(rows + [{"prompt": "Q", "chosen": "a"}], checker) == []
    assert checker.n_skipped == 2


def test_robustft_rows_are_the_user_turn_and_the_denoised_answer():
    rows = [
        {"question": "Capital of France?", "options": ["Rome", "Paris"], "answer": "B"},
        {"question": "2 + 2?", "options": None, "answer": 4},
        {"question": "", "answer": "x"},
    ]
    checker = RowChecker("denoised.jsonl", "skip")
    out = robustft_rows(rows, "question", "answer", "options", checker)
    assert out == [
        {
            "instruction": "Capital of France?\n\nA. Rome\nB. Paris",
            "input": "",
            "output": "B",
        },
        {"instruction": "2 + 2?", "input": "", "output": "4"},
    ]
    assert checker.skipped == {"question: empty": 1}


# ---------------------------------------------------------------- from a YAML


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _base(model_dir: Path, out: Path, **extra) -> dict:
    cfg = {
        "base_model": str(model_dir),
        "plugins": [PLUGIN],
        "sequence_len": 256,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "num_epochs": 1,
        "output_dir": str(out),
        "bf16": False,
        "fp16": False,
    }
    cfg.update(extra)
    return cfg


def contrast_config(tmp_path: Path, model_dir: Path, **prefalign) -> Path:
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = _base(
        model_dir,
        tmp_path / "out",
        prefalign={"contrast": {"positive_only_ratio": 0.5, "seed": 3}, **prefalign},
        datasets=[
            {
                "path": str(data),
                "ds_type": "json",
                "split": "train",
                "type": "axolotl_prefalign.contrast",
            }
        ],
    )
    return _yaml(tmp_path / "contrast.yml", cfg)


JUDGED = [
    {
        "prompt": "Name a colour.",
        "chosen": "Blue.",
        "rejected": "Seven.",
        "judge_prob": 0.6,
        "margin": 0.4,
        "iteration": 1,
        "index": 0,
        "rewards": [0.2, -0.2],
        "chosen_tokens": 3,
        "rejected_tokens": 3,
    },
    {
        "prompt": "Name a fruit.",
        "chosen": "An apple.",
        "rejected": "A car.",
        "judge_prob": 0.7,
        "margin": 0.8,
        "iteration": 1,
        "index": 1,
        "rewards": [0.4, -0.4],
        "chosen_tokens": 4,
        "rejected_tokens": 3,
    },
]


def spa_config(tmp_path: Path, model_dir: Path, expansion: bool = True) -> Path:
    """An SPA loop YAML with its seed, and (optionally) a finished iteration 1."""
    from axolotl_prefalign.core.shards import ShardWriter, atomic_write_json
    from axolotl_prefalign.spa.loop import iter_dir

    seed = _write_jsonl(tmp_path / "seed.jsonl", PAIRS[:4])
    prompts = _write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"p{i}"} for i in range(4)]
    )
    out = tmp_path / "spa-out"
    cfg = _base(
        model_dir,
        out,
        rl="dpo",
        prefalign={
            "loss": "spa",
            "spa": {"iterations": 2, "prompts": [{"path": str(prompts)}]},
        },
        datasets=[
            {
                "path": str(seed),
                "ds_type": "json",
                "split": "train",
                "type": "axolotl_prefalign.spa_pairs",
            }
        ],
    )
    if expansion:
        pairs = ShardWriter(iter_dir(out, 1) / "pairs", {"test": 1})
        pairs.write(JUDGED, [0, 1])
        pairs.finish({"pairs": 2})
        atomic_write_json(iter_dir(out, 1) / "summary.json", {"pairs": 2})
    return _yaml(tmp_path / "spa.yml", cfg)


ROBUST_ROWS = [
    {"question": "What is the capital of France?", "options": ["Rome", "Paris"]},
    {"question": "How many legs has a spider?", "options": ["Eight", "Six"]},
    {"question": "Is ice cold?", "options": ["Yes", "No"]},
    {"question": "", "options": ["Yes", "No"]},  # a bad row: skipped and counted
]
ROBUST_LABELS = ["B", "A", "A", "A"]


class Oracle:
    """A RobustFT expert that answers every question with its label (all clean)."""

    def __call__(self, prompts, *, max_new_tokens, logprobs=False):
        out = []
        for p in prompts:
            content = p[-1]["content"]
            (label,) = [
                a
                for r, a in zip(ROBUST_ROWS, ROBUST_LABELS, strict=True)
                if r["question"] and f"Question:\n{r['question']}\n" in content
            ]
            out.append(f"Answer: {label}")
        return out


def robustft_config(tmp_path: Path, model_dir: Path, denoise: bool = True) -> Path:
    from axolotl_prefalign.cli import load_config
    from axolotl_prefalign.robustft.pipeline import denoise_entry

    data = _write_jsonl(
        tmp_path / "noisy.jsonl",
        [{**r, "answer": a} for r, a in zip(ROBUST_ROWS, ROBUST_LABELS, strict=True)],
    )
    cfg = _base(
        model_dir,
        tmp_path / "rf-out",
        prefalign={"on_bad_row": "skip", "robustft": {"batch_size": 2}},
        datasets=[
            {
                "path": str(data),
                "ds_type": "json",
                "split": "train",
                "type": "axolotl_prefalign.robustft",
            }
        ],
    )
    path = _yaml(tmp_path / "robustft.yml", cfg)
    if denoise:
        loaded = load_config(path)
        result = denoise_entry(
            loaded, loaded["datasets"][0], load_predictor=lambda p: Oracle()
        )
        assert result.report["train_rows"] == 3
    return path


def test_export_from_config_writes_files_and_dataset_info(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    from axolotl_prefalign.cli import load_config

    out = tmp_path / "lf"
    out.mkdir()
    # Entries of other data sets in an existing dataset_info.json are kept.
    (out / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "m"}}))
    lines: list[str] = []
    sets = export_from_config(
        load_config(contrast_config(tmp_path, tiny_model_dir)), out, echo=lines.append
    )
    sets += export_from_config(
        load_config(spa_config(tmp_path, tiny_model_dir)), out, echo=lines.append
    )
    sets += export_from_config(
        load_config(robustft_config(tmp_path, tiny_model_dir)), out, echo=lines.append
    )
    info = json.loads((out / "dataset_info.json").read_text())
    assert info == {
        "mine": {"file_name": "m"},
        CONTRAST_NAME: {
            "file_name": "contrast_sft.jsonl",
            "columns": {
                "prompt": "instruction",
                "query": "input",
                "response": "output",
            },
        },
        SPA_SEED_NAME: {
            "file_name": "spa_seed.jsonl",
            "ranking": True,
            "columns": {
                "prompt": "instruction",
                "query": "input",
                "chosen": "chosen",
                "rejected": "rejected",
            },
        },
        spa_iter_name(1): {
            "file_name": "spa_iter1.jsonl",
            "ranking": True,
            "columns": info[SPA_SEED_NAME]["columns"],
        },
        ROBUSTFT_NAME: {
            "file_name": "robustft_sft.jsonl",
            "columns": info[CONTRAST_NAME]["columns"],
        },
    }

    def read(name):
        path = out / name
        return [json.loads(line) for line in path.read_text().splitlines()]

    contrast = read("contrast_sft.jsonl")
    assert contrast == contrast_rows(
        PAIRS,
        ContrastConfig(positive_only_ratio=0.5, seed=3),
        tiny_tokenizer,
        RowChecker("x"),
    )
    assert [r["instruction"] for r in read("spa_seed.jsonl")] == [
        p["prompt"] for p in PAIRS[:4]
    ]
    iter1 = read("spa_iter1.jsonl")
    assert [(r["chosen"], r["rejected"], r["margin"]) for r in iter1] == [
        ("Blue.", "Seven.", 0.4),
        ("An apple.", "A car.", 0.8),
    ]
    # Only the denoised rows: the bad input row (empty question) was skipped.
    assert read("robustft_sft.jsonl") == [
        {
            "instruction": "What is the capital of France?\n\nA. Rome\nB. Paris",
            "input": "",
            "output": "B",
        },
        {
            "instruction": "How many legs has a spider?\n\nA. Eight\nB. Six",
            "input": "",
            "output": "A",
        },
        {"instruction": "Is ice cold?\n\nA. Yes\nB. No", "input": "", "output": "A"},
    ]
    assert {s.name: len(s.rows) for s in sets} == {
        CONTRAST_NAME: 6,
        SPA_SEED_NAME: 4,
        spa_iter_name(1): 2,
        ROBUSTFT_NAME: 3,
    }
    text = "\n".join(lines)
    assert "prefalign_contrast     sft            6       0  contrast_sft.jsonl" in text
    assert "LLaMA-Factory template: empty" in text


def test_robustft_export_needs_a_finished_denoise(tmp_path, tiny_model_dir):
    from axolotl_prefalign.cli import load_config

    cfg = load_config(robustft_config(tmp_path, tiny_model_dir, denoise=False))
    with pytest.raises(ExportError, match="run `axolotl prefalign denoise CONFIG`"):
        export_from_config(cfg, tmp_path / "lf")
    assert not (tmp_path / "lf").exists()


def test_cli_export_command(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from axolotl_prefalign.cli import prefalign

    config = spa_config(tmp_path, tiny_model_dir, expansion=False)
    out = tmp_path / "lf"
    result = CliRunner().invoke(
        prefalign, ["export", "--to", "llamafactory", str(config), str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "prefalign_spa_seed     pairwise       4       0  spa_seed.jsonl" in (
        result.output
    )
    assert sorted(json.loads((out / "dataset_info.json").read_text())) == [
        SPA_SEED_NAME
    ]
    bad = CliRunner().invoke(prefalign, ["export", "--to", "trl", str(config), "x"])
    assert bad.exit_code == 2 and "'trl' is not 'llamafactory'" in bad.output


def test_sample_yamls_name_the_exported_datasets():
    names = {
        "contrast_sft.yaml": (CONTRAST_NAME, "sft", "empty"),
        "spa_dpo.yaml": (spa_iter_name(1), "dpo", "smollm2"),
        "robustft_sft.yaml": (ROBUSTFT_NAME, "sft", "smollm2"),
    }
    # .yaml, not .yml: tests/test_config.py validates every *.yml as an Axolotl YAML.
    # The launcher's own samples (run by tests/test_llamafactory.py) read data/.
    launcher = ["dpo_prefalign.yaml", "robustft_denoise.yaml", "spa_loop.yaml"]
    # Its sharded variants (checked by tests/test_launchers.py).
    launcher += ["dpo_prefalign_zero3.yaml", "dpo_prefalign_fsdp.yaml"]
    assert sorted(p.name for p in LF_SAMPLES.glob("*.yaml")) == sorted(
        [*names, *launcher]
    )
    for file, (dataset, stage, template) in names.items():
        cfg = yaml.safe_load((LF_SAMPLES / file).read_text())
        assert (cfg["dataset"], cfg["stage"], cfg["template"]) == (
            dataset,
            stage,
            template,
        )
        assert cfg["dataset_dir"] == "outputs/llamafactory"


# ---------------------------------------------------------------- LLaMA-Factory


@pytest.mark.slow
def test_llamafactory_loads_the_export_with_the_sample_yamls(
    tmp_path, smollm2_dir, smollm2_tokenizer
):
    """LLaMA-Factory's own parser and loader on our files and sample YAMLs: the
    tokenized rows are our texts, and the loss falls on the answers only."""
    from axolotl_prefalign.cli import load_config
    from axolotl_prefalign.robustft.sft import render_example, user_turn
    from axolotl_prefalign.spa.pairs import completion_text, prompt_text

    python = llamafactory_python()
    out = tmp_path / "lf"
    for config in (
        contrast_config(tmp_path, smollm2_dir),
        spa_config(tmp_path, smollm2_dir),
        robustft_config(tmp_path, smollm2_dir),
    ):
        export_from_config(load_config(config), out, echo=lambda s: None)
    common = {
        "model_name_or_path": str(smollm2_dir),
        "dataset_dir": str(out),
        "report_to": "none",
    }
    specs = [
        {
            "yaml": str(LF_SAMPLES / name),
            "overrides": {**common, "output_dir": str(tmp_path / name)},
        }
        for name in ("contrast_sft.yaml", "spa_dpo.yaml", "robustft_sft.yaml")
    ]
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(specs))
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf-datasets")
    proc = subprocess.run(
        [python, str(REPO / "tests" / "llamafactory_load.py"), spec_path, "lf.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = json.loads((tmp_path / "lf.json").read_text())
    tok = smollm2_tokenizer

    def split(ids, labels):
        prompt = [i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]
        answer = [lab for lab in labels if lab != IGNORE_INDEX]
        assert ids[len(prompt) :] == answer  # the loss span is one tail
        return prompt, answer

    # Contrast: token for token the rows the contrast format trains on.
    contrast = loaded[specs[0]["yaml"]]
    config = ContrastConfig(positive_only_ratio=0.5, seed=3)
    fmt = ContrastFormat(tok, config)
    assert len(contrast["rows"]) == len(PAIRS)
    for index, (pair, row) in enumerate(zip(PAIRS, contrast["rows"], strict=True)):
        ours = fmt.tokenize_row(pair, index)
        assert row["input_ids"] == ours["input_ids"]
        assert row["labels"] == ours["labels"]

    # SPA: LLaMA-Factory's prompt is our chat-templated prompt; the chosen and
    # rejected tails start with our completions (LLaMA-Factory's assistant turn
    # adds the template's trailing newline).
    spa = loaded[specs[1]["yaml"]]
    assert len(spa["rows"]) == len(JUDGED)
    for judged, row in zip(JUDGED, spa["rows"], strict=True):
        for side in ("chosen", "rejected"):
            prompt, answer = split(row[f"{side}_input_ids"], row[f"{side}_labels"])
            assert tok.decode(prompt) == prompt_text(tok, judged["prompt"])
            text = tok.decode(answer)
            assert text.startswith(completion_text(tok, judged[side])), text

    # RobustFT: the user turn (question + options) and the denoised answer.
    robust = loaded[specs[2]["yaml"]]
    assert len(robust["rows"]) == 3
    for r, label, row in zip(ROBUST_ROWS, ROBUST_LABELS, robust["rows"], strict=False):
        prompt, answer = split(row["input_ids"], row["labels"])
        head, tail = render_example(tok, user_turn(r["question"], r["options"]), label)
        assert tok.decode(prompt) == head
        assert tok.decode(answer).startswith(tail.rstrip())
