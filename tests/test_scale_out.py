"""Register-time checks of DeepSpeed / FSDP settings under the fused log-prob path
(Axolotl YAML keys, as Axolotl 0.19 and 0.21 spell them)."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest

from axolotl_prefalign.core.config import PrefAlignConfigError

AXOLOTL_021 = tuple(int(x) for x in version("axolotl").split(".")[:2]) >= (0, 21)
# As Axolotl's deepspeed_configs/zero3_bf16.json (`axolotl fetch deepspeed_configs`).
ZERO3 = {
    "zero_optimization": {"stage": 3, "overlap_comm": True},
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
}
FSDP_CONFIG = {
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
    "reshard_after_forward": True,
}


def _register(**extra) -> dict:
    from axolotl_prefalign.integrations.axolotl.plugin import PrefAlignPlugin

    raw = {"rl": "dpo", "adapter": "lora", "prefalign": {"loss": "sigmoid"}, **extra}
    PrefAlignPlugin().register(raw)
    return raw


def _zero3_file(tmp_path, stage: int = 3) -> str:
    path = tmp_path / f"zero{stage}.json"
    conf = {**ZERO3, "zero_optimization": {"stage": stage}}
    path.write_text(json.dumps(conf))
    return str(path)


@pytest.mark.parametrize(
    "extra, setting",
    [
        ({"fsdp_version": 1, "fsdp_config": FSDP_CONFIG}, "fsdp_version: 1 selects"),
        (
            {"fsdp_config": {**FSDP_CONFIG, "fsdp_version": 1}},
            "fsdp_config.fsdp_version: 1 selects",
        ),
    ],
)
def test_fsdp1_is_refused_at_register_naming_the_key_and_the_fix(extra, setting):
    with pytest.raises(PrefAlignConfigError) as err:
        _register(**extra)
    message = str(err.value)
    assert message.startswith(setting)
    assert "FSDP1" in message and "fused log-prob path" in message
    assert message.endswith(
        "set fsdp_version: 2 (with an fsdp_config: block), or use DeepSpeed ZeRO-3"
    )


# Axolotl 0.21 rejects the `fsdp:` list itself (FSDP1 is gone), so that spelling is
# a case on 0.19 only.
UNVERSIONED = {"fsdp_config": {"fsdp_config": FSDP_CONFIG}}
if not AXOLOTL_021:
    UNVERSIONED["fsdp_list"] = {"fsdp": ["full_shard", "auto_wrap"]}


@pytest.mark.parametrize("extra", list(UNVERSIONED.values()), ids=list(UNVERSIONED))
def test_unversioned_fsdp_follows_axolotls_default(extra):
    # Axolotl 0.19 pins an unversioned fsdp_config to FSDP1; 0.21 defaults to 2.
    if AXOLOTL_021:
        assert _register(**extra)["trainer_cls"]
        return
    with pytest.raises(PrefAlignConfigError) as err:
        _register(**extra)
    key = "fsdp_config" if "fsdp_config" in extra else "fsdp: ['full_shard'"
    assert str(err.value).startswith(key)
    assert "without fsdp_version (Axolotl's default: 1) selects FSDP1" in str(err.value)


@pytest.mark.parametrize(
    "extra",
    [
        {"fsdp_version": 2, "fsdp_config": FSDP_CONFIG},
        {"fsdp_config": {**FSDP_CONFIG, "fsdp_version": 2}},
        {"fsdp_config": {**FSDP_CONFIG, "version": 2}},
        {
            "fsdp_version": 2,
            "fsdp_config": FSDP_CONFIG,
            "lora_modules_to_save": ["lm_head"],
        },
    ],
)
def test_fsdp2_is_accepted(extra):
    assert _register(**extra)["trainer_cls"].endswith("PrefAlignDPOTrainer")


def test_fsdp1_without_the_fused_path_is_axolotls_business():
    raw = {
        "rl": "dpo",
        "adapter": "lora",
        "fsdp_version": 1,
        "fsdp_config": FSDP_CONFIG,
    }
    from axolotl_prefalign.integrations.axolotl.plugin import PrefAlignPlugin

    PrefAlignPlugin().register(raw)
    assert "trainer_cls" not in raw


@pytest.mark.parametrize("form", ["file", "dict", "axolotl_name"])
def test_zero3_with_lm_head_in_modules_to_save_is_refused_naming_both_keys(
    tmp_path, form
):
    deepspeed = {
        "file": _zero3_file(tmp_path),
        "dict": ZERO3,
        # Not fetched here: Axolotl reads such a path by its name.
        "axolotl_name": "deepspeed_configs/zero3_bf16.json",
    }[form]
    with pytest.raises(PrefAlignConfigError) as err:
        _register(deepspeed=deepspeed, lora_modules_to_save=["embed_tokens", "lm_head"])
    message = str(err.value)
    shown = "a ZeRO stage 3 config" if form == "dict" else deepspeed
    assert message.startswith(
        f"deepspeed: {shown} (ZeRO stage 3) with lora_modules_to_save: lm_head fails "
        "inside DeepSpeed on the first forward ('Linear' object has no attribute "
        "'ds_grads_remaining', DeepSpeed issue #7203)"
    )
    assert "train the head fully (no adapter)" in message
    assert message.endswith("or use a ZeRO stage 2 config")


@pytest.mark.parametrize(
    "extra",
    [
        {"lora_modules_to_save": None},  # LoRA, frozen head
        {"adapter": None, "lora_modules_to_save": None},  # full fine-tuning
        {"lora_modules_to_save": ["embed_tokens"]},
    ],
)
def test_zero3_is_accepted_without_a_peft_copy_of_the_head(tmp_path, extra):
    raw = _register(deepspeed=_zero3_file(tmp_path), **extra)
    assert raw["trainer_cls"].endswith("PrefAlignDPOTrainer")


def test_zero2_with_lm_head_in_modules_to_save_is_accepted(tmp_path):
    raw = _register(
        deepspeed=_zero3_file(tmp_path, stage=2), lora_modules_to_save=["lm_head"]
    )
    assert raw["trainer_cls"].endswith("PrefAlignDPOTrainer")
