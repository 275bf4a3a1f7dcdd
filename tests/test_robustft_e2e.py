"""RobustFT end to end: the tiny random model through the whole pipeline, the
`axolotl_prefalign.robustft` dataset type through Axolotl's own dispatch, and (slow)
the CLI with the real SmolLM2 and `axolotl train` on the denoised set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_robustft_pipeline import REPLIES, FakeModel, bow_encoder, noisy_dataset

from axolotl_prefalign.core.shards import MANIFEST
from axolotl_prefalign.robustft import pipeline as P
from axolotl_prefalign.robustft.sft import tokenize_example, user_turn

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "axolotl_prefalign" / "data" / "robustft_example.jsonl"


def _as_axolotl_loads(ds_cfg: dict):
    """The entry's file as Axolotl hands it to the dataset type (datasets' JSON)."""
    from datasets import load_dataset

    return load_dataset("json", data_files=str(ds_cfg["path"]), split="train")


def _write_rows(path: Path, n: int) -> Path:
    lines = EXAMPLE.read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(base_model: str, data: Path, out: Path, **robustft) -> dict:
    settings = {"gold_field": "gold", "batch_size": 4}
    settings.update(robustft)
    return {
        "base_model": base_model,
        "output_dir": str(out),
        "datasets": [
            {"path": str(data), "ds_type": "json", "type": "axolotl_prefalign.robustft"}
        ],
        "prefalign": {"robustft": settings},
    }


def _assert_counts_add_up(result: P.DenoiseResult) -> dict:
    rep = result.report
    out = result.out_dir
    every = (out / "all.jsonl").read_text().splitlines()
    train = (out / "denoised.jsonl").read_text().splitlines()
    assert len(every) == rep["rows_in"]
    assert rep["rows_checked"] + rep["bad_rows_skipped"] == rep["rows_in"]
    assert rep["clean"] + rep["noisy"] == rep["rows_checked"]
    assert rep["selected"] <= rep["relabelled"] <= rep["noisy"]
    assert rep["dropped"] == rep["noisy"] - rep["selected"]
    assert len(train) == rep["train_rows"] == rep["clean"] + rep["selected"]
    statuses = [json.loads(x)["robustft_status"] for x in every]
    assert statuses.count("clean") == rep["clean"]
    assert statuses.count("relabelled") == rep["selected"]
    assert json.loads((out / "report.json").read_text())["rows_in"] == rep["rows_in"]
    manifest = json.loads((out / "predictions" / "00-base" / MANIFEST).read_text())
    assert manifest["complete"]
    assert sum(s["rows"] for s in manifest["shards"]) == rep["rows_checked"]
    return rep


def test_tiny_model_runs_the_whole_pipeline(tiny_model_dir, tmp_path):
    data = _write_rows(tmp_path / "noisy.jsonl", 8)
    cfg = _cfg(
        str(tiny_model_dir),
        data,
        tmp_path / "out",
        max_new_tokens=8,
        answer_max_new_tokens=4,
    )
    printed: list[str] = []
    (result,) = P.denoise_from_config(cfg, encoder=bow_encoder, echo=printed.append)
    assert result.out_dir.parent == tmp_path / "out" / "robustft"
    assert result.out_dir.name.startswith("noisy-")
    rep = _assert_counts_add_up(result)
    assert rep["rows_in"] == 8 and rep["experts"] == ["base"]
    assert "rows in" in printed[0] and "detection recall" in printed[0]
    if rep["noisy"]:
        relabel = json.loads((result.out_dir / "relabel" / MANIFEST).read_text())
        assert relabel["complete"]
        assert sum(s["rows"] for s in relabel["shards"]) == rep["noisy"]


def test_tokenize_example_masks_the_prompt_token_by_token(tiny_tokenizer):
    prompt = user_turn("What is the capital of France?", ["Berlin", "Paris"])
    assert prompt == "What is the capital of France?\n\nA. Berlin\nB. Paris"
    enc = tokenize_example(tiny_tokenizer, prompt, "B", sequence_len=512)
    head = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
    )
    n_prompt = len(tiny_tokenizer(head, add_special_tokens=False)["input_ids"])
    ids, labels = enc["input_ids"], enc["labels"]
    assert enc["attention_mask"] == [1] * len(ids)
    for i, (tok, lab) in enumerate(zip(ids, labels, strict=True)):
        assert lab == (-100 if i < n_prompt else tok), i
    assert tiny_tokenizer.decode(ids) == head + "B<|im_end|>\n"
    assert tiny_tokenizer.decode(ids[n_prompt:]) == "B<|im_end|>\n"
    both = tokenize_example(
        tiny_tokenizer, prompt, "B", sequence_len=512, train_on_inputs=True
    )
    assert both["labels"] == both["input_ids"]
    assert tokenize_example(tiny_tokenizer, prompt, "B", sequence_len=5) is None


def _denoise_with_fakes(tmp_path: Path, base_model: str, **robustft):
    data = tmp_path / "noisy.jsonl"
    noisy_dataset().to_json(str(data), lines=True)
    cfg = _cfg(base_model, data, tmp_path / "out", review="rule", batch_size=2)
    cfg["prefalign"]["robustft"].update(robustft)
    ds_cfg = cfg["datasets"][0]
    result = P.denoise_entry(
        cfg, ds_cfg, load_predictor=lambda p: FakeModel(REPLIES), encoder=bow_encoder
    )
    return cfg, ds_cfg, result


def test_dataset_type_trains_on_the_denoised_rows_via_axolotl(tiny_tokenizer, tmp_path):
    from axolotl.utils.data.wrappers import get_dataset_wrapper
    from axolotl.utils.dict import DictDefault

    # The CLI's output for these rows and settings exists: the dataset type must
    # find it (same key) and never load "fake-model".
    cfg, ds_cfg, result = _denoise_with_fakes(tmp_path, "fake-model")
    assert result.train["answer"] == ["B", "B", "C", "B", "C"]
    cfg.update(sequence_len=256, train_on_inputs=False)
    wrapped, _ = get_dataset_wrapper(
        dataset_config=DictDefault(ds_cfg),
        tokenizer=tiny_tokenizer,
        cfg=DictDefault(cfg),
        dataset_base_type=None,
        dataset=_as_axolotl_loads(ds_cfg),
    )
    assert wrapped.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(wrapped) == 5
    answers = [
        tiny_tokenizer.decode([t for t in row["labels"] if t != -100])
        for row in wrapped
    ]
    assert answers == [f"{a}<|im_end|>\n" for a in ["B", "B", "C", "B", "C"]]
    first = tiny_tokenizer.decode(wrapped[0]["input_ids"])
    assert "What is the capital of France?\n\nA. Berlin\nB. Paris" in first
    assert len(list((tmp_path / "out" / "robustft").iterdir())) == 1


def test_dataset_type_runs_the_pipeline_when_no_output_exists(
    tiny_model_dir, tiny_tokenizer, tmp_path
):
    from axolotl_prefalign.robustft import load

    data = _write_rows(tmp_path / "noisy.jsonl", 4)
    cfg = _cfg(
        str(tiny_model_dir),
        data,
        tmp_path / "out",
        max_new_tokens=4,
        answer_max_new_tokens=4,
        select_ratio=1.0,
    )
    cfg["sequence_len"] = 512
    strategy = load(tiny_tokenizer, cfg, cfg["datasets"][0])
    try:
        wrapped = strategy.wrap_dataset(_as_axolotl_loads(cfg["datasets"][0]))
    except P.RobustFTError as err:
        # The random model may give no usable answer at all: then a clear error.
        assert "no training rows" in str(err)
        wrapped = None
    (folder,) = (tmp_path / "out" / "robustft").iterdir()
    report = json.loads((folder / "report.json").read_text())
    assert report["rows_in"] == 4
    if wrapped is not None:
        assert len(wrapped) == report["train_rows"]


@pytest.mark.slow
def test_cli_denoise_with_smollm2(smollm2_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from axolotl_prefalign.cli import prefalign

    data = _write_rows(tmp_path / "noisy.jsonl", 6)
    cfg = {
        "base_model": "prefalign:default",
        "plugins": ["axolotl_prefalign.PrefAlignPlugin"],
        "datasets": [
            {"path": str(data), "ds_type": "json", "type": "axolotl_prefalign.robustft"}
        ],
        "prefalign": {
            "robustft": {
                "gold_field": "gold",
                "max_new_tokens": 48,
                "answer_max_new_tokens": 12,
                "batch_size": 6,
            }
        },
        "output_dir": str(tmp_path / "out"),
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "num_epochs": 1,
        "sequence_len": 256,
        "bf16": False,
        "fp16": False,
    }
    path = tmp_path / "robustft.yml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(prefalign, ["denoise", str(path)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "RobustFT: " in res.output and "detection precision" in res.output
    (folder,) = (tmp_path / "out" / "robustft").iterdir()
    result = P.load_result(folder)
    rep = _assert_counts_add_up(result)
    assert rep["rows_in"] == 6
    assert rep["experts"] == ["base"]
    # SmolLM2 follows the "Answer: X" format: most replies have an answer.
    every = [json.loads(x) for x in (folder / "all.jsonl").read_text().splitlines()]
    votes = [v for r in every for v in r["robustft_votes"]]
    assert sum(v["answer"] is not None for v in votes) >= len(votes) // 2


@pytest.mark.slow
def test_axolotl_train_on_the_robustft_type(tiny_model_dir, tmp_path):
    from conftest import run_axolotl_train, tiny_train_cfg

    cfg, ds_cfg, result = _denoise_with_fakes(tmp_path, str(tiny_model_dir))
    train_cfg = tiny_train_cfg(
        tiny_model_dir,
        tmp_path / "out",
        datasets=[ds_cfg],
        prefalign=cfg["prefalign"],
    )
    proc = run_axolotl_train(train_cfg, tmp_path / "work")
    assert proc.returncode == 0
    # The training run found the denoised output by its key: no second folder
    # (the random tiny model would otherwise have been asked to denoise).
    assert [p.name for p in (tmp_path / "out" / "robustft").iterdir()] == [
        result.out_dir.name
    ]
    from huggingface_hub import ModelCard

    # The run's card (Axolotl's SFT trainer) holds the denoising report.
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert {"axolotl", "prefalign", "robustft", "sft"} <= set(card.data.tags)
    report = result.report
    assert f"| clean (kept as labelled) | {report['clean']} |" in card.text
    assert f"| relabelled | {report['relabelled']} |" in card.text
    assert f"| training rows (clean + kept) | {report['train_rows']} |" in card.text
    assert "| detection precision |" in card.text
    assert "| detection recall |" in card.text
    assert "luo2024robustft" in card.text
