"""LLaMA-Factory datasets (a dataset_info.json entry) as inputs of the pipelines, and
their outputs written back as LLaMA-Factory datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_robustft_pipeline import FakeModel, bow_encoder

from axolotl_prefalign.core.config import SpaPromptSource
from axolotl_prefalign.core.local_data import DataFileError, read_local
from axolotl_prefalign.core.rows import BadRowError


def _dataset(tmp_path: Path, name: str, rows: list, entry: dict) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info_path = d / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {"file_name": f"{name}.jsonl", **entry}
    info_path.write_text(json.dumps(info))
    return info_path


def test_alpaca_sft_rows_join_instruction_and_input_as_llamafactory_does(tmp_path):
    rows = [
        {"q": "Add the numbers.", "extra": "2 and 3", "a": "5", "sys": "Be brief."},
        {"q": "Name a colour.", "a": "Blue"},
    ]
    columns = {"prompt": "q", "query": "extra", "response": "a", "system": "sys"}
    info = _dataset(tmp_path, "sums", rows, {"columns": columns})
    data = read_local(info, name="sums")
    assert data.rows == [
        {"prompt": "Add the numbers.\n2 and 3", "response": "5", "system": "Be brief."},
        {"prompt": "Name a colour.", "response": "Blue"},
    ]
    assert data.lines == [1, 2] and data.converted
    assert data.source.endswith("sums.jsonl")


def test_alpaca_ranking_rows_with_the_default_columns(tmp_path):
    rows = [{"instruction": "2+2?", "input": "", "chosen": "4", "rejected": "5"}]
    info = _dataset(tmp_path, "pairs", rows, {"ranking": True})
    assert read_local(info, name="pairs").rows == [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    ]


def test_sharegpt_ranking_rows_with_a_system_message(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "human", "value": "Capital of France?"},
        ],
        "chosen": {"from": "gpt", "value": "Paris"},
        "rejected": {"from": "gpt", "value": "Rome"},
    }
    info = _dataset(tmp_path, "sg", [row], {"formatting": "sharegpt", "ranking": True})
    assert read_local(info, name="sg").rows == [
        {
            "system": "You are terse.",
            "prompt": "Capital of France?",
            "chosen": "Paris",
            "rejected": "Rome",
        }
    ]


def test_sharegpt_sft_row_and_custom_tags(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    entry = {
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
        },
    }
    info = _dataset(tmp_path, "chat", [row], entry)
    assert read_local(info, name="chat").rows == [
        {"prompt": "Hi?", "response": "Hello."}
    ]


@pytest.mark.parametrize(
    "rows, entry, message",
    [
        (
            [{"instruction": "ok", "output": "x"}, {"output": "x"}],
            {},
            r"bad\.jsonl, line 2, field 'instruction': missing",
        ),
        (
            [{"instruction": "q", "chosen": "a", "rejected": 3}],
            {"ranking": True},
            r"bad\.jsonl, line 1, field 'rejected': must be text, got int",
        ),
        (
            [
                {
                    "conversations": [
                        {"from": "human", "value": "a"},
                        {"from": "gpt", "value": "b"},
                        {"from": "human", "value": "c"},
                        {"from": "gpt", "value": "d"},
                    ]
                }
            ],
            {"formatting": "sharegpt"},
            r"line 1, field 'conversations': one user turn .* got roles human, gpt",
        ),
    ],
)
def test_bad_llamafactory_rows_name_file_line_and_column(
    tmp_path, rows, entry, message
):
    info = _dataset(tmp_path, "bad", rows, entry)
    with pytest.raises(BadRowError, match=message):
        read_local(info, name="bad")


def test_bad_rows_are_counted_under_skip(tmp_path):
    rows = [{"instruction": "q1", "output": "a"}, {"output": "x"}, {"instruction": 3}]
    info = _dataset(tmp_path, "mixed", rows, {})
    data = read_local(info, name="mixed", on_bad_row="skip")
    assert data.rows == [{"prompt": "q1", "response": "a"}]
    assert data.n_skipped == 2 and data.lines == [1]


@pytest.mark.parametrize(
    "name, entry, message",
    [
        (None, {}, r"name one of its datasets with `name:` \(x\)"),
        ("nope", {}, r"has no dataset 'nope' \(x\)"),
        ("x", {"formatting": "openai"}, "formatting 'openai' is not read"),
    ],
)
def test_dataset_info_errors_say_what_to_do(tmp_path, name, entry, message):
    info = _dataset(tmp_path, "x", [{"instruction": "q", "output": "a"}], entry)
    with pytest.raises(DataFileError, match=message):
        read_local(info, name=name)


def test_a_hub_entry_is_not_read(tmp_path):
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"hub": {"hf_hub_url": "org/set"}}))
    with pytest.raises(DataFileError, match="only local datasets"):
        read_local(info, name="hub")


def test_spa_prompts_from_a_llamafactory_dataset(tmp_path):
    from axolotl_prefalign.spa.loop import load_prompts

    rows = [{"instruction": "Say hi."}, {"instruction": "Count", "input": "1 to 3"}]
    info = _dataset(tmp_path, "prompts", rows, {})
    ds = load_prompts(SpaPromptSource(path=str(info), name="prompts"))
    assert ds["prompt"] == ["Say hi.", "Count\n1 to 3"]
    assert ds["index"] == [0, 1]


def test_axolotl_entry_naming_a_llamafactory_dataset_reads_a_converted_copy(
    tmp_path, monkeypatch
):
    from axolotl_prefalign.core.config import PrefAlignConfig
    from axolotl_prefalign.integrations.axolotl.dataset_check import precheck_entry

    monkeypatch.setenv("AXOLOTL_PREFALIGN_CACHE", str(tmp_path / "cache"))
    rows = [{"instruction": "2+2?", "chosen": "4", "rejected": "5"}]
    info = _dataset(tmp_path, "pairs", rows, {"ranking": True})
    entry = {"path": str(info), "name": "pairs", "type": "axolotl_prefalign.spa_pairs"}
    assert precheck_entry(entry, PrefAlignConfig()) == (1, 0)
    assert "name" not in entry and entry["ds_type"] == "json"
    copy = Path(entry["path"])
    assert copy.is_relative_to(tmp_path / "cache")
    assert [json.loads(x) for x in copy.read_text().splitlines()] == [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    ]


def test_llamafactory_denoise_writes_the_result_back_as_a_llamafactory_dataset(
    tmp_path,
):
    from axolotl_prefalign.integrations.llamafactory.robustft import denoise

    rows = [
        {"instruction": "How many apples?", "output": "5"},
        {"instruction": "Which tower is in Paris?", "output": "Eiffel Tower"},
    ]
    info = _dataset(tmp_path, "noisy", rows, {})
    replies = {
        ("plain", rows[0]["instruction"]): "Answer: 6",
        ("reasoning", rows[0]["instruction"]): "Answer: 6 apples",
        ("context", rows[0]["instruction"]): ("Answer: 6", [-0.2]),
        ("plain", rows[1]["instruction"]): "The Eiffel tower.",
        ("reasoning", rows[1]["instruction"]): "Answer: the eiffel tower",
    }
    config = tmp_path / "denoise.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "fake",
                "stage": "sft",
                "dataset": "noisy",
                "dataset_dir": str(info.parent),
                "output_dir": str(tmp_path / "out"),
                "prefalign": {"robustft": {"review": "rule", "batch_size": 2}},
            }
        )
    )
    lines: list[str] = []
    (result,) = denoise(
        config,
        load_predictor=lambda p: FakeModel(replies),
        encoder=bow_encoder,
        echo=lines.append,
    )
    assert [r["robustft_status"] for r in result.all_rows] == ["relabelled", "clean"]
    entries = json.loads(info.read_text())
    assert set(entries) == {"noisy", "noisy_robustft"}
    assert entries["noisy_robustft"] == {
        "file_name": "noisy_robustft.jsonl",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"},
    }
    out = info.parent / "noisy_robustft.jsonl"
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["instruction"], r["output"]) for r in written] == [
        ("How many apples?", "6"),
        ("Which tower is in Paris?", "Eiffel Tower"),
    ]
    assert any("dataset: noisy_robustft" in line for line in lines)


def test_llamafactory_denoise_keeps_each_rows_system_prompt(tmp_path):
    """Sharegpt rows with a system turn: the rows written back keep it in an
    alpaca `system` column that their dataset_info entry declares, and the
    denoised folder is not the one of the same rows without it."""
    from axolotl_prefalign.integrations.llamafactory.robustft import denoise

    qa = [("How many apples?", "5"), ("Which tower is in Paris?", "Eiffel Tower")]
    systems = ["Answer with a number.", "Answer with a name."]
    sharegpt = [
        {
            "conversations": [
                {"from": "system", "value": system},
                {"from": "human", "value": q},
                {"from": "gpt", "value": a},
            ]
        }
        for (q, a), system in zip(qa, systems, strict=True)
    ]
    alpaca = [{"instruction": q, "output": a} for q, a in qa]
    info = _dataset(tmp_path, "chat", sharegpt, {"formatting": "sharegpt"})
    _dataset(tmp_path, "plain", alpaca, {})
    replies = {
        ("plain", qa[0][0]): "Answer: 6",
        ("reasoning", qa[0][0]): "Answer: 6 apples",
        ("context", qa[0][0]): ("Answer: 6", [-0.2]),
        ("plain", qa[1][0]): "The Eiffel tower.",
        ("reasoning", qa[1][0]): "Answer: the eiffel tower",
    }
    config = tmp_path / "denoise.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "fake",
                "stage": "sft",
                "dataset": "chat,plain",
                "dataset_dir": str(info.parent),
                "output_dir": str(tmp_path / "out"),
                "prefalign": {"robustft": {"review": "rule", "batch_size": 2}},
            }
        )
    )
    chat, plain = denoise(
        config,
        load_predictor=lambda p: FakeModel(replies),
        encoder=bow_encoder,
        echo=lambda line: None,
    )
    assert chat.out_dir.name.split("-")[-1] != plain.out_dir.name.split("-")[-1]
    entries = json.loads(info.read_text())
    assert entries["chat_robustft"]["columns"] == {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
    }
    assert "system" not in entries["plain_robustft"]["columns"]
    written = [
        json.loads(x)
        for x in (info.parent / "chat_robustft.jsonl").read_text().splitlines()
    ]
    assert written == [
        {"instruction": q, "input": "", "output": a, "system": system}
        for (q, _), a, system in zip(qa, ["6", "Eiffel Tower"], systems, strict=True)
    ]
