"""The SPA loop: prompt splits, generated stage configs, resuming, π_{i−1} loading."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from axolotl_prefalign.core.config import SpaConfig, SpaPromptSource
from axolotl_prefalign.core.rows import BadRowError
from axolotl_prefalign.core.shards import ShardWriter, read_shards
from axolotl_prefalign.integrations.axolotl.spa_loop import run_from_config
from axolotl_prefalign.spa.loop import (
    SpaLoopError,
    iteration_prompts,
    load_policy,
    load_prompts,
    policy_spec,
    training_stats,
)

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "axolotl_prefalign.PrefAlignPlugin"


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prompt_file(path: Path, n: int, start: int = 0) -> Path:
    return _jsonl(
        path, [{"prompt": f"prompt number {i}"} for i in range(start, start + n)]
    )


# -- prompts -------------------------------------------------------------------


def test_one_source_is_split_into_disjoint_parts_in_order(tmp_path):
    src = _prompt_file(tmp_path / "p.jsonl", 10)
    spa = SpaConfig(
        iterations=3, prompts=[{"path": str(src)}], prompts_per_iteration=[2, 3, 4]
    )
    parts = iteration_prompts(spa)
    assert [p["index"] for p in parts] == [[0, 1], [2, 3, 4], [5, 6, 7, 8]]
    even = iteration_prompts(spa.model_copy(update={"prompts_per_iteration": None}))
    assert [len(p) for p in even] == [4, 3, 3]


def test_one_source_per_iteration_with_optional_caps(tmp_path):
    a = _prompt_file(tmp_path / "a.jsonl", 5)
    b = _prompt_file(tmp_path / "b.jsonl", 5, start=5)
    spa = SpaConfig(iterations=2, prompts=[{"path": str(a)}, {"path": str(b)}])
    assert [len(p) for p in iteration_prompts(spa)] == [5, 5]
    capped = spa.model_copy(update={"prompts_per_iteration": [2, 4]})
    assert [p["prompt"][0] for p in iteration_prompts(capped)] == [
        "prompt number 0",
        "prompt number 5",
    ]


def test_overlapping_iterations_are_refused(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "Name a colour."}, {"prompt": "x"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": "name  a COLOUR."}])
    spa = SpaConfig(iterations=2, prompts=[{"path": str(a)}, {"path": str(b)}])
    with pytest.raises(SpaLoopError, match="in iterations 1 and 2: .*fresh prompts"):
        iteration_prompts(spa)


@pytest.mark.parametrize(
    "update, message",
    [
        (
            {"prompts_per_iteration": [3, 3]},
            r"has 5 usable prompts, the 2 iterations need 6",
        ),
        ({"prompts_per_iteration": [3]}, "1 sizes for 2 iterations"),
        ({"prompts_per_iteration": [0, 3]}, "sizes must be >= 1"),
        ({"prompts": []}, "prompts is empty"),
        ({"iterations": 3, "prompts_per_iteration": None}, None),  # 5 split 2/2/1
    ],
)
def test_bad_prompt_settings_are_clear_errors(tmp_path, update, message):
    src = _prompt_file(tmp_path / "p.jsonl", 5)
    spa = SpaConfig(iterations=2, prompts=[{"path": str(src)}]).model_copy(
        update=update
    )
    if message is None:
        assert [len(p) for p in iteration_prompts(spa)] == [2, 2, 1]
        return
    with pytest.raises(SpaLoopError, match=message):
        iteration_prompts(spa)


def test_three_sources_for_two_iterations_is_an_error(tmp_path):
    srcs = [
        {"path": str(_prompt_file(tmp_path / f"{k}.jsonl", 2, 10 * k))}
        for k in range(3)
    ]
    with pytest.raises(SpaLoopError, match="3 sources for 2 iterations"):
        iteration_prompts(SpaConfig(iterations=2, prompts=srcs))


def test_malformed_prompt_rows_name_file_row_and_field(tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "good one"}\n'
        "{not json\n"
        '["a list"]\n'
        '{"text": "wrong field"}\n'
        '{"prompt": 42}\n'
        '{"prompt": "another good one"}\n'
    )
    src = SpaPromptSource(path=str(path))
    with pytest.raises(BadRowError, match=r"p.jsonl, line 2: malformed JSON"):
        load_prompts(src)
    with caplog.at_level(logging.WARNING, logger="axolotl_prefalign"):
        ds = load_prompts(src, "skip")
    assert ds["index"] == [0, 5] and ds["prompt"] == ["good one", "another good one"]
    assert "skipped 4 bad row(s)" in caplog.text
    assert "prompt: missing" in caplog.text and "must be text, got int" in caplog.text
    path.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    with pytest.raises(BadRowError, match=r"p.jsonl, line 2, field 'prompt': empty"):
        load_prompts(src)
    with pytest.raises(SpaLoopError, match="does not exist"):
        load_prompts(SpaPromptSource(path=str(tmp_path / "nope.jsonl")))


def test_bad_jsonl_rows_name_their_line_in_the_file(tmp_path, caplog):
    """Blank lines are not rows, so the error also names the line to look at."""
    path = tmp_path / "p.jsonl"
    src = SpaPromptSource(path=str(path))
    path.write_text('\n{"prompt": "good one"}\n\n\n{not json\n')
    with pytest.raises(BadRowError, match=r"p.jsonl, line 5: malformed JSON \(.*\)$"):
        load_prompts(src)
    path.write_text('{"prompt": "a"}\n\n["a list"]\n')
    with pytest.raises(
        BadRowError, match=r"p.jsonl, line 3: must be a JSON object, got a list"
    ):
        load_prompts(src)
    path.write_text('\n\n{"prompt": "a"}\n\n{"text": "b"}\n{"text": "c"}\n')
    with pytest.raises(BadRowError, match=r"p.jsonl, line 5, field 'prompt': missing"):
        load_prompts(src)
    with caplog.at_level(logging.WARNING, logger="axolotl_prefalign"):
        assert load_prompts(src, "skip")["index"] == [0]
    assert "2 × prompt: missing" in caplog.text  # skips still group by problem


# -- orchestration with the stage subprocesses faked -----------------------------


class FakeStages:
    """Stands in for `axolotl train / merge-lora / prefalign spa-expand`: records
    each call and writes the output the real stage would leave."""

    def __init__(self, fail_at: str | None = None, pairs: int = 2):
        self.calls: list[str] = []
        self.fail_at = fail_at
        self.pairs = pairs
        self.seen_dirs: dict[str, list[str]] = {}

    def __call__(self, cmd: list[str], log: Path) -> None:
        kind = {"train": "train", "merge-lora": "merge", "prefalign": "expand"}[cmd[3]]
        name = f"{log.parent.name}/{kind}"
        self.calls.append(name)
        self.seen_dirs[name] = sorted(p.name for p in log.parent.iterdir())
        log.write_text("{'loss': 0.5, 'rewards/accuracies': 0.75}\n")
        if name == self.fail_at:
            raise SpaLoopError(f"{name} failed")
        if kind == "train":
            out = Path(yaml.safe_load(Path(cmd[4]).read_text())["output_dir"])
            (out / "adapter_config.json").write_text("{}")
            (out / "adapter_model.safetensors").write_text("weights")
        elif kind == "merge":
            out = Path(yaml.safe_load(Path(cmd[4]).read_text())["output_dir"])
            (out / "merged").mkdir()
            (out / "merged" / "config.json").write_text("{}")
            (out / "merged" / "model.safetensors").write_text("weights")
        else:
            out = Path(cmd[cmd.index("--out") + 1])
            it = int(cmd[cmd.index("--iteration") + 1])
            writer = ShardWriter(out / "pairs", {"iteration": it})
            writer.write([], [100])  # a block whose prompts were all dropped
            rows = [
                {"prompt": f"p{k}", "chosen": "a", "rejected": "b", "judge_prob": 0.6,
                 "margin": 0.4, "iteration": it}
                for k in range(self.pairs)
            ]  # fmt: skip
            writer.write(rows, range(self.pairs))
            summary = {"iteration": it, "prompts": 3, "pairs": self.pairs,
                       "ties_dropped": 3 - self.pairs, "dropped_empty": 0,
                       "mean_abs_margin": 0.4}  # fmt: skip
            writer.finish(summary)
            (out / "summary.json").write_text(json.dumps(summary))


@pytest.fixture()
def spa_yaml(tmp_path, tiny_model_dir):
    """A user YAML for 2 iterations over one split prompt file; (path, raw dict)."""
    prompts = _prompt_file(tmp_path / "prompts.jsonl", 6)
    raw = {
        "base_model": str(tiny_model_dir),
        "plugins": [PLUGIN],
        "prefalign": {
            "loss": "spa",
            "spa": {
                "iterations": 2,
                "seed_epochs": 2,
                "prompts": [{"path": str(prompts)}],
                "prompts_per_iteration": [3, 3],
            },
        },
        "rl": "dpo",
        "datasets": [
            {
                "path": str(REPO / "axolotl_prefalign/data/spa_seed_example.jsonl"),
                "ds_type": "json",
                "split": "train",
                "type": "axolotl_prefalign.spa_pairs",
            }
        ],  # fmt: skip
        "output_dir": str(tmp_path / "out"),
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
        "lora_model_dir": "/somewhere/else",
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "num_epochs": 7,
        "sequence_len": 256,
        "bf16": False,
        "fp16": False,
    }
    path = tmp_path / "spa.yml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def _cfg(raw: dict) -> dict:
    # What run_from_config reads from Axolotl's validated config.
    return copy.deepcopy(raw)


STAGES = [
    "iter_0/train",
    "iter_0/merge",
    "iter_1/expand",
    "iter_1/train",
    "iter_1/merge",
    "iter_2/expand",
    "iter_2/train",
    "iter_2/merge",
]


def test_loop_runs_stages_in_order_with_generated_configs(spa_yaml, tiny_model_dir):
    path, raw = spa_yaml
    stages = FakeStages()
    summary = run_from_config(_cfg(raw), path, runner=stages)
    assert stages.calls == STAGES
    out = Path(raw["output_dir"])

    seed = yaml.safe_load((out / "iter_0/config.yml").read_text())
    assert seed["base_model"] == str(tiny_model_dir)
    assert seed["datasets"] == raw["datasets"]  # the labelled seed
    assert seed["num_epochs"] == 2  # prefalign.spa.seed_epochs
    assert seed["prefalign"]["loss"] == "sigmoid"
    assert seed["prefalign"]["spa"]["iteration"] == 0
    assert seed["output_dir"] == str(out / "iter_0")
    assert "lora_model_dir" not in seed  # every stage trains a fresh adapter
    assert seed["rl_beta"] == 0.1

    it2 = yaml.safe_load((out / "iter_2/config.yml").read_text())
    assert it2["base_model"] == str(out / "iter_1/merged")  # π_1: reference of iter 2
    assert it2["tokenizer_config"] == str(tiny_model_dir)
    assert it2["num_epochs"] == 1
    assert it2["prefalign"]["loss"] == "spa"
    assert it2["prefalign"]["spa"]["iteration"] == 2  # picks λ_2
    assert it2["prefalign"]["spa"] == {"iteration": 2}  # loop-only keys left out
    assert it2["datasets"] == [
        {
            "path": str(out / "iter_2/pairs"),
            "ds_type": "json",
            "data_files": [str(out / "iter_2/pairs/shard-00001.jsonl")],  # not empty
            "split": "train",
            "type": "axolotl_prefalign.spa_pairs",
        }
    ]
    assert summary["final_model"] == str(out / "iter_2/merged")
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1, 2]
    assert summary["iterations"][1]["expansion"]["pairs"] == 2
    assert summary["iterations"][1]["training"]["last_rewards/accuracies"] == 0.75
    assert json.loads((out / "spa_summary.json").read_text()) == summary
    assert json.loads((out / "iter_1/metrics.json").read_text())["iteration"] == 1
    # The final model's card: the per-iteration table and the loop's YAML.
    card = (out / "iter_2/merged/README.md").read_text()
    assert "| 1 | SPA | 2 | 1 |" in card
    assert "kim2025spread" in card and "prompts_per_iteration" in card


def test_generated_configs_pass_axolotl_validation(spa_yaml):
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    path, raw = spa_yaml
    run_from_config(_cfg(raw), path, runner=FakeStages())
    for i in range(3):
        conf = yaml.safe_load(
            (Path(raw["output_dir"]) / f"iter_{i}/config.yml").read_text()
        )
        conf["base_model"] = raw["base_model"]  # the fake merged folders hold no model
        cfg = DictDefault(conf)
        prepare_plugins(cfg)
        valid = validate_config(cfg)
        assert valid["prefalign"]["spa"]["iteration"] == i


def test_full_finetuning_chains_output_dirs_without_merging(spa_yaml):
    path, raw = spa_yaml
    raw = {k: v for k, v in raw.items() if not k.startswith("lora") and k != "adapter"}
    path.write_text(yaml.safe_dump(raw))
    stages = FakeStages()
    run_from_config(_cfg(raw), path, runner=stages)
    assert stages.calls == [s for s in STAGES if not s.endswith("merge")]
    it1 = yaml.safe_load((Path(raw["output_dir"]) / "iter_1/config.yml").read_text())
    assert it1["base_model"] == str(Path(raw["output_dir"]) / "iter_0")


def test_rerun_after_a_crash_skips_finished_stages(spa_yaml):
    path, raw = spa_yaml
    with pytest.raises(SpaLoopError, match="iter_2/train failed"):
        run_from_config(_cfg(raw), path, runner=FakeStages(fail_at="iter_2/train"))
    state = json.loads((Path(raw["output_dir"]) / "spa_state.json").read_text())
    assert list(state["stages"]) == STAGES[:6]
    again = FakeStages()
    run_from_config(_cfg(raw), path, runner=again)
    assert again.calls == ["iter_2/train", "iter_2/merge"]
    idle = FakeStages()
    run_from_config(_cfg(raw), path, runner=idle)
    assert idle.calls == []


def test_a_redone_stage_redoes_everything_after_it(spa_yaml):
    path, raw = spa_yaml
    run_from_config(_cfg(raw), path, runner=FakeStages())
    out = Path(raw["output_dir"])
    (out / "iter_1/adapter_model.safetensors").unlink()  # π_1 is gone
    again = FakeStages()
    run_from_config(_cfg(raw), path, runner=again)
    assert again.calls == STAGES[3:]
    # Pairs judged by the old π_1 were cleared before iteration 2 expanded again.
    assert "pairs" not in again.seen_dirs["iter_2/expand"]


def test_changed_settings_after_a_finished_stage_are_refused(spa_yaml):
    path, raw = spa_yaml
    run_from_config(_cfg(raw), path, runner=FakeStages())
    raw["learning_rate"] = 3e-4
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpaLoopError, match="iter_0/train finished with other settings"):
        run_from_config(_cfg(raw), path, runner=FakeStages())
    raw["learning_rate"] = 1e-4
    raw["prefalign"]["spa"]["temperature"] = 1.0
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        SpaLoopError, match="iter_1/expand finished with other settings"
    ):
        run_from_config(_cfg(raw), path, runner=FakeStages())


def _split_by_iterations(spa_yaml, iterations):
    """The fixture's 6 prompts split by `iterations` alone (2: [3, 3]; 3: [2, 2, 2])."""
    path, raw = spa_yaml
    raw["prefalign"]["spa"].pop("prompts_per_iteration", None)
    raw["prefalign"]["spa"]["iterations"] = iterations
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def test_a_changed_split_of_the_prompts_never_reuses_an_expansion(spa_yaml):
    path, raw = _split_by_iterations(spa_yaml, 2)
    run_from_config(_cfg(raw), path, runner=FakeStages())
    path, raw = _split_by_iterations(spa_yaml, 3)  # prompt 3 moves to iteration 2
    with pytest.raises(
        SpaLoopError, match="stage iter_1/expand finished with other settings"
    ):
        run_from_config(_cfg(raw), path, runner=FakeStages())
    out = Path(raw["output_dir"])
    for i in (1, 2):  # as the message says: delete them to redo them
        shutil.rmtree(out / f"iter_{i}")
    again = FakeStages()
    run_from_config(_cfg(raw), path, runner=again)
    assert again.calls[:2] == ["iter_1/expand", "iter_1/train"]
    assert "iter_3/expand" in again.calls


def test_the_same_split_spelled_another_way_reuses_the_expansions(spa_yaml):
    path, raw = _split_by_iterations(spa_yaml, 2)
    run_from_config(_cfg(raw), path, runner=FakeStages())
    raw["prefalign"]["spa"]["prompts_per_iteration"] = [3, 3]
    path.write_text(yaml.safe_dump(raw))
    idle = FakeStages()
    run_from_config(_cfg(raw), path, runner=idle)
    assert idle.calls == []


def test_an_iteration_without_pairs_stops_the_loop(spa_yaml):
    path, raw = spa_yaml
    with pytest.raises(SpaLoopError, match="iteration 1 produced no pairs"):
        run_from_config(_cfg(raw), path, runner=FakeStages(pairs=0))


def test_loop_needs_the_plugin_and_dpo(spa_yaml):
    path, raw = spa_yaml
    path.write_text(yaml.safe_dump({**raw, "plugins": []}))
    with pytest.raises(SpaLoopError, match="needs `plugins"):
        run_from_config(_cfg(raw), path, runner=FakeStages())
    path.write_text(yaml.safe_dump({**raw, "rl": "kto"}))
    with pytest.raises(SpaLoopError, match="rl: dpo"):
        run_from_config(_cfg(raw), path, runner=FakeStages())


def test_training_stats_from_trainer_state_or_log(tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    history = [
        {"loss": 0.7, "rewards/accuracies": 0.5, "step": 1},
        {"loss": 0.5, "rewards/accuracies": 1.0, "rewards/margins": 0.2, "step": 2},
        {"train_loss": 0.6, "step": 2},
    ]
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    stats = training_stats(tmp_path)
    assert stats["train_loss"] == 0.6
    assert stats["mean_rewards/accuracies"] == 0.75
    assert stats["last_loss"] == 0.5 and stats["logged_steps"] == 2
    other = tmp_path / "logonly"
    other.mkdir()
    (other / "train.log").write_text(
        "noise\n{'loss': 0.69, 'rewards/accuracies': 0.25}\n{'train_loss': 0.68}\n"
    )
    assert training_stats(other) == {
        "logged_steps": 1,
        "train_loss": 0.68,
        "last_loss": 0.69,
        "mean_loss": 0.69,
        "last_rewards/accuracies": 0.25,
        "mean_rewards/accuracies": 0.25,
    }


# -- π_{i−1} for the judge ---------------------------------------------------------


def _random_adapter(model, path: Path, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft = get_peft_model(model, cfg)
    peft.save_pretrained(path)
    return peft


def test_stacked_adapters_on_the_base_equal_the_merged_chain(tmp_path, tiny_model_dir):
    """iter_0's adapter on the base, iter_1's on iter_0/merged: stacking both on the
    base is π_1, and disabling them is π_init — one model for the judge."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    a0 = _random_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "iter_0", 0
    )
    merged0 = a0.merge_and_unload()
    merged0.save_pretrained(out / "iter_0/merged")
    a1 = _random_adapter(merged0, out / "iter_1", 1)
    cfg = {"base_model": str(tiny_model_dir), "output_dir": str(out), "adapter": "lora"}
    spec = policy_spec(cfg, 2)
    assert spec.adapters == [str((out / f"iter_{k}").resolve()) for k in (0, 1)]
    assert spec.init_path is None and spec.vllm_path is None
    model, init = load_policy(spec, cfg)
    assert init is None
    ids = torch.randint(3, 300, (2, 9))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, a1(ids).logits, atol=1e-5, rtol=0)
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, base(ids).logits)
    with pytest.raises(SpaLoopError, match=r"π_2 not found: .*iter_2 holds no adapter"):
        policy_spec(cfg, 3)


def test_full_finetuning_judges_against_a_separate_base(tmp_path, tiny_model_dir):
    cfg = {"base_model": str(tiny_model_dir), "output_dir": str(tmp_path)}
    with pytest.raises(SpaLoopError, match="iter_0 holds no model"):
        policy_spec(cfg, 1)
    (tmp_path / "iter_0").mkdir()
    (tmp_path / "iter_0/model.safetensors").write_text("x")
    spec = policy_spec(cfg, 1)
    assert spec.base == str((tmp_path / "iter_0").resolve())
    assert spec.init_path == str(tiny_model_dir)


def test_policy_spec_for_an_explicit_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = {"base_model": str(tiny_model_dir), "output_dir": str(tmp_path)}
    adapter = tmp_path / "my-adapter"
    _random_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter, 0)
    spec = policy_spec(cfg, 1, model_path=str(adapter))
    # An adapter on the original base: π_init is that base with the adapter off.
    assert spec.base == str(tiny_model_dir) and spec.init_path is None
    full = policy_spec(cfg, 1, model_path=str(tiny_model_dir))
    assert full.adapters == [] and full.init_path == str(tiny_model_dir)


def _loop_config(tmp_path, tiny_model_dir, **spa):
    """An SPA loop config on the tiny model with iter_0's LoRA adapter in place."""
    from transformers import AutoModelForCausalLM

    from axolotl_prefalign.cli import load_config

    prompts = _prompt_file(tmp_path / "prompts.jsonl", 4)
    out = tmp_path / "out"
    _random_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "iter_0", 0
    )
    raw = {
        "base_model": str(tiny_model_dir),
        "plugins": [PLUGIN],
        "prefalign": {
            "spa": {
                "iterations": 2,
                "max_new_tokens": 5,
                "prompts": [{"path": str(prompts)}],
                **spa,
            }
        },
        "rl": "dpo",
        "datasets": [
            {
                "path": str(REPO / "axolotl_prefalign/data/spa_seed_example.jsonl"),
                "ds_type": "json",
                "type": "axolotl_prefalign.spa_pairs",
            }
        ],  # fmt: skip
        "output_dir": str(out),
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "num_epochs": 1,
        "sequence_len": 256,
        "bf16": False,
        "fp16": False,
    }
    path = tmp_path / "spa.yml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path), out


def test_expand_from_config_judges_with_the_loop_layout(
    tmp_path, tiny_model_dir, monkeypatch
):
    from axolotl_prefalign.integrations.axolotl.spa_loop import expand_from_config
    from axolotl_prefalign.spa import loop as loop_mod

    cfg, out = _loop_config(tmp_path, tiny_model_dir)
    summary = expand_from_config(cfg, 1)
    assert summary["prompts"] == 2  # 4 prompts split into 2 iterations
    manifest = json.loads((out / "iter_1/pairs/manifest.json").read_text())
    assert manifest["meta"]["model"].endswith("iter_0")
    assert manifest["meta"]["init_model"] == "adapter-disabled"
    judged = [*read_shards(out / "iter_1/pairs"), *read_shards(out / "iter_1/dropped")]
    assert sorted(r["index"] for r in judged) == [0, 1]  # iteration 1's part
    # Finished: the second call returns the summary without loading a model.
    monkeypatch.setattr(loop_mod, "load_policy", None)
    assert expand_from_config(cfg, 1) == summary
    with pytest.raises(SpaLoopError, match="--iteration must be in 1..2"):
        expand_from_config(cfg, 3)


@pytest.mark.parametrize("backend", ["auto", "vllm"])
def test_vllm_without_one_model_folder(tmp_path, tiny_model_dir, monkeypatch, backend):
    """With vLLM importable (faked) but π_0 only an adapter: auto falls back to HF
    generation; an explicit vllm is an error that says what to do."""
    from axolotl_prefalign.integrations.axolotl.spa_loop import expand_from_config
    from axolotl_prefalign.spa import expand as expand_mod

    def with_vllm(spa):  # choose_backend's answer where vllm and CUDA are there
        return "hf" if spa.generation_backend == "hf" else "vllm"

    def no_vllm(*args, **kwargs):
        raise AssertionError("vLLM must not be started")

    monkeypatch.setattr(expand_mod, "choose_backend", with_vllm)
    monkeypatch.setattr(expand_mod, "VllmGenerator", no_vllm)
    cfg, out = _loop_config(tmp_path, tiny_model_dir, generation_backend=backend)
    if backend == "vllm":
        with pytest.raises(SpaLoopError, match=r"vLLM needs π_0 as one model folder"):
            expand_from_config(cfg, 1)
        return
    assert expand_from_config(cfg, 1)["prompts"] == 2
    manifest = json.loads((out / "iter_1/pairs/manifest.json").read_text())
    assert manifest["meta"]["backend"] == "hf"


# -- end to end ------------------------------------------------------------------------


@pytest.mark.slow
def test_spa_loop_end_to_end_on_the_cpu(spa_real_loop):
    """Seed DPO + 2 iterations with real `axolotl train` / `merge-lora` /
    `spa-expand` subprocesses on the tiny model (the run is shared with the gold
    report's test: conftest.spa_real_loop)."""
    run = spa_real_loop
    proc, cmd, env, seed, prompts = run.proc, run.cmd, run.env, run.seed, run.prompts
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = run.out
    state = json.loads((out / "spa_state.json").read_text())
    assert list(state["stages"]) == STAGES
    summary = json.loads((out / "spa_summary.json").read_text())
    for row in summary["iterations"][1:]:
        assert (
            row["expansion"]["pairs"]
            + row["expansion"]["ties_dropped"]
            + row["expansion"]["dropped_empty"]
            == 3
        )
        assert row["training"]["logged_steps"] >= 1
    pairs = list(read_shards(out / "iter_2/pairs"))
    assert pairs and all(p["iteration"] == 2 for p in pairs)
    assert (out / "iter_2/merged/config.json").exists()
    trained = yaml.safe_load((out / "iter_2/config.yml").read_text())
    assert trained["prefalign"]["loss"] == "spa"
    from huggingface_hub import ModelCard

    # Each stage's card (written by its trainer) and the final model's card.
    stage = ModelCard.load(out / "iter_1/README.md")
    assert {"axolotl", "prefalign", "spa", "dpo"} <= set(stage.data.tags)
    assert "| 0 | seed DPO |" in stage.text and "| 1 | SPA |" in stage.text
    final = ModelCard.load(out / "iter_2/merged/README.md")
    assert {"axolotl", "prefalign", "spa"} <= set(final.data.tags)
    assert final.data.datasets == [str(seed), str(prompts)]
    for i in range(3):
        assert f"| {i} | {'seed DPO' if i == 0 else 'SPA'} |" in final.text

    # A second run finds every stage done and starts no subprocess.
    def stage_logs():
        names = ("train.log", "merge.log", "expand.log")
        return {p: p.stat().st_mtime_ns for n in names for p in out.rglob(n)}

    logs = stage_logs()
    assert len(logs) == 8
    again = subprocess.run(
        cmd, cwd=run.cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert stage_logs() == logs
    assert json.loads((out / "spa_state.json").read_text()) == state
    assert "|margin|" in again.stdout  # the summary table
