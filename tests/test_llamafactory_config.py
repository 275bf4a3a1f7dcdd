"""A LLaMA-Factory config and its `key=value` overrides, read as `llamafactory-cli`
reads them (OmegaConf); tests/test_llamafactory_formats.py checks the same reads
against LLaMA-Factory's own `read_args` in its environment."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from axolotl_prefalign.cli import prefalign
from axolotl_prefalign.core.config import PrefAlignConfigError
from axolotl_prefalign.integrations.llamafactory import launcher
from axolotl_prefalign.integrations.llamafactory.launcher import (
    LaunchError,
    read_config,
)

CONFIG = """\
stage: dpo
do_train: true
learning_rate: 5e-6
pref_beta: 1e-1
max_steps: 2
dataset: pairs
prefalign:
  loss: cdpo
  label_smoothing: 1e-1
"""


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text(CONFIG)
    return path


def test_exponent_numbers_are_floats_as_in_llamafactory(config):
    """`5e-6` (no dot) is the string '5e-6' to PyYAML, a float to OmegaConf."""
    args, pa = read_config(config)
    assert args["learning_rate"] == 5e-6 and isinstance(args["learning_rate"], float)
    assert args["pref_beta"] == 0.1 and isinstance(args["pref_beta"], float)
    assert pa.label_smoothing == 0.1


def test_key_value_overrides_merge_as_llamafactory_cli_merges_them(config):
    args, pa = read_config(
        config,
        ["learning_rate=1e-5", "max_steps=3", "prefalign.loss=robust", "dataset=a,b"],
    )
    assert args["learning_rate"] == 1e-5
    assert args["max_steps"] == 3 and isinstance(args["max_steps"], int)
    assert args["dataset"] == "a,b" and args["pref_beta"] == 0.1
    assert pa.loss == "robust" and pa.label_smoothing == 0.1
    assert "prefalign" not in args


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["learning_rate"], LaunchError, "override 'learning_rate': write key=value"),
        (["--max_steps=3"], LaunchError, "override '--max_steps=3': write key=value"),
        (["prefalign.los=spa"], PrefAlignConfigError, "unknown key 'prefalign.los'"),
        (["prefalign.loss=nope"], PrefAlignConfigError, "prefalign.loss"),
    ],
)
def test_a_bad_override_is_an_error_naming_it(config, overrides, error, message):
    with pytest.raises(error, match=message):
        read_config(config, overrides)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage: dpo\ndataset: [a,\nmax_steps: 2\n")
    with pytest.raises(
        LaunchError,
        match=r"bad\.yaml, line 4: malformed YAML \(did not find expected ',' or "
        r"'\]'; while parsing a flow sequence on line 2\)",
    ):
        read_config(path)


def test_a_json_config_reads_like_the_yaml(tmp_path):
    path = tmp_path / "dpo.json"
    raw = {"stage": "dpo", "learning_rate": 5e-6, "prefalign": {"loss": "ipo"}}
    path.write_text(json.dumps(raw))
    args, pa = read_config(path, ["max_steps=4"])
    assert args == {"stage": "dpo", "learning_rate": 5e-6, "max_steps": 4}
    assert pa.loss == "ipo"


def test_train_and_denoise_commands_take_overrides_after_the_config(
    config, monkeypatch
):
    seen = []
    with monkeypatch.context() as m:
        m.setattr(launcher, "train", lambda c, o: seen.append((c.name, o)))
        result = CliRunner().invoke(
            prefalign,
            ["llamafactory", "train", str(config), "learning_rate=1e-5", "max_steps=3"],
        )
    assert result.exit_code == 0, result.output
    assert seen == [("dpo.yaml", ("learning_rate=1e-5", "max_steps=3"))]
    for command in ("train", "denoise"):
        result = CliRunner().invoke(
            prefalign, ["llamafactory", command, str(config), "learning_rate"]
        )
        assert result.exit_code == 1, result.output
        assert "LaunchError: override 'learning_rate': write key=value" in (
            result.output
        )
