"""`axolotl train` as a subprocess with the plugin enabled (CPU, tiny model)."""

from __future__ import annotations

import json

import pytest
from conftest import run_axolotl_train, tiny_train_cfg

pytestmark = pytest.mark.slow


def test_axolotl_train_qlora_with_plugin_saves_adapter(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [
        {"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"}
        for i in range(16)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = tiny_train_cfg(
        tiny_model_dir,
        out,
        datasets=[{"path": str(data), "ds_type": "json", "type": "alpaca"}],
        adapter="qlora",
        load_in_4bit=True,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_linear=True,
        prefalign={"on_bad_row": "error"},
    )
    proc = run_axolotl_train(cfg, tmp_path)
    assert proc.returncode == 0
    log = proc.stdout + proc.stderr
    assert "Plugin loaded successfully: axolotl_prefalign.PrefAlignPlugin" in log
    assert "Training completed" in log
    assert (out / "adapter_config.json").exists()
    assert (out / "adapter_model.safetensors").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    assert adapter["peft_type"] == "LORA"


def test_axolotl_train_dpo_runs_prefalign_trainer_with_qlora(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {
            "prompt": f"What is {i} plus {i}?",
            "chosen": f"{2 * i}",
            "rejected": f"{2 * i + 1}",
        }
        for i in range(12)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = tiny_train_cfg(
        tiny_model_dir,
        out,
        rl="dpo",
        rl_beta=0.1,
        datasets=[
            {"path": str(data), "ds_type": "json", "type": "chatml.prompt_pairs"}
        ],
        adapter="qlora",
        load_in_4bit=True,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_linear=True,
        prefalign={"loss": "sigmoid", "chunk_size": 16},
    )
    proc = run_axolotl_train(cfg, tmp_path)
    assert proc.returncode == 0
    log = proc.stdout + proc.stderr
    assert (
        "prefalign: using trainer axolotl_prefalign.trainers.PrefAlignDPOTrainer" in log
    )
    assert "rewards/margins" in log
    assert (out / "adapter_model.safetensors").exists()
