"""Each SPA setting declares what it affects, and the loop's name sets follow."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from pydantic import Field

from axolotl_prefalign.core.config import EXPANSION, SpaConfig, SpaEffect
from axolotl_prefalign.spa.loop import expand_key, stage_prefalign
from axolotl_prefalign.spa.settings import (
    EXPANSION_SETTINGS,
    TRAINER_SETTINGS,
    expansion_settings,
    setting_effects,
)

# The classification the loop kept by hand before the declarations: the settings
# whose values key an expansion, and the ones passed on to the trainer.
KEYED = {
    "beta",
    "num_samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "generation_batch_size",
    "judge_batch_size",
    "generation_backend",
    "shard_size",
    "max_prompt_tokens",
    "length_normalized",
    "init_model",
    "seed",
}
TRAINER = {
    "beta",
    "iteration",
    "alpha",
    "noise_quantile",
    "margin_window",
    "alpha_warmup_ratio",
    "dnd",
    "dnd_lambdas",
}

# A valid value other than the default for every setting.
CHANGED: dict[str, Any] = {
    "beta": 0.2,
    "iterations": 5,
    "iteration": 2,
    "seed_epochs": 1,
    "num_samples": 3,
    "temperature": 0.9,
    "top_p": 0.9,
    "max_new_tokens": 10,
    "generation_batch_size": 4,
    "judge_batch_size": 4,
    "generation_backend": "hf",
    "shard_size": 8,
    "max_prompt_tokens": 10,
    "launcher": "torchrun",
    "length_normalized": True,
    "init_model": "other-model",
    "alpha": 0.2,
    "noise_quantile": 0.2,
    "margin_window": 5,
    "alpha_warmup_ratio": 0.5,
    "dnd": False,
    "dnd_lambdas": [1.0],
    "prompts": [{"path": "prompts.jsonl", "gold_field": "answer"}],
    "prompts_per_iteration": [1],
    "seed": 1,
    "gold_checker": "exact",
    "flags_file": "flags.jsonl",
}
PROMPTS = {"index": [0, 1], "prompt": ["first prompt", "second prompt"]}


def _key(spa: SpaConfig) -> str:
    return expand_key(expansion_settings(spa), PROMPTS)


def test_every_spa_setting_declares_what_it_affects():
    effects = setting_effects(SpaConfig)
    assert set(effects) == set(SpaConfig.model_fields)
    assert all(effects.values())


def test_a_setting_without_a_declaration_is_an_error_naming_it():
    class Undeclared(SpaConfig):
        knob: int = Field(1)

    with pytest.raises(TypeError, match=r"Undeclared\.knob: declare what a change"):
        setting_effects(Undeclared)

    class Misdeclared(SpaConfig):
        knob: Annotated[int, EXPANSION, SpaEffect("sampling")] = Field(1)

    with pytest.raises(TypeError, match="unknown: sampling"):
        setting_effects(Misdeclared)


def test_derived_sets_match_the_loops_classification():
    assert EXPANSION_SETTINGS == KEYED
    assert TRAINER_SETTINGS == TRAINER


def test_every_setting_has_a_changed_value_here():
    assert set(CHANGED) == set(SpaConfig.model_fields), (
        "give each new SPA setting a changed value in CHANGED"
    )


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_only_expansion_settings_change_the_expansion_key(name):
    changed = SpaConfig(**{name: CHANGED[name]})
    assert getattr(changed, name) != getattr(SpaConfig(), name)
    stale = _key(changed) != _key(SpaConfig())
    assert stale == ("expansion" in setting_effects()[name])


def test_only_training_settings_reach_the_trainer():
    block = {"loss": "spa", "spa": dict(CHANGED)}
    spa = stage_prefalign(block, 2, flags_file=None)["spa"]
    assert set(spa) == TRAINER
    assert spa["iteration"] == 2  # the stage's own, not the YAML's
    assert {k: v for k, v in spa.items() if k != "iteration"} == {
        k: CHANGED[k] for k in TRAINER - {"iteration"}
    }


# expansion_meta (what a finished expansion folder records, to be reused) reads
# three expansion settings through what they produce rather than by name.
META_PROXY = {
    "generation_backend": "backend",
    "init_model": "init_model",
    "max_prompt_tokens": "prompts_sha",
}


def test_every_expansion_setting_is_recorded_by_the_expansion_files():
    from axolotl_prefalign.spa.expand import expansion_meta

    gen, judge = expansion_meta(
        SpaConfig(),
        1,
        [(0, "a prompt")],
        model_id="m",
        init_model_id="i",
        backend="hf",
    )
    assert set(gen) <= set(judge)
    recorded = {META_PROXY.get(name, name) for name in EXPANSION_SETTINGS}
    assert recorded <= set(judge), sorted(recorded - set(judge))
