"""The ZeRO-3 and FSDP2 examples through Axolotl's own config loader (0.19 and 0.21).

test_config.py validates every example; these check what the multi-GPU ones rely on:
the DeepSpeed JSON we ship is ZeRO-3 in bf16, FSDP2 resolves to fsdp_version 2, and
Axolotl itself sends a 4-bit DPO run to DeepSpeed rather than FSDP2.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from test_config import axolotl_validate

REPO = Path(__file__).resolve().parent.parent
ZERO3 = REPO / "yaml_examples" / "dpo-fused-qlora-70b-zero3.yml"
FSDP2 = REPO / "yaml_examples" / "dpo-fused-lora-8b-fsdp2.yml"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)  # the examples name paths from the repository root


def test_zero3_example_names_a_shipped_stage3_bf16_json():
    raw = yaml.safe_load(ZERO3.read_text())
    cfg = axolotl_validate(raw)
    assert cfg["deepspeed"] == "yaml_examples/deepspeed/zero3_bf16.json"
    assert cfg["load_in_4bit"] and cfg["adapter"] == "qlora"
    ds = json.loads((REPO / cfg["deepspeed"]).read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True
    # Axolotl's own zero3_bf16.json keeps no gathered layer alive between uses.
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 0


def test_fsdp2_example_resolves_to_fsdp_version_2():
    cfg = axolotl_validate(yaml.safe_load(FSDP2.read_text()))
    assert str(cfg["fsdp_version"]) == "2"
    assert cfg["fsdp_config"]["reshard_after_forward"] is True
    assert not cfg.get("load_in_4bit") and cfg["adapter"] == "lora"


def test_axolotl_sends_4bit_dpo_under_fsdp2_to_deepspeed():
    """The 70B QLoRA example with FSDP2 instead of ZeRO-3: Axolotl refuses it."""
    raw = copy.deepcopy(yaml.safe_load(ZERO3.read_text()))
    fsdp = yaml.safe_load(FSDP2.read_text())
    del raw["deepspeed"]
    raw["fsdp_version"], raw["fsdp_config"] = 2, fsdp["fsdp_config"]
    with pytest.raises(ValueError) as err:
        axolotl_validate(raw)
    message = str(err.value)
    assert "FSDP2 does not support load_in_8bit or load_in_4bit with dpo" in message
    assert "use DeepSpeed" in message


def test_fsdp1_refused_naming_fsdp2_and_zero3():
    """Axolotl 0.19 still has FSDP1 (0.21 removed it); the plugin stops either way,
    before Axolotl's own checks, with the fix."""
    raw = yaml.safe_load(FSDP2.read_text())
    raw["fsdp_version"] = 1
    with pytest.raises(ValueError) as err:
        axolotl_validate(raw)
    message = str(err.value)
    assert message.startswith("fsdp_version: 1 selects FSDP1")
    assert "set fsdp_version: 2" in message and "DeepSpeed ZeRO-3" in message
