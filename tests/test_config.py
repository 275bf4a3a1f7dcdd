"""The `prefalign:` block through Axolotl's own config path (prepare + validate)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from axolotl_prefalign.core.config import PrefAlignConfig, PrefAlignConfigError
from axolotl_prefalign.core.local_data import DataFileError
from axolotl_prefalign.integrations.axolotl.dataset_check import deferred

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "yaml_examples").rglob("*.yml"))
PLUGIN = "axolotl_prefalign.PrefAlignPlugin"


def _base_cfg(model_dir: Path, **extra) -> dict:
    cfg = {
        "base_model": str(model_dir),
        "plugins": [PLUGIN],
        "datasets": [{"path": "dummy.jsonl", "ds_type": "json", "type": "alpaca"}],
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "num_epochs": 1,
        "sequence_len": 128,
        "output_dir": "./out",
        "bf16": False,
        "fp16": False,
    }
    cfg.update(extra)
    return cfg


def axolotl_validate(raw: dict):
    """What `axolotl train` does with a YAML before training: plugins, validate."""
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(copy.deepcopy(raw))
    prepare_plugins(cfg)
    return validate_config(cfg)


def test_plugin_block_survives_axolotl_validation_with_defaults(tiny_model_dir):
    cfg = axolotl_validate(_base_cfg(tiny_model_dir, prefalign={"on_bad_row": "skip"}))
    block = cfg["prefalign"]
    assert block["on_bad_row"] == "skip"
    # Defaults equal the papers' values (docs/methods.md).
    assert block["spa"]["beta"] == 0.1
    assert block["spa"]["alpha"] == 0.1
    assert block["spa"]["noise_quantile"] == 0.1
    assert block["spa"]["dnd_lambdas"] == [0.5, 0.25, 0.125]
    assert block["spa"]["num_samples"] == 2
    assert block["spa"]["temperature"] == 0.7
    assert block["spa"]["max_new_tokens"] == 300
    assert block["spa"]["alpha_warmup_ratio"] == 0.2
    assert block["robustft"]["k"] == 3
    assert block["robustft"]["select_ratio"] == 0.5
    assert block["robustft"]["number_rel_tol"] == 0.01
    assert block["contrast"]["preset"] == "en"
    assert block["contrast"]["unlikelihood_weight"] == 0.0
    assert PrefAlignConfig.from_raw(block).trainer_active is False


def test_missing_block_means_defaults(tiny_model_dir):
    cfg = axolotl_validate(_base_cfg(tiny_model_dir))
    assert PrefAlignConfig.from_raw(cfg.get("prefalign")) == PrefAlignConfig()


@pytest.mark.parametrize(
    ("block", "bad", "suggestion"),
    [
        ({"spa": {"alhpa": 0.2}}, "prefalign.spa.alhpa", "alpha"),
        ({"los": "spa"}, "prefalign.los", "loss"),
        (
            {"robustft": {"fields": {"questoin": "q"}}},
            "prefalign.robustft.fields.questoin",
            "question",
        ),
    ],
)
def test_misspelled_key_fails_naming_it(tiny_model_dir, block, bad, suggestion):
    with pytest.raises(PrefAlignConfigError, match=rf"unknown key '{bad}'") as err:
        axolotl_validate(_base_cfg(tiny_model_dir, prefalign=block))
    assert f"did you mean '{suggestion}'" in str(err.value)
    assert "valid keys here:" in str(err.value)


def test_bad_value_names_the_field():
    with pytest.raises(
        PrefAlignConfigError,
        match=r"prefalign\.spa\.alpha: .*less than or equal to 0.5",
    ):
        PrefAlignConfig.from_raw({"spa": {"alpha": 0.9}})
    with pytest.raises(PrefAlignConfigError, match=r"prefalign\.loss: Input should be"):
        PrefAlignConfig.from_raw({"loss": "dpoo"})
    with pytest.raises(PrefAlignConfigError, match="must be a mapping"):
        PrefAlignConfig.from_raw(["spa"])


def test_label_smoothing_only_with_cdpo_or_robust():
    assert PrefAlignConfig.from_raw({"loss": "cdpo", "label_smoothing": 0.1})
    with pytest.raises(
        PrefAlignConfigError, match="only applies to loss: cdpo or robust"
    ):
        PrefAlignConfig.from_raw({"loss": "sigmoid", "label_smoothing": 0.1})


def test_loss_requires_rl_dpo(tiny_model_dir):
    with pytest.raises(
        PrefAlignConfigError, match=r"runs under `rl: dpo`, but rl is None"
    ):
        axolotl_validate(_base_cfg(tiny_model_dir, prefalign={"loss": "spa"}))


def test_loss_installs_our_trainer(tiny_model_dir):
    raw = _base_cfg(tiny_model_dir, rl="dpo", prefalign={"loss": "sigmoid"})
    raw["datasets"] = [
        {"path": "x.jsonl", "ds_type": "json", "type": "chatml.prompt_pairs"}
    ]
    cfg = axolotl_validate(raw)
    assert cfg["trainer_cls"] == "axolotl_prefalign.trainers.PrefAlignDPOTrainer"
    from axolotl.utils.import_helper import get_cls_from_module_str

    from axolotl_prefalign.integrations.axolotl.trainers.dpo import PrefAlignDPOTrainer

    assert get_cls_from_module_str(cfg["trainer_cls"]) is PrefAlignDPOTrainer


@pytest.mark.parametrize(
    ("key", "value", "advice"),
    [
        ("dpo_label_smoothing", 0.1, "prefalign.loss: cdpo"),
        ("dpo_use_liger_kernel", True, "prefalign's own fused log-prob path"),
        ("dpo_ld_alpha", 0.5, "nothing: LD-DPO is not implemented by prefalign"),
        ("dpo_padding_free", True, "prefalign.packing: true"),
        ("dpo_loss_type", ["hinge"], "prefalign.loss"),
        ("pad_to_multiple_of", 8, "nothing (leave it unset)"),
    ],
)
def test_axolotl_dpo_settings_our_trainer_would_ignore_are_errors(
    tiny_model_dir, key, value, advice
):
    raw = _base_cfg(tiny_model_dir, rl="dpo", prefalign={"loss": "spa"})
    raw[key] = value
    with pytest.raises(PrefAlignConfigError, match=rf"{key} → use {re.escape(advice)}"):
        axolotl_validate(raw)


def test_conflicting_trainer_cls_is_an_error(tiny_model_dir):
    raw = _base_cfg(tiny_model_dir, rl="dpo", prefalign={"loss": "sigmoid"})
    raw["trainer_cls"] = "my.Trainer"
    with pytest.raises(
        PrefAlignConfigError, match="trainer_cls is set to 'my.Trainer'"
    ):
        axolotl_validate(raw)


def test_prefalign_settings_salt_the_prepared_dataset_hash(tiny_model_dir):
    from axolotl.utils.data.shared import generate_dataset_hash_from_config

    hashes = []
    for preset in ("en", "zh"):
        cfg = axolotl_validate(
            _base_cfg(tiny_model_dir, prefalign={"contrast": {"preset": preset}})
        )
        hashes.append(generate_dataset_hash_from_config(cfg, cfg.datasets, "tok"))
    assert hashes[0] != hashes[1]


def test_format_revision_salts_the_prepared_dataset_hash(tiny_model_dir):
    from axolotl.utils.data.shared import generate_dataset_hash_from_config

    from axolotl_prefalign.integrations.axolotl.args import DATA_FORMAT_REVISION

    cfg = axolotl_validate(_base_cfg(tiny_model_dir))
    assert cfg["prefalign_data_revision"] == DATA_FORMAT_REVISION
    before = generate_dataset_hash_from_config(cfg, cfg.datasets, "tok")
    cfg["prefalign_data_revision"] = DATA_FORMAT_REVISION + "-next"
    assert generate_dataset_hash_from_config(cfg, cfg.datasets, "tok") != before


def test_default_model_alias_resolves_to_prepared_folder(smollm2_dir):
    from axolotl_prefalign.integrations.axolotl.plugin import PrefAlignPlugin

    raw = {"base_model": "prefalign:default", "plugins": [PLUGIN]}
    PrefAlignPlugin().register(raw)
    assert raw["base_model"] == str(smollm2_dir)
    assert (Path(raw["base_model"]) / "config.json").exists()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_yaml_example_validates_through_axolotl(path, monkeypatch):
    raw = yaml.safe_load(path.read_text())
    assert PLUGIN in raw.get("plugins", []), f"{path.name} must enable the plugin"
    if raw.get("base_model") != "prefalign:default":
        # GPU examples name hub models; validation must not reach the network.
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    user_data = [
        d["path"]
        for d in raw.get("datasets") or []
        if str(d.get("type", "")).startswith("axolotl_prefalign.")
        and not Path(d["path"]).exists()
    ]
    if user_data:
        # The example names the user's own data: the pre-check says which file is
        # missing; the config itself is validated without it.
        with pytest.raises(
            DataFileError, match=re.escape(f"{user_data[0]} does not exist")
        ):
            axolotl_validate(copy.deepcopy(raw))
        with deferred():
            cfg = axolotl_validate(raw)
    else:
        cfg = axolotl_validate(raw)
    PrefAlignConfig.from_raw(cfg.get("prefalign"))


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert "quickstart-cpu.yml" in names
    assert "robustft-options-cpu.yml" in names  # the options beyond the paper


def test_reference_cache_with_spa_dnd_is_refused():
    with pytest.raises(PrefAlignConfigError, match="reference_cache saves nothing"):
        PrefAlignConfig.from_raw({"loss": "spa", "reference_cache": True})
    ok = PrefAlignConfig.from_raw(
        {"loss": "spa", "reference_cache": True, "spa": {"dnd": False}}
    )
    assert ok.reference_cache
