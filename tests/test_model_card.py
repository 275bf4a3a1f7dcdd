"""Model cards of the runs the plugin shapes (DPO, contrast SFT, RobustFT, SPA
stages, the final SPA model): base model id, tags, datasets, the YAML as written,
citations and the run's own results, in a card `huggingface_hub` parses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import run_axolotl_train, tiny_train_cfg

from axolotl_prefalign.core.model_card import (
    base_model_id,
    portable_yaml,
    render_card,
)
from axolotl_prefalign.core.models import DEFAULT_MODEL_ALIAS, DEFAULT_MODEL_HUB_ID

PLUGIN = "axolotl_prefalign.PrefAlignPlugin"
HUB_ID = "tiny-org/tiny-llama"


def _default_folder(root: Path) -> Path:
    """A folder that looks like the prepared embedded model (its marker file)."""
    folder = root / "cache" / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "prefalign_model.json").write_text('{"name": "SmolLM2-135M-Instruct"}')
    (folder / "config.json").write_text("{}")
    return folder


def _parse(text: str):
    from huggingface_hub import ModelCard

    return ModelCard(text)


def _trainer(out: Path, history: list[dict], rows: int = 0):
    state = SimpleNamespace(log_history=history, global_step=len(history))
    return SimpleNamespace(
        state=state,
        args=SimpleNamespace(output_dir=str(out)),
        train_dataset=list(range(rows)),
    )


def _cfg(tmp_path: Path, raw: dict, **resolved) -> dict:
    """Axolotl's config: the YAML file as written plus what the plugin resolved."""
    path = tmp_path / "config.yml"
    path.write_text("# a comment kept in the card\n" + yaml.safe_dump(raw))
    return {**raw, **resolved, "axolotl_config_path": str(path)}


DPO_HISTORY = [
    {"loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.01, "step": 1},
    {"loss": 0.52, "rewards/accuracies": 1.0, "rewards/margins": 0.4, "step": 2},
    {"train_loss": 0.605, "step": 2},
]


# -- base model id ---------------------------------------------------------------


def test_base_model_id_names_the_hub_model_of_every_kind_of_base(tmp_path):
    default = _default_folder(tmp_path)
    assert base_model_id(DEFAULT_MODEL_ALIAS) == DEFAULT_MODEL_HUB_ID
    assert base_model_id(default) == DEFAULT_MODEL_HUB_ID
    assert base_model_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    # A local folder reports its own _name_or_path.
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": HUB_ID}))
    assert base_model_id(local) == HUB_ID
    # An adapter's base, and `axolotl merge-lora`'s output beside its adapter.
    run = tmp_path / "iter_0"
    (run / "merged").mkdir(parents=True)
    (run / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(default)})
    )
    (run / "merged" / "config.json").write_text("{}")
    assert base_model_id(run) == DEFAULT_MODEL_HUB_ID
    assert base_model_id(run / "merged") == DEFAULT_MODEL_HUB_ID
    snapshot = tmp_path / "hub/models--org--name/snapshots/abc123"
    snapshot.mkdir(parents=True)
    assert base_model_id(snapshot) == "org/name"
    # Nothing names a hub model: no guess.
    bare = tmp_path / "bare"
    bare.mkdir()
    assert base_model_id(bare) is None
    assert base_model_id("/nowhere/on/this/machine") is None


def test_portable_yaml_gives_the_cache_path_back_its_alias(tmp_path):
    default = _default_folder(tmp_path)
    text = (
        "# my run\n"
        f"base_model: {default}   # the embedded model\n"
        f"tokenizer_config: '{default}'\n"
        "datasets:\n  - path: data.jsonl\n"
    )
    out = portable_yaml(text)
    assert str(default) not in out
    assert out.count(f"{DEFAULT_MODEL_ALIAS}") == 2
    assert "# my run" in out and "# the embedded model" in out
    assert yaml.safe_load(out)["datasets"] == [{"path": "data.jsonl"}]
    written = "base_model: prefalign:default\n"
    assert portable_yaml(written) == written


# -- one card per workflow ---------------------------------------------------------


def test_dpo_card_names_base_tags_datasets_config_citation_and_results(tmp_path):
    from axolotl_prefalign.integrations.axolotl.model_card import build_spec

    default = _default_folder(tmp_path)
    out = tmp_path / "outputs" / "quickstart"
    raw = {
        "base_model": DEFAULT_MODEL_ALIAS,
        "plugins": [PLUGIN],
        "prefalign": {"loss": "sigmoid"},
        "rl": "dpo",
        "rl_beta": 0.1,
        "adapter": "lora",
        "datasets": [{"path": "pairs.jsonl", "type": "chatml.prompt_pairs"}],
        "output_dir": "./outputs/quickstart",
    }
    cfg = _cfg(tmp_path, raw, base_model=str(default), output_dir=str(out))
    text = render_card(build_spec(cfg, _trainer(out, DPO_HISTORY)))
    card = _parse(text)
    assert card.data.base_model == DEFAULT_MODEL_HUB_ID
    assert {"axolotl", "prefalign", "dpo", "lora"} <= set(card.data.tags)
    assert card.data.datasets == ["pairs.jsonl"]
    assert card.data.library_name == "peft"
    assert "[None]" not in text and 'model="None"' not in text
    assert f"fine-tuned version of [{DEFAULT_MODEL_HUB_ID}]" in text
    # The YAML as written, in Axolotl's layout, with the alias (not the cache).
    assert "<details><summary>See axolotl config</summary>" in text
    assert "base_model: prefalign:default" in text and str(default) not in text
    assert "# a comment kept in the card" in text
    assert "rafailov2023direct" in text
    assert "| train_loss | 0.605 |" in text
    assert "| last_rewards/accuracies | 1 |" in text


def test_contrast_card_counts_rows_and_cites_its_precedents(tmp_path):
    from axolotl_prefalign.integrations.axolotl.model_card import build_spec

    data = tmp_path / "contrast.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(9)]
    rows.append({"prompt": "q9", "chosen": "", "rejected": "bad"})  # a bad row
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    raw = {
        "base_model": str(tmp_path / "model"),
        "plugins": [PLUGIN],
        "prefalign": {"on_bad_row": "skip", "contrast": {"positive_only_ratio": 1.0}},
        "datasets": [{"path": str(data), "type": "axolotl_prefalign.contrast"}],
        "output_dir": str(out),
    }
    history = [{"loss": 2.0, "step": 1}, {"train_loss": 2.0, "step": 1}]
    text = render_card(build_spec(_cfg(tmp_path, raw), _trainer(out, history, 9)))
    card = _parse(text)
    assert {"axolotl", "prefalign", "contrast-sft", "sft"} <= set(card.data.tags)
    assert card.data.datasets == [str(data)]
    assert card.data.base_model is None  # a local folder that names no hub model
    assert f"| {data} | 10 | 1 | 0 | 9 |" in text
    assert "Training rows after Axolotl's own filtering: 9." in text
    assert "liu2024chain" in text and "xu2023reasons" not in text


def test_robustft_card_holds_the_report_with_precision_and_recall(tmp_path):
    from axolotl_prefalign.core.config import prefalign_config
    from axolotl_prefalign.integrations.axolotl.model_card import build_spec
    from axolotl_prefalign.robustft.pipeline import (
        cache_key,
        default_parent,
        load_input,
        output_folder,
    )

    data = tmp_path / "noisy.jsonl"
    rows = [
        {"question": f"{i}+1?", "answer": "1", "gold": str(i + 1)} for i in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    entry = {"path": str(data), "type": "axolotl_prefalign.robustft"}
    raw = {
        "base_model": str(tmp_path / "model"),
        "plugins": [PLUGIN],
        "prefalign": {"robustft": {"gold_field": "gold"}},
        "datasets": [entry],
        "output_dir": str(out),
    }
    cfg = _cfg(tmp_path, raw)
    pa = prefalign_config(cfg)
    key = cache_key(
        pa.robustft,
        load_input(entry).rows,
        base_model=cfg["base_model"],
        on_bad_row="error",
    )
    folder = output_folder(default_parent(cfg, pa.robustft), str(data), key)
    folder.mkdir(parents=True)
    report = {
        "source": str(data),
        "rows_in": 4,
        "bad_rows_skipped": 0,
        "clean": 2,
        "noisy": 2,
        "relabelled": 2,
        "selected": 1,
        "dropped": 1,
        "train_rows": 3,
        "gold": {
            "field": "gold",
            "noise_rate_in": 0.5,
            "detection_precision": 0.75,
            "detection_recall": 0.6,
            "relabel_accuracy": 1.0,
            "selected_accuracy": 1.0,
            "label_accuracy_in": 0.5,
            "label_accuracy_out": 0.9,
        },
    }
    (folder / "report.json").write_text(json.dumps(report))
    history = [{"loss": 1.0, "step": 1}, {"train_loss": 1.0, "step": 1}]
    text = render_card(build_spec(cfg, _trainer(out, history, 3)))
    card = _parse(text)
    assert {"axolotl", "prefalign", "robustft", "sft"} <= set(card.data.tags)
    assert "| clean (kept as labelled) | 2 |" in text
    assert "| relabelled | 2 |" in text
    assert "| relabelled and kept (lowest entropy) | 1 |" in text
    assert "| detection precision | 0.75 |" in text
    assert "| detection recall | 0.6 |" in text
    assert "luo2024robustft" in text


def _spa_metrics(i: int, pairs: int | None) -> dict:
    expansion = None
    if pairs is not None:
        expansion = {"pairs": pairs, "ties_dropped": 1, "mean_judge_prob": 0.71}
    training = {"train_loss": 0.5 + i, "mean_rewards/accuracies": 0.75}
    if i:
        training |= {"mean_spa/noisy_fraction": 0.1, "last_spa/threshold": 0.05}
    stage = "seed DPO" if i == 0 else "SPA"
    return {
        "iteration": i,
        "stage": stage,
        "expansion": expansion,
        "training": training,
    }


def test_spa_stage_card_has_the_iterations_so_far(tmp_path):
    from axolotl_prefalign.integrations.axolotl.model_card import build_spec

    default = _default_folder(tmp_path)
    loop = tmp_path / "spa-out"
    (loop / "iter_0" / "merged").mkdir(parents=True)
    (loop / "iter_0" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(default)})
    )
    (loop / "iter_0" / "metrics.json").write_text(json.dumps(_spa_metrics(0, None)))
    stage = loop / "iter_1"
    stage.mkdir()
    summary = {"pairs": 12, "ties_dropped": 3, "mean_judge_prob": 0.8125}
    (stage / "summary.json").write_text(json.dumps(summary))
    raw = {
        "base_model": str(loop / "iter_0" / "merged"),
        "tokenizer_config": str(default),
        "plugins": [PLUGIN],
        "prefalign": {"loss": "spa", "spa": {"iteration": 1}},
        "rl": "dpo",
        "adapter": "lora",
        "datasets": [
            {"path": str(stage / "pairs"), "type": "axolotl_prefalign.spa_pairs"}
        ],
        "output_dir": str(stage),
    }
    history = [
        {"loss": 0.6, "spa/noisy_fraction": 0.25, "spa/threshold": 0.125, "step": 1},
        {"train_loss": 0.6, "step": 1},
    ]
    text = render_card(build_spec(_cfg(tmp_path, raw), _trainer(stage, history)))
    card = _parse(text)
    assert card.data.base_model == DEFAULT_MODEL_HUB_ID
    assert card.data.model_name == "spa-out-iter_1"
    assert {"axolotl", "prefalign", "spa", "dpo"} <= set(card.data.tags)
    assert "| 0 | seed DPO | - | - | - | - | - | 0.5 | 0.75 |" in text
    assert "| 1 | SPA | 12 | 3 | 0.8125 | 0.25 | 0.125 | 0.6 | - |" in text
    assert "tokenizer_config: prefalign:default" in text
    assert "kim2025spread" in text


def test_final_spa_card_holds_the_per_iteration_table(tmp_path):
    from axolotl_prefalign.integrations.axolotl.model_card import write_spa_card

    final = tmp_path / "spa-out" / "iter_2" / "merged"
    final.mkdir(parents=True)
    prompts = tmp_path / "prompts.jsonl"
    raw_text = yaml.safe_dump(
        {
            "base_model": DEFAULT_MODEL_ALIAS,
            "plugins": [PLUGIN],
            "prefalign": {
                "spa": {"iterations": 2, "prompts": [{"path": str(prompts)}]}
            },
            "rl": "dpo",
            "adapter": "lora",
            "datasets": [{"path": "seed.jsonl", "type": "chatml.prompt_pairs"}],
            "output_dir": str(tmp_path / "spa-out"),
        }
    )
    cfg = yaml.safe_load(raw_text)
    summary = {
        "final_model": str(final),
        "iterations": [_spa_metrics(0, None), _spa_metrics(1, 20), _spa_metrics(2, 18)],
    }
    path = write_spa_card(cfg, raw_text, summary)
    assert path == final / "README.md"
    text = path.read_text()
    card = _parse(text)
    assert card.data.base_model == DEFAULT_MODEL_HUB_ID
    assert {"axolotl", "prefalign", "spa", "dpo"} <= set(card.data.tags)
    assert card.data.datasets == ["seed.jsonl", str(prompts)]
    assert "| 1 | SPA | 20 | 1 | 0.71 | 0.1 | 0.05 | 1.5 | 0.75 |" in text
    assert "| 2 | SPA | 18 | 1 | 0.71 | 0.1 | 0.05 | 2.5 | 0.75 |" in text
    assert "base_model: prefalign:default" in text
    assert "kim2025spread" in text and "rafailov2023direct" in text


def test_a_run_the_plugin_did_not_shape_keeps_its_trainers_card(tmp_path):
    from axolotl_prefalign.integrations.axolotl.model_card import build_spec

    raw = {
        "base_model": "org/model",
        "plugins": [PLUGIN],
        "datasets": [{"path": "x.jsonl", "type": "alpaca"}],
        "output_dir": str(tmp_path / "out"),
    }
    assert build_spec(_cfg(tmp_path, raw), _trainer(tmp_path, [])) is None


def test_card_names_a_string_a_dict_and_a_missing_type_from_axolotls_config(
    tiny_model_dir, tmp_path
):
    from axolotl_prefalign.cli import load_config
    from axolotl_prefalign.integrations.axolotl.model_card import write_run_card

    user_defined = {"field_prompt": "question", "prompt_format": "Q: {prompt}\nA:"}
    raw = {
        "base_model": str(tiny_model_dir),
        "plugins": [PLUGIN],
        "prefalign": {"loss": "sigmoid"},
        "rl": "dpo",
        "datasets": [
            {"path": "a.jsonl", "type": "chat_template.default"},
            {"path": "b.jsonl", "type": user_defined, "split": "train[:8]"},
            {"path": "c.jsonl"},
        ],
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 128,
        "micro_batch_size": 1,
        "learning_rate": 1e-4,
        "num_epochs": 1,
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(path)  # Axolotl's DictDefault: the dict type is one too
    assert type(cfg["datasets"][1]["type"]).__name__ == "DictDefault"
    out = tmp_path / "out"
    assert write_run_card(_trainer(out, DPO_HISTORY), cfg)
    text = (out / "README.md").read_text()
    assert "fine-tuned version of [None]" not in text
    assert "| `a.jsonl` | `chat_template.default` | train |" in text
    assert (
        "| `b.jsonl` | `user_defined.default (field_prompt='question', "
        "prompt_format='Q: {prompt}\\nA:')` | train[:8] |"
    ) in text
    assert "| `c.jsonl` | `none (the rows as they are)` | train |" in text
    assert _parse(text).data.datasets == ["a.jsonl", "b.jsonl", "c.jsonl"]


# -- real runs ------------------------------------------------------------------------


@pytest.fixture()
def named_tiny_model(tiny_model_dir, tmp_path) -> Path:
    """The tiny model in a folder whose config names a hub id (`_name_or_path`)."""
    folder = tmp_path / "tiny-model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": HUB_ID}))
    return folder


def _pairs_file(tmp_path: Path, n: int = 6) -> Path:
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_dpo_run_through_the_plugin_writes_a_card_the_hub_parses(
    named_tiny_model, tmp_path
):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    cfg = tiny_train_cfg(
        named_tiny_model,
        out,
        rl="dpo",
        rl_beta=0.1,
        prefalign={"loss": "sigmoid"},
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_linear=True,
        max_steps=2,
        datasets=[
            {
                "path": str(_pairs_file(tmp_path)),
                "ds_type": "json",
                "split": "train",
                "type": "chatml.prompt_pairs",
            }
        ],
    )
    proc = run_axolotl_train(cfg, tmp_path / "work")
    assert proc.returncode == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == HUB_ID
    assert {"axolotl", "prefalign", "dpo", "lora"} <= set(card.data.tags)
    assert card.data.datasets == [cfg["datasets"][0]["path"]]
    assert card.data.library_name == "peft"
    assert "See axolotl config" in card.text and "loss: sigmoid" in card.text
    assert "| steps | 2 |" in card.text and "train_loss" in card.text
    assert "[None]" not in card.content


@pytest.mark.slow
def test_contrast_sft_on_axolotls_trainer_writes_the_runs_card(
    named_tiny_model, tmp_path
):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    cfg = tiny_train_cfg(
        named_tiny_model,
        out,
        max_steps=2,
        datasets=[
            {
                "path": str(_pairs_file(tmp_path)),
                "ds_type": "json",
                "type": "axolotl_prefalign.contrast",
            }
        ],
    )
    proc = run_axolotl_train(cfg, tmp_path / "work")
    assert proc.returncode == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == HUB_ID
    assert {"axolotl", "prefalign", "contrast-sft", "sft"} <= set(card.data.tags)
    assert f"| {cfg['datasets'][0]['path']} | 6 | 0 | 6 | 0 |" in card.text
    assert "liu2024chain" in card.text


def _card_yaml(text: str) -> dict:
    """The config a card embeds (Axolotl's `See axolotl config` block)."""
    block = text.split("<summary>See axolotl config</summary>", 1)[1]
    return yaml.safe_load(block.split("```yaml\n", 1)[1].split("\n```", 1)[0])


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.slow
def test_the_saved_config_reruns_on_a_fresh_cache(smollm2_dir, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from axolotl_prefalign.core.models import default_model_path

    cfg = tiny_train_cfg(
        DEFAULT_MODEL_ALIAS,
        Path("out"),
        rl="dpo",
        rl_beta=0.1,
        prefalign={"loss": "sigmoid"},
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_linear=True,
        sequence_len=64,
        micro_batch_size=1,
        max_steps=1,
        datasets=[
            {
                "path": str(_pairs_file(tmp_path, n=2)),
                "ds_type": "json",
                "type": "chatml.prompt_pairs",
            }
        ],
        dataset_prepared_path="prepared",
        output_dir="./out",
    )
    first = tmp_path / "first"
    assert run_axolotl_train(cfg, first).returncode == 0
    card = ModelCard.load(first / "out" / "README.md")
    assert card.data.base_model == DEFAULT_MODEL_HUB_ID
    assert str(smollm2_dir) not in card.content
    saved = _card_yaml(card.text)
    assert saved["base_model"] == DEFAULT_MODEL_ALIAS

    # Another machine: the package installed, nothing prepared in its cache.
    fresh = tmp_path / "fresh-cache"
    monkeypatch.setenv("AXOLOTL_PREFALIGN_CACHE", str(fresh))
    second = tmp_path / "second"
    assert run_axolotl_train(saved, second).returncode == 0
    assert (default_model_path() / "prefalign_model.json").is_file()
    assert str(default_model_path()).startswith(str(fresh))
    rerun = ModelCard.load(second / "out" / "README.md")
    assert _card_yaml(rerun.text) == saved
    results = _section(rerun.text, "Training results")
    assert "train_loss" in results
    assert results == _section(card.text, "Training results")
